"""The run's device population as columns: a tier index per client, everything else on demand.

A population of ten million clients cannot be ten million :class:`DeviceProfile` objects
(about 2 KiB each). :class:`Population` keeps one ``int8``/``int16`` tier index per client
and derives the rest when it is asked for:

- ``pop[c]`` is client ``c``'s :class:`~fedray.devices.profile.DeviceProfile`, built on demand
  (and cached) from its tier, its own uniform draws and its trace. The loop asks only for the
  clients it selects, so a round costs O(clients selected), not O(clients registered).
- ``pop.column(name)`` is one field for every client as an array, computed vectorised (in
  chunks) once and cached; ``pop.tier_names`` and ``pop.slow`` likewise. A field that is the
  same for a whole tier (a degenerate range, a tier constant) is never drawn.

Draws: client ``c``'s five uniforms are outputs ``5c .. 5c + 4`` of one PCG64 stream seeded by
``SeedSequence([seed, PURPOSE_PROFILE])`` (``u[0]`` speed, ``u[1]``/``u[2]`` the mean
download/upload bandwidths when drawn, ``u[3]`` the starting battery level, ``u[4]`` spare).
One client's row is read by advancing a copy of the stream (``PCG64.advance``, O(1)); a whole
column by generating the stream in chunks: both give the same numbers. (Before the columnar
population every client had its own generator, ``default_rng([seed, PURPOSE_PROFILE, c])``;
populations whose tiers draw nothing -- the homogeneous default -- are unchanged.)
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

from fedray.devices.profile import SLOW_SPEED, DeviceProfile, PopulationSpec, TierSpec, _lerp, tier_counts
from fedray.devices.traces import read_traces
from fedray.errors import ConfigError

__all__ = ["Population", "assign_tiers", "build_population", "PURPOSE_PROFILE", "PURPOSE_TIERS", "DRAWS"]

PURPOSE_TIERS = 0xDE01
PURPOSE_PROFILE = 0xDE02
DRAWS = 5  # uniforms per client
_CHUNK = 1 << 20  # clients per chunk when a column is drawn
_DRAWN = {"speed": ("speed_range", 0), "battery_level": ("battery_level_range", 3)}


class Population(Sequence):
    """Device profiles of ``n`` clients drawn from a :class:`~fedray.devices.profile.PopulationSpec`."""

    def __init__(self, n: int, spec, seed: int, tier_index: np.ndarray):
        self.n, self.spec, self.seed = int(n), spec, int(seed)
        self.tier_index = tier_index
        self.tier_names = tuple(t.name for t in spec.tiers)
        self.traces = read_traces(spec.trace_path) if spec.trace_path is not None else None
        self.trace_ids = sorted(self.traces) if self.traces is not None else []
        self._bits = np.random.PCG64(np.random.SeedSequence([self.seed, PURPOSE_PROFILE]))
        self._start = self._bits.state
        self._cache: dict[int, object] = {}
        self._columns: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------ one client
    def __len__(self) -> int:
        return self.n

    def __getitem__(self, c):
        if isinstance(c, slice):
            return [self[i] for i in range(*c.indices(self.n))]
        c = int(c)
        if not 0 <= c < self.n:
            raise IndexError(f"client {c} out of range (population of {self.n})")
        p = self._cache.get(c)
        if p is None:
            if len(self._cache) >= 1 << 16:  # a bounded cache: profiles are cheap to rebuild
                self._cache.clear()
            p = self._cache[c] = self._profile(c, self.uniforms(c))
        return p

    def __iter__(self) -> Iterator:
        return (self[c] for c in range(self.n))

    def uniforms(self, c: int) -> np.ndarray:
        """Client ``c``'s ``DRAWS`` uniforms (the stream advanced to its row)."""
        self._bits.state = self._start
        self._bits.advance(DRAWS * int(c))
        return np.random.Generator(self._bits).random(DRAWS)

    def tier_of(self, c: int) -> str:
        return self.tier_names[int(self.tier_index[c])]

    def trace_of(self, c: int):
        return None if self.traces is None else self.traces[self.trace_ids[int(c) % len(self.trace_ids)]]

    def _linear(self, c):
        return c / (self.n - 1) if self.n > 1 else 0.0 * c

    def _profile(self, c: int, u: np.ndarray):
        spec = self.spec
        tier = spec.tiers[int(self.tier_index[c])]
        speed = _lerp(tier.speed_range, u[0])
        if spec.link_means == "tier":
            down, up = _lerp(tier.download_bps_range, u[1]), _lerp(tier.upload_bps_range, u[2])
        elif spec.link_means == "linear":
            x = self._linear(c)
            down, up = _lerp(spec.download_bps_range, x), _lerp(spec.upload_bps_range, x)
        elif spec.link_means == "client":
            down, up = spec.download_bps_means[c], spec.upload_bps_means[c]
        else:
            down, up = _lerp(spec.download_bps_range, u[1]), _lerp(spec.upload_bps_range, u[2])
        battery_level = _lerp(tier.battery_level_range, u[3])
        cpu_load = spec.cpu_load
        trace = self.trace_of(c)
        if trace is not None:
            if trace.speed is not None:
                speed = trace.speed
            down, up = float(trace.download_bps.mean()), float(trace.upload_bps.mean())
            cpu_load = float(trace.cpu_load.mean())
            if trace.battery_level is not None:
                battery_level = float(trace.battery_level[0])
        return DeviceProfile(
            client_id=c, tier=tier.name, speed=speed, flops_per_s=speed * spec.reference_flops,
            memory_mb=tier.memory_mb, download_bps=down, upload_bps=up, latency_s=tier.latency_s,
            compute_power_w=tier.compute_power_w, radio_power_w=tier.radio_power_w, battery_j=tier.battery_j,
            battery_level=battery_level, recharge_w=tier.recharge_w, resources=dict(tier.resources),
            num_cpus=tier.num_cpus, num_gpus=tier.num_gpus, cpu_load=cpu_load, load_sigma=spec.load_sigma,
            bw_sigma=spec.bw_sigma if spec.link == "lognormal" else 0.0, availability=spec.availability,
            availability_cycle_s=spec.availability_cycle_s, dropout_prob=spec.dropout_prob, trace=trace)

    # ------------------------------------------------------------ whole columns
    def _drawn(self, range_name: str, j: int) -> np.ndarray:
        """``lerp(tier range, u[j])`` for every client; tiers with a degenerate range draw nothing."""
        lo = np.array([float(getattr(t, range_name)[0]) for t in self.spec.tiers])
        hi = np.array([float(getattr(t, range_name)[1]) for t in self.spec.tiers])
        out = lo[self.tier_index]
        if np.all(lo == hi):
            return out
        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, PURPOSE_PROFILE])))
        for a in range(0, self.n, _CHUNK):
            b = min(self.n, a + _CHUNK)
            u = gen.random((b - a, DRAWS))[:, j]
            t = self.tier_index[a:b]
            out[a:b] = lo[t] + u * (hi[t] - lo[t])  # the same arithmetic as profile._lerp
        return out

    def column(self, name: str) -> np.ndarray:
        """Field ``name`` of every client's profile (``speed``, ``battery_level``, or a tier field)."""
        col = self._columns.get(name)
        if col is not None:
            return col
        if name in _DRAWN:
            col = self._drawn(*_DRAWN[name])
            for i, tid in enumerate(self.trace_ids):  # a trace's value replaces the draw
                tr = self.traces[tid]
                v = tr.speed if name == "speed" else (None if tr.battery_level is None else float(tr.battery_level[0]))
                if v is not None:
                    col[i::len(self.trace_ids)] = v
        else:
            col = np.array([getattr(t, name) for t in self.spec.tiers])[self.tier_index]
        col.setflags(write=False)
        self._columns[name] = col
        return col

    @property
    def slow(self) -> np.ndarray:
        """SDIR's slow devices (``speed < 0.8``), one bool per client."""
        if "slow" not in self._columns:
            s = self.column("speed") < SLOW_SPEED
            s.setflags(write=False)
            self._columns["slow"] = s
        return self._columns["slow"]

    def tiers_present(self) -> list[str]:
        """The names of the tiers that have clients, in the order of ``spec.tiers``."""
        counts = np.bincount(self.tier_index, minlength=len(self.tier_names))
        return [name for name, k in zip(self.tier_names, counts) if k]

    def first_of_tier(self) -> dict:
        """``{tier name: the profile of its first client}``, tiers in order of their first client."""
        out: dict = {}
        firsts = {}
        for i in range(len(self.tier_names)):
            hit = np.flatnonzero(self.tier_index == i)
            if hit.size:
                firsts[int(hit[0])] = self.tier_names[i]
        for c in sorted(firsts):
            out[firsts[c]] = self[c]
        return out

    def always_on(self) -> np.ndarray:
        """Per tier: mains powered, no trace, always online (nothing to check before selecting)."""
        s = self.spec
        return np.array([self.traces is None and s.availability >= 1.0 and math.isinf(t.battery_j)
                         for t in s.tiers], dtype=bool)


def assign_tiers(num_clients: int, tiers: tuple[TierSpec, ...], seed: int, by_id: bool = False) -> np.ndarray:
    """Tier index per client (``int8``, ``int16`` beyond 127 tiers): exact counts
    (``tier_counts``), seeded permutation (``by_id``: consecutive ids, tiers in order)."""
    counts = tier_counts(num_clients, [t.fraction for t in tiers])
    labels = np.repeat(np.arange(len(tiers), dtype=np.int8 if len(tiers) < 128 else np.int16), counts)
    if by_id:
        return labels
    rng = np.random.default_rng([seed, PURPOSE_TIERS])
    return rng.permutation(labels)


def build_population(num_clients: int, spec: PopulationSpec, seed: int):
    """The :class:`~fedray.devices.columns.Population` of ``num_clients`` clients (ids
    ``0..n-1``) drawn from ``spec``, deterministic by ``seed``; ``pop[c]`` is a profile."""
    if int(num_clients) != num_clients or num_clients <= 0:
        raise ConfigError("num_clients", f"must be a positive integer, got {num_clients!r}")
    if int(seed) != seed or seed < 0:
        raise ConfigError("seed", f"must be a non-negative integer, got {seed!r}")
    n = int(num_clients)
    spec.check_size(n, fld="num_clients")
    return Population(n, spec, int(seed), assign_tiers(n, spec.tiers, int(seed), by_id=spec.tier_order == "id"))
