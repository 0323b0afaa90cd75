"""Device profiles, tiers and seeded populations of heterogeneous clients.

Conventions
-----------
- ``speed`` is a relative factor vs the reference device (1.0x); ``flops_per_s = speed *
  reference_flops``. A device is *slow* (SDIR) iff ``speed < 0.8`` (``fedray.devices.cost.is_slow``).
- Bandwidths are bytes per second (1 MB/s = 1e6 B/s); ``download_bps``/``upload_bps`` on a
  profile are per-client *means*; per-round variation is log-normal with ``bw_sigma``
  (see ``fedray.devices.cost``). ``cpu_load`` is the mean fraction of the CPU taken by other
  work; ``load_sigma`` varies it per round.
- ``battery_j = inf`` means mains powered (the battery never limits the device).
- Availability: explicit ``windows`` ``[start, end)`` in virtual seconds (repeating every
  ``windows_period_s`` when > 0) if given, else a seeded on/off process that keeps the device
  available an ``availability`` fraction of the time with mean on+off cycle
  ``availability_cycle_s``; a ``trace`` overrides both.
- Every random draw comes from ``np.random.default_rng([seed, PURPOSE, ...])``; the purpose
  constants below are distinct from those in ``cost.py``.

Populations (:func:`fedray.devices.columns.build_population`): tier counts are exact, ``round(fraction * n)`` each with the
rounding remainder going to the largest tier; which client gets which tier is a seeded
permutation; each client's own draws (speed, link means, battery level) are its row of one
seeded stream, read on demand (:mod:`fedray.devices.columns`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedray.devices.traces import DeviceTrace
from fedray.errors import ConfigError


SLOW_SPEED = 0.8
DEFAULT_REFERENCE_FLOPS = 2e9


def _check_range(fld: str, rng: tuple[float, float], *, positive: bool = True, unit: bool = False) -> None:
    if len(rng) != 2:
        raise ConfigError(fld, f"must be a (low, high) pair, got {rng!r}")
    lo, hi = float(rng[0]), float(rng[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(fld, f"must be finite, got {rng!r}")
    if positive and (lo <= 0 or hi <= 0):
        raise ConfigError(fld, f"must be > 0, got {rng!r}")
    if unit and not (0 <= lo <= 1 and 0 <= hi <= 1):
        raise ConfigError(fld, f"must lie in [0, 1], got {rng!r}")


@dataclass(frozen=True)
class DeviceProfile:
    """Static description of one client's device (plus an optional time-varying ``trace``)."""

    client_id: int
    tier: str
    speed: float
    flops_per_s: float
    memory_mb: float = 4096.0
    download_bps: float = 10e6
    upload_bps: float = 2e6
    latency_s: float = 0.05
    compute_power_w: float = 5.0
    radio_power_w: float = 1.0
    battery_j: float = math.inf
    battery_level: float = 1.0
    recharge_w: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    cpu_load: float = 0.0
    load_sigma: float = 0.0
    bw_sigma: float = 0.0
    availability: float = 1.0
    availability_cycle_s: float = 3600.0
    windows: tuple[tuple[float, float], ...] = ()
    windows_period_s: float = 0.0
    dropout_prob: float = 0.0
    trace: DeviceTrace | None = None

    def __post_init__(self) -> None:
        f = "devices"
        if int(self.client_id) != self.client_id or self.client_id < 0:
            raise ConfigError(f"{f}.client_id", f"must be a non-negative integer, got {self.client_id!r}")
        for name in ("speed", "flops_per_s", "download_bps", "upload_bps", "battery_j"):
            v = getattr(self, name)
            if not v > 0:
                raise ConfigError(f"{f}.{name}", f"must be > 0, got {v!r}")
        for name in ("memory_mb", "latency_s", "compute_power_w", "radio_power_w", "recharge_w",
                     "num_cpus", "num_gpus", "load_sigma", "bw_sigma", "windows_period_s"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{f}.{name}", f"must be a finite number >= 0, got {v!r}")
        for name in ("battery_level", "availability", "dropout_prob"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ConfigError(f"{f}.{name}", f"must be in [0, 1], got {v!r}")
        if not 0 <= self.cpu_load < 1:
            raise ConfigError(f"{f}.cpu_load", f"must be in [0, 1), got {self.cpu_load!r}")
        if not self.availability_cycle_s > 0:
            raise ConfigError(f"{f}.availability_cycle_s", f"must be > 0, got {self.availability_cycle_s!r}")
        for w in self.windows:
            if len(w) != 2 or not w[0] < w[1]:
                raise ConfigError(f"{f}.windows", f"each window must be (start, end) with start < end, got {w!r}")
        object.__setattr__(self, "resources", {str(k): float(v) for k, v in self.resources.items()})
        object.__setattr__(self, "windows", tuple((float(a), float(b)) for a, b in self.windows))


@dataclass(frozen=True)
class TierSpec:
    """One device tier: a fraction of the clients with parameters drawn uniformly in ranges."""

    name: str
    fraction: float
    speed_range: tuple[float, float] = (1.0, 1.0)
    download_bps_range: tuple[float, float] = (10e6, 10e6)
    upload_bps_range: tuple[float, float] = (2e6, 2e6)
    latency_s: float = 0.05
    memory_mb: float = 4096.0
    compute_power_w: float = 5.0
    radio_power_w: float = 1.0
    battery_j: float = math.inf
    battery_level_range: tuple[float, float] = (1.0, 1.0)
    recharge_w: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        f = f"devices.tiers.{self.name}"
        if not 0 <= self.fraction <= 1:
            raise ConfigError(f"{f}.fraction", f"must be in [0, 1], got {self.fraction!r}")
        _check_range(f"{f}.speed_range", self.speed_range)
        _check_range(f"{f}.download_bps_range", self.download_bps_range)
        _check_range(f"{f}.upload_bps_range", self.upload_bps_range)
        _check_range(f"{f}.battery_level_range", self.battery_level_range, positive=False, unit=True)
        if not self.battery_j > 0:
            raise ConfigError(f"{f}.battery_j", f"must be > 0 (inf = mains powered), got {self.battery_j!r}")


@dataclass(frozen=True)
class PopulationSpec:
    """How to draw a population of device profiles.

    ``link``: ``"fixed"`` (no per-round bandwidth variation) or ``"lognormal"`` (per-round factor
    with ``bw_sigma``). ``link_means``: where each client's mean bandwidths come from:
    ``"tier"`` (uniform in its tier's ranges), ``"linear"`` (spread linearly over client ids from
    the first to the second value of ``download_bps_range``/``upload_bps_range``, as in PR-FL:
    client 0 fastest) or ``"random"`` (uniform in those ranges).
    ``"client"`` (client ``c``'s means are ``download_bps_means[c]``/``upload_bps_means[c]``,
    one per client: a named population such as ``prfl_paper``).
    ``tier_order``: ``"random"`` (a seeded permutation) or ``"id"`` (consecutive client ids,
    in the order of ``tiers``). ``num_clients``: the exact size a population was published
    for (None: any).
    ``trace_path``: a trace file (``fedray.devices.traces``); client ``i`` gets the trace with the
    ``i``-th smallest id (cycling when there are fewer traces than clients); the trace's
    ``speed`` (if present) replaces the tier's speed draw and its mean bandwidths replace the
    drawn means.
    """

    reference_flops: float = DEFAULT_REFERENCE_FLOPS
    tiers: tuple[TierSpec, ...] = field(default_factory=lambda: homogeneous())
    link: Literal["fixed", "lognormal"] = "fixed"
    bw_sigma: float = 0.3
    link_means: Literal["tier", "linear", "random", "client"] = "tier"
    download_bps_range: tuple[float, float] = (20e6, 1.5e6)
    upload_bps_range: tuple[float, float] = (5e6, 0.4e6)
    download_bps_means: tuple[float, ...] = ()
    upload_bps_means: tuple[float, ...] = ()
    tier_order: Literal["random", "id"] = "random"
    num_clients: int | None = None
    cpu_load: float = 0.0
    load_sigma: float = 0.0
    dropout_prob: float = 0.0
    availability: float = 1.0
    availability_cycle_s: float = 3600.0
    trace_path: str | None = None

    def __post_init__(self) -> None:
        f = "devices"
        if not self.reference_flops > 0:
            raise ConfigError(f"{f}.reference_flops", f"must be > 0, got {self.reference_flops!r}")
        if not self.tiers:
            raise ConfigError(f"{f}.tiers", "needs at least one tier")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ConfigError(f"{f}.tiers", f"tier names must be unique, got {names}")
        total = sum(t.fraction for t in self.tiers)
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"{f}.tiers", f"fractions must sum to 1, got {total:g}")
        if self.link not in ("fixed", "lognormal"):
            raise ConfigError(f"{f}.link", f"must be 'fixed' or 'lognormal', got {self.link!r}")
        if self.link_means not in ("tier", "linear", "random", "client"):
            raise ConfigError(f"{f}.link_means", f"must be 'tier', 'linear' or 'random', got {self.link_means!r}")
        if self.link_means == "client":
            down, up = self.download_bps_means, self.upload_bps_means
            if not down or len(down) != len(up) or not all(v > 0 for v in (*down, *up)):
                raise ConfigError(f"{f}.link_means", "'client' needs one download and one upload mean > 0 per client")
            if self.num_clients != len(down):
                raise ConfigError(f"{f}.link_means", f"'client' has {len(down)} means for {self.num_clients} clients")
        if self.tier_order not in ("random", "id"):
            raise ConfigError(f"{f}.tier_order", f"must be 'random' or 'id', got {self.tier_order!r}")
        _check_range(f"{f}.download_bps_range", self.download_bps_range)
        _check_range(f"{f}.upload_bps_range", self.upload_bps_range)
        for name in ("bw_sigma", "load_sigma"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{f}.{name}", f"must be a finite number >= 0, got {v!r}")
        for name in ("availability", "dropout_prob"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ConfigError(f"{f}.{name}", f"must be in [0, 1], got {v!r}")
        if not 0 <= self.cpu_load < 1:
            raise ConfigError(f"{f}.cpu_load", f"must be in [0, 1), got {self.cpu_load!r}")
        if not self.availability_cycle_s > 0:
            raise ConfigError(f"{f}.availability_cycle_s", f"must be > 0, got {self.availability_cycle_s!r}")


    def check_size(self, num_clients: int, name: str = "", fld: str = "data.num_clients") -> None:
        """A population published for ``self.num_clients`` clients takes exactly that many."""
        if self.num_clients is not None and num_clients != self.num_clients:
            what = f"devices.population {name}" if name else "this device population"
            raise ConfigError(fld, f"{what} has exactly {self.num_clients} clients, got {num_clients}")


def clamp_tiers() -> tuple[TierSpec, ...]:
    """CLAMP / MA-CLAMP speeds: 10% very slow (0.3-0.6x), 80% normal (0.8-1.4x), 10% very fast (1.8-2.5x)."""
    return (
        TierSpec("very_slow", 0.1, speed_range=(0.3, 0.6)),
        TierSpec("normal", 0.8, speed_range=(0.8, 1.4)),
        TierSpec("very_fast", 0.1, speed_range=(1.8, 2.5)),
    )


def homogeneous() -> tuple[TierSpec, ...]:
    """Every device identical: speed 1.0, the default links."""
    return (TierSpec("reference", 1.0, speed_range=(1.0, 1.0)),)


TIER_PRESETS = {"clamp": clamp_tiers, "homogeneous": homogeneous}

PRFL_DOWNLOAD_MBPS = (20, 18, 12, 10, 6, 4, 2.5, 2, 2, 1.5)
PRFL_UPLOAD_MBPS = (5, 4, 3, 2.5, 1.5, 1, .6, .5, .5, .4)
PRFL_MACS_PER_S = (20e12, 2e12, 2e12, 0.2e12)  # compute of the (2, 2, 2, 4) groups, client 0 first


def prfl_paper() -> PopulationSpec:
    """PR-FL's published device model: 10 clients in groups of (2, 2, 2, 4) by id, per-client mean links, 3 compute tiers.

    From the authors' code (the PR-FL paper's published setting):

    - client ``c`` downloads at ``PRFL_DOWNLOAD_MBPS[c]`` and uploads at ``PRFL_UPLOAD_MBPS[c]``
      MB/s on average (1 MB = 1e6 bytes; the cost model counts bytes per second), log-normal per
      round with sigma 0.3 around those means (the cost model's mean-preserving draw: the median
      of a client's bandwidth is ``mean * exp(-0.3**2 / 2)``, 4.4% below its mean);
    - the groups are consecutive ids (client 0 fastest), as the starting densities
      ``[1, 1, .6, .6, .3, .3, .1, .1, .1, .1]`` of PR-FL pair with them;
    - compute: 20e12 / 2e12 / 0.2e12 MAC/s for three tiers over four groups. Our reading: the
      two extreme groups are their own tiers (clients 0-1 the fastest, 20e12; clients 6-9 the
      slowest, 0.2e12) and the two middle groups (densities .6 and .3, links 12-4 MB/s) share
      the middle tier, 2e12: each group is at least as fast as the next one in compute and link.
    - FLOP/s: the cost model counts 2 FLOPs per multiply-accumulate (``fedray.models.spec``),
      so the reference device (1.0x) is the middle tier, 2 x 2e12 = 4e12 FLOP/s, and the speeds
      are 10x / 1x / 0.1x (SDIR's slow devices, speed < 0.8: clients 6-9).
    Latency, power and battery are fedray's defaults (the published model has links and compute only).
    """
    return PopulationSpec(
        reference_flops=2 * PRFL_MACS_PER_S[1],
        tiers=tuple(TierSpec(name, fr, speed_range=(m / PRFL_MACS_PER_S[1],) * 2) for name, fr, m in
                    zip(("fast", "mid", "mid_slow", "slow"), (0.2, 0.2, 0.2, 0.4), PRFL_MACS_PER_S)),
        link="lognormal", bw_sigma=0.3, link_means="client", tier_order="id", num_clients=10,
        download_bps_means=tuple(x * 1e6 for x in PRFL_DOWNLOAD_MBPS),
        upload_bps_means=tuple(x * 1e6 for x in PRFL_UPLOAD_MBPS))


POPULATIONS = {"prfl_paper": prfl_paper}


def tier_counts(num_clients: int, fractions: tuple[float, ...] | list[float]) -> list[int]:
    """Exact tier sizes: ``round(fraction * n)`` each, the remainder (+ or -) to the largest tier.

    The largest tier is the one with the largest fraction (the first one on ties).
    Example: 100 clients, (0.1, 0.8, 0.1) -> [10, 80, 10]; 7 clients, (0.5, 0.5) -> [3, 4]
    (Python rounds halves to even: round(3.5) = 4, so 4 + 4 = 8 and the first, largest-on-tie
    tier absorbs the -1).
    """
    counts = [int(round(fr * num_clients)) for fr in fractions]
    largest = int(np.argmax(fractions))
    counts[largest] += num_clients - sum(counts)
    if counts[largest] < 0:  # only with pathological fractions; spread the excess elsewhere
        deficit = -counts[largest]
        counts[largest] = 0
        for i in sorted(range(len(counts)), key=lambda j: -counts[j]):
            take = min(deficit, counts[i])
            counts[i] -= take
            deficit -= take
    return counts


def _lerp(rng: tuple[float, float], u: float) -> float:
    return float(rng[0] + u * (rng[1] - rng[0]))
