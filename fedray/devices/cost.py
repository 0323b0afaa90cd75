"""The one device cost model: training FLOPs and payload bytes -> virtual seconds and joules.

For one dispatch of ``profile`` starting at virtual time ``t_start``:

- Conditions: ``cpu_load``, ``download_bps``, ``upload_bps`` from ``profile.trace.at(t_start)``
  when the profile has a trace, else the profile's means (``cpu_load``, ``download_bps``,
  ``upload_bps``).
- Per-round variation (six standard normals ``z0..z5`` drawn, always all six, from
  ``default_rng([seed, PURPOSE_COST, client_id, round_key])``, so a result never depends on
  call order or on which other clients were estimated):

  * free CPU share ``a = min(1, (1 - load) * exp(load_sigma * z0))``, floored at
    ``MIN_CPU_SHARE``; reported ``cpu_load = 1 - a``. Median-preserving on the free share,
    capped at 1 because background work can only slow a device down.
  * bandwidth ``bw = mean * exp(bw_sigma * z - bw_sigma**2 / 2)`` (z1 down, z2 up):
    *mean-preserving*, since profiles and traces store means (PR-FL: "log-normal around
    per-client means").
  * with a shared server link: ``bw = min(bw, shared_server_bps / concurrent)`` per direction,
    ``concurrent`` = the transfers in that direction that overlap this one on the virtual clock
    (:class:`ServerLink` counts them; ``concurrent_up`` for the upload, default the same).
  * ``noise_sigma`` (model-wide, default 0): extra mean-preserving log-normal jitter on
    compute (z3), download (z4) and upload (z5) seconds, for run-to-run variance that the
    device does not see; it does not change the reported conditions.

- Seconds: ``compute_s = train_flops / (flops_per_s * a)``, ``download_s = bytes_down / bw_down``,
  ``upload_s = bytes_up / bw_up``; ``latency_s`` is the one-way latency, paid once per direction:
  ``total_s = compute_s + download_s + upload_s + 2 * latency_s``.
- Energy: ``compute_power_w * compute_s + radio_power_w * (download_s + upload_s)`` (idle
  waiting on latency is not charged).

Also here: battery helpers (``drain``, ``recharge``), availability (``is_available`` for the
seeded on/off process or windows, ``available`` combining it with trace and battery),
``dropout_point``, ``is_slow`` and ``straggler_mask``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from fedray.devices.profile import SLOW_SPEED, DeviceProfile

PURPOSE_COST = 0xDE11
PURPOSE_AVAIL = 0xDE12
PURPOSE_AVAIL_START = 0xDE13
PURPOSE_DROPOUT = 0xDE14

MIN_CPU_SHARE = 0.01
"""Lowest free CPU share the model allows (a fully loaded device still progresses at 1%)."""


def _check_key(name: str, value: int) -> int:
    if int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Cost:
    """Virtual cost of one dispatch and the conditions the device saw (its telemetry)."""

    compute_s: float
    download_s: float
    upload_s: float
    latency_s: float
    total_s: float
    energy_j: float
    train_flops: int
    bytes_down: int
    bytes_up: int
    cpu_load: float
    download_bps: float
    upload_bps: float


_NO_NOISE = (0.0,) * 6


@dataclass(frozen=True)
class CostModel:
    """``shared_server_bps``: capacity of the server link shared by ``concurrent`` transfers
    (None = unlimited). ``noise_sigma``: extra duration jitter (see module docstring)."""

    shared_server_bps: float | None = None
    noise_sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.shared_server_bps is not None and not self.shared_server_bps > 0:
            raise ValueError(f"shared_server_bps must be > 0 or None, got {self.shared_server_bps!r}")
        if not (self.noise_sigma >= 0 and math.isfinite(self.noise_sigma)):
            raise ValueError(f"noise_sigma must be a finite number >= 0, got {self.noise_sigma!r}")

    def estimate(
        self,
        profile: DeviceProfile,
        *,
        train_flops: int,
        bytes_down: int,
        bytes_up: int,
        t_start: float,
        seed: int,
        round_key: int,
        concurrent: int = 1,
        concurrent_up: int | None = None,
    ) -> Cost:
        """Cost of training ``train_flops`` and moving ``bytes_down``/``bytes_up`` from ``t_start``.

        Pure: the result depends only on the arguments. ``round_key`` is any non-negative
        integer identifying the dispatch (round number, dispatch counter).
        """
        if train_flops < 0 or bytes_down < 0 or bytes_up < 0:
            raise ValueError("train_flops, bytes_down and bytes_up must be >= 0")
        concurrent_up = concurrent if concurrent_up is None else concurrent_up
        for c in (concurrent, concurrent_up):
            if int(c) != c or c < 1:
                raise ValueError(f"concurrent must be an integer >= 1, got {c!r}")
        seed = _check_key("seed", seed)
        round_key = _check_key("round_key", round_key)

        if profile.trace is not None:
            cond = profile.trace.at(t_start)
            load, down_mean, up_mean = cond["cpu_load"], cond["download_bps"], cond["upload_bps"]
        else:
            load, down_mean, up_mean = profile.cpu_load, profile.download_bps, profile.upload_bps

        if profile.load_sigma or profile.bw_sigma or self.noise_sigma:
            z = np.random.default_rng([seed, PURPOSE_COST, profile.client_id, round_key]).standard_normal(6)
        else:  # nothing is drawn: every factor below is exp(0) = 1 (no generator, ~20 us per dispatch)
            z = _NO_NOISE
        share = min(1.0, (1.0 - load) * math.exp(profile.load_sigma * z[0]))
        share = max(share, MIN_CPU_SHARE)
        s = profile.bw_sigma
        down = down_mean * math.exp(s * z[1] - 0.5 * s * s)
        up = up_mean * math.exp(s * z[2] - 0.5 * s * s)
        if self.shared_server_bps is not None:
            down = min(down, self.shared_server_bps / concurrent)
            up = min(up, self.shared_server_bps / concurrent_up)

        n = self.noise_sigma
        jitter = [math.exp(n * z[k] - 0.5 * n * n) for k in (3, 4, 5)]
        compute_s = train_flops / (profile.flops_per_s * share) * jitter[0]
        download_s = bytes_down / down * jitter[1]
        upload_s = bytes_up / up * jitter[2]
        latency = profile.latency_s
        total = compute_s + download_s + upload_s + 2.0 * latency
        energy = profile.compute_power_w * compute_s + profile.radio_power_w * (download_s + upload_s)
        return Cost(
            compute_s=compute_s,
            download_s=download_s,
            upload_s=upload_s,
            latency_s=latency,
            total_s=total,
            energy_j=energy,
            train_flops=int(train_flops),
            bytes_down=int(bytes_down),
            bytes_up=int(bytes_up),
            cpu_load=1.0 - share,
            download_bps=down,
            upload_bps=up,
        )


def measured(profile: DeviceProfile, cost: Cost, compute_s: float) -> Cost:
    """``cost`` with the compute seconds a device measured (``devices.mode: real``): the round
    time, the energy and what the device reports use them; communication stays simulated."""
    total = compute_s + cost.download_s + cost.upload_s + 2.0 * cost.latency_s
    energy = profile.compute_power_w * compute_s + profile.radio_power_w * (cost.download_s + cost.upload_s)
    return dataclasses.replace(cost, compute_s=float(compute_s), total_s=total, energy_j=energy)


@dataclass(frozen=True)
class Spent:
    """What a device spent on a dispatch it did not finish."""

    energy_j: float
    train_flops: int
    bytes_down: int
    bytes_up: int


def cut_at(profile: DeviceProfile, cost: Cost, elapsed_s: float) -> Spent:
    """What a device has done ``elapsed_s`` seconds into a dispatch (a round deadline): the
    phases run one after another -- latency, download, compute, upload, latency -- and a phase
    cut part-way counts that part (bytes, FLOPs and energy in proportion)."""
    e = max(0.0, float(elapsed_s)) - cost.latency_s
    down = min(1.0, max(0.0, e / cost.download_s)) if cost.download_s > 0 else float(e >= 0)
    e -= cost.download_s
    work = min(1.0, max(0.0, e / cost.compute_s)) if cost.compute_s > 0 else float(e >= 0)
    e -= cost.compute_s
    up = min(1.0, max(0.0, e / cost.upload_s)) if cost.upload_s > 0 else float(e >= 0)
    energy = (profile.radio_power_w * (down * cost.download_s + up * cost.upload_s)
              + profile.compute_power_w * work * cost.compute_s)
    return Spent(energy, int(work * cost.train_flops), int(round(down * cost.bytes_down)),
                 int(round(up * cost.bytes_up)))


def partial(profile: DeviceProfile, cost: Cost, compute_fraction: float) -> tuple[float, int]:
    """(energy J, training FLOPs) a device spent on a dispatch it abandoned (a dropout, or a round
    deadline) after downloading the model and doing ``compute_fraction`` of its compute."""
    energy = profile.radio_power_w * cost.download_s + profile.compute_power_w * compute_fraction * cost.compute_s
    return energy, int(compute_fraction * cost.train_flops)


class ServerLink:
    """The server's link on the virtual clock, shared by the transfers that overlap.

    Our model (deterministic, one pass): when a batch of dispatches starts, each transfer's
    interval is first computed with the link to itself; a transfer then shares the link with
    every other transfer *in the same direction* whose interval overlaps its own -- the other
    transfers of the batch and those already scheduled -- and gets ``shared_server_bps /
    (1 + overlaps)`` (if its own link is not slower). Transfers already scheduled keep their
    times (a new transfer takes only its fair share of what is left, it does not slow the ones
    in progress). A synchronous round's downloads all start together: with ``m`` clients each
    gets ``1/m`` of the link.
    """

    def __init__(self):
        self.down: list[tuple[float, float]] = []
        self.up: list[tuple[float, float]] = []

    def prune(self, t: float) -> None:
        """Forget transfers that ended before ``t`` (the virtual clock only moves forward)."""
        self.down = [iv for iv in self.down if iv[1] > t]
        self.up = [iv for iv in self.up if iv[1] > t]

    @staticmethod
    def _count(iv, batch, scheduled, skip: int) -> int:
        a, b = iv
        n = sum(1 for j, (s, e) in enumerate(batch) if j != skip and s < b and a < e and e > s)
        return n + sum(1 for s, e in scheduled if s < b and a < e and e > s)

    def shares(self, downs, ups) -> list[tuple[int, int]]:
        """``(concurrent downloads, concurrent uploads)`` for each transfer pair of a batch."""
        return [(1 + self._count(d, downs, self.down, i), 1 + self._count(u, ups, self.up, i))
                for i, (d, u) in enumerate(zip(downs, ups))]

    def add(self, downs, ups) -> None:
        self.down.extend(iv for iv in downs if iv[1] > iv[0])
        self.up.extend(iv for iv in ups if iv[1] > iv[0])


def transfer_intervals(cost: Cost, t_start: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(download, upload)`` intervals of a dispatch on the virtual clock."""
    d0 = t_start + cost.latency_s
    u0 = d0 + cost.download_s + cost.compute_s
    return (d0, d0 + cost.download_s), (u0, u0 + cost.upload_s)


# ----------------------------------------------------------------------------- battery


def drain(level: float, energy_j: float, capacity_j: float) -> float:
    """Battery fraction after spending ``energy_j``; never below 0. ``capacity_j = inf``: unchanged."""
    if math.isinf(capacity_j):
        return level
    return max(0.0, level - energy_j / capacity_j)


def recharge(level: float, seconds: float, recharge_w: float, capacity_j: float) -> float:
    """Battery fraction after charging at ``recharge_w`` for ``seconds``; never above 1."""
    if math.isinf(capacity_j):
        return level
    return min(1.0, level + recharge_w * seconds / capacity_j)


# ----------------------------------------------------------------------------- availability

_ONOFF_BATCH = 64  # on+off cycles per generator batch


@functools.lru_cache(maxsize=8192)
def _onoff_batch(
    seed: int, client_id: int, availability: float, cycle_s: float, first_on: bool, batch: int
) -> np.ndarray:
    """Cumulative end times (relative to the batch start) of 2*_ONOFF_BATCH alternating periods,
    starting with an "on" period when ``first_on``."""
    rng = np.random.default_rng([seed, PURPOSE_AVAIL, client_id, batch])
    on, off = availability * cycle_s, (1.0 - availability) * cycle_s
    means = np.tile([on, off] if first_on else [off, on], _ONOFF_BATCH)
    ends = np.cumsum(rng.standard_exponential(2 * _ONOFF_BATCH) * means)
    ends.setflags(write=False)
    return ends


@functools.lru_cache(maxsize=8192)
def _first_on(seed: int, client_id: int, availability: float) -> bool:
    return bool(np.random.default_rng([seed, PURPOSE_AVAIL_START, client_id]).random() < availability)


def _onoff_state(seed: int, client_id: int, availability: float, cycle_s: float, t: float) -> bool:
    # The first period is "on" or "off" with the stationary probability; periods are exponential
    # (memoryless), so the process is stationary from t = 0. "on" periods have mean
    # availability * cycle_s and "off" periods (1 - availability) * cycle_s.
    first_on = _first_on(seed, client_id, availability)
    start, batch = 0.0, 0
    while True:
        ends = _onoff_batch(seed, client_id, availability, cycle_s, first_on, batch)
        if t < start + ends[-1]:
            k = int(np.searchsorted(ends, t - start, side="right"))  # index of the period holding t
            # A batch holds an even number of periods, so every batch starts in the first state.
            return (k % 2 == 0) == first_on
        start += float(ends[-1])
        batch += 1


def is_available(profile: DeviceProfile, t: float, seed: int) -> bool:
    """Availability without a trace, deterministic from (seed, client_id, t).

    Explicit ``windows`` win; else the seeded alternating on/off process with exponential
    periods (fraction ``availability`` of the time on, mean cycle ``availability_cycle_s``).
    """
    seed = _check_key("seed", seed)
    t = max(float(t), 0.0)
    if profile.windows:
        if profile.windows_period_s > 0:
            t = math.fmod(t, profile.windows_period_s)
        return any(a <= t < b for a, b in profile.windows)
    if profile.availability >= 1.0:
        return True
    if profile.availability <= 0.0:
        return False
    return _onoff_state(seed, profile.client_id, profile.availability, profile.availability_cycle_s, t)


def available(profile: DeviceProfile, t: float, battery_level: float, *, seed: int, low: float = 0.05) -> bool:
    """May ``profile`` be selected at virtual time ``t``?

    Availability comes from the trace when the profile has one, else from ``is_available``.
    Battery: the trace's ``battery_level`` when present, else ``battery_level`` (the simulated
    level the caller tracks); the device is unavailable when that level is below ``low``.
    Mains-powered devices (``battery_j = inf``) without a battery column are never limited.
    """
    level: float | None = battery_level if not math.isinf(profile.battery_j) else None
    if profile.trace is not None:
        cond = profile.trace.at(t)
        on = cond["available"]
        if cond["battery_level"] is not None:
            level = cond["battery_level"]
    else:
        on = is_available(profile, t, seed)
    return bool(on and (level is None or level >= low))


def dropout_point(profile: DeviceProfile, *, seed: int, round_key: int) -> float | None:
    """Does this dispatch drop mid-training? None if not, else the fraction (0..1) of the
    compute done when it drops. Drawn with probability ``dropout_prob`` from
    ``default_rng([seed, PURPOSE_DROPOUT, client_id, round_key])``."""
    seed = _check_key("seed", seed)
    round_key = _check_key("round_key", round_key)
    if profile.dropout_prob <= 0:  # the draw could not drop: skip building its generator
        return None
    u = np.random.default_rng([seed, PURPOSE_DROPOUT, profile.client_id, round_key]).random(2)
    return float(u[1]) if u[0] < profile.dropout_prob else None


# ----------------------------------------------------------------------------- stragglers


def is_slow(profile: DeviceProfile) -> bool:
    """SDIR's slow device: relative ``speed`` below 0.8."""
    return profile.speed < SLOW_SPEED


def straggler_mask(times, gamma: float = 1.5) -> np.ndarray:
    """``t_i > gamma * median(times)`` per entry (bool array; empty in, empty out)."""
    t = np.asarray(times, dtype=np.float64)
    if t.size == 0:
        return np.zeros(0, dtype=bool)
    return t > gamma * float(np.median(t))
