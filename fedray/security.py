"""The ``defense:``, ``attack:`` and ``privacy:`` config sections, their cross-checks, and the
seeded set of malicious clients. What they do is in :mod:`fedray.aggregation.defense`,
:mod:`fedray.aggregation.attacks` and :mod:`fedray.privacy`; ``docs/robustness.md`` says what
each rule means for masked and stale updates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedray.errors import ConfigError
from fedray.params import NONNEG, POS, UNIT, _f

__all__ = ["DefenseConfig", "AttackConfig", "PrivacyConfig", "RULES", "ATTACKS", "check", "malicious_clients",
           "expected_updates", "malicious_set"]

RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "centered_clipping")
ATTACKS = ("none", "sign_flip", "scale", "noise", "label_flip", "alie", "ipm")
HALF = (lambda v: 0 <= v < 0.5, "in [0, 0.5)")
OPEN_UNIT = (lambda v: 0 < v < 1, "in (0, 1)")


@dataclass(frozen=True)
class DefenseConfig:
    norm_guard: float | None = _f(50.0, check=POS, doc="reject (reason norm) an update whose L2 move exceeds this "
                                  "multiple of the median of recent updates' (null: off)")
    norm_window: int = _f(100, check=POS, doc="recent update norms the guard and the adaptive clip look at")
    clip: str = _f("none", choices=("none", "fixed", "adaptive"), doc="norm clipping before the rule")
    clip_bound: float = _f(1.0, check=POS, doc="clip: fixed: the L2 bound C")
    clip_quantile: float = _f(0.5, check=OPEN_UNIT, doc="clip: adaptive: C = this quantile of recent norms")
    rule: str = _f("mean", choices=RULES, doc="the robust rule in place of the method's mean")
    beta: float = _f(0.1, check=HALF, doc="trimmed_mean: fraction trimmed at each end")
    f: int = _f(1, check=NONNEG, doc="krum / multi_krum: attackers tolerated (needs n > 2f + 2)")
    m: int | None = _f(None, check=POS, doc="multi_krum: updates kept (null: n - f)")
    nu: float = _f(1e-6, check=POS, doc="geometric_median: smoothing")
    iters: int = _f(10, check=POS, doc="geometric_median / centered_clipping: iterations")
    tau: float | None = _f(None, check=POS, doc="centered_clipping: radius (null: the median norm of "
                               "recent accepted updates)")
    min_coverage: int = _f(3, check=POS, doc="masked updates: a coordinate covered by fewer updates is not "
                           "given to the rule")
    low_coverage: str = _f("keep", choices=("keep", "mean"), doc="such a coordinate keeps its value, or takes the mean")


@dataclass(frozen=True)
class AttackConfig:
    kind: str = _f("none", choices=ATTACKS, doc="what the malicious clients do")
    fraction: float = _f(0.0, check=UNIT, doc="share of the clients that are malicious (seeded)")
    clients: tuple[int, ...] | None = _f(None, doc="the malicious clients by id (instead of fraction)")
    scale: float = _f(10.0, doc="scale: the factor lambda")
    sigma: float = _f(1.0, check=POS, doc="noise: std of the Gaussian update sent")
    z: float | None = _f(None, doc="alie: std multiplier (null: the paper's z_max from n and f)")
    epsilon: float = _f(0.1, check=POS, doc="ipm: the update sent is -epsilon x the honest mean")
    examples: float = _f(1.0, check=POS, doc="malicious clients report this many times their example count")


@dataclass(frozen=True)
class PrivacyConfig:
    noise_multiplier: float = _f(0.0, check=NONNEG, doc="z: Gaussian noise std / clip (0: no DP)")
    mode: str = _f("central", choices=("central", "local"), doc="noise added by the server or by each client")
    clip: float = _f(1.0, check=POS, doc="client-level L2 clip C (the initial one when adaptive)")
    adaptive: bool = _f(False, doc="adaptive clipping (Andrew et al. 2021), central mode")
    target_quantile: float = _f(0.5, check=OPEN_UNIT, doc="adaptive: the norm quantile C tracks")
    clip_lr: float = _f(0.2, check=POS, doc="adaptive: geometric step of C")
    count_noise: float | None = _f(None, check=POS, doc="adaptive: std of the noised clipped count (null: m/20)")
    delta: float = _f(1e-5, check=OPEN_UNIT, doc="the delta epsilon is reported at")
    accountant: str = _f("rdp", choices=("rdp", "pld"), doc="dp-accounting accountant")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def central(self) -> bool:
        return self.enabled and self.mode == "central"

    @property
    def local(self) -> bool:
        return self.enabled and self.mode == "local"


def expected_updates(cfg) -> int | None:
    """Updates per aggregation the method is built for (None: not known before the run)."""
    from fedray.methods import registry

    return registry.get(cfg.method.name).updates_per_aggregation(cfg)


def check(cfg) -> None:
    """Cross-checks of the three sections (raise ``ConfigError`` naming the field)."""
    d, a, p = cfg.defense, cfg.attack, cfg.privacy
    n = expected_updates(cfg)
    if d.rule in ("krum", "multi_krum") and n is not None and n <= 2 * d.f + 2:
        raise ConfigError("defense.f", f"{d.rule} with f={d.f} needs more than 2f+2 = {2 * d.f + 2} updates per "
                                       f"aggregation; {cfg.method.name} aggregates {n} (lower f or raise them)")
    if d.rule == "multi_krum" and d.m is not None and n is not None and d.m > n:
        raise ConfigError("defense.m", f"must be <= the {n} updates per aggregation, got {d.m}")
    if d.rule != "mean" and n is not None and n < d.min_coverage:
        raise ConfigError("defense.rule", f"{d.rule} over {n} update(s) per aggregation is no defence "
                                          f"(defense.min_coverage is {d.min_coverage}); use clipping or the guard")
    if a.clients is not None:
        bad = [c for c in a.clients if not 0 <= int(c) < cfg.data.num_clients]
        if bad:
            raise ConfigError("attack.clients", f"client {bad[0]} is not in 0..{cfg.data.num_clients - 1}")
    if a.kind == "label_flip" and cfg.task.name != "classification":
        raise ConfigError("attack.kind", f"label_flip needs a classification task, not {cfg.task.name!r}")
    if p.enabled:
        if d.rule != "mean" or d.clip != "none":
            raise ConfigError("privacy", "DP clips and noises the plain sum; it cannot be combined with "
                                         f"defense.rule={d.rule!r} / defense.clip={d.clip!r}")
        if p.mode == "central" and n is None:
            raise ConfigError("privacy.mode", f"central DP divides by the expected updates per aggregation, which "
                                              f"{cfg.method.name} does not fix; use privacy.mode: local")
        if p.adaptive and p.mode != "central":
            raise ConfigError("privacy.adaptive", "adaptive clipping is a central-DP mechanism")
        if p.adaptive and n is not None:
            sigma_b = p.count_noise if p.count_noise is not None else n / 20
            if p.noise_multiplier >= 2 * sigma_b:
                raise ConfigError("privacy.count_noise", f"adaptive clipping needs noise_multiplier < 2 x count_noise "
                                                         f"= {2 * sigma_b:g} (the count's share), got "
                                                         f"{p.noise_multiplier:g}; raise count_noise")
    if cfg.server.target_epsilon is not None and not p.enabled:
        raise ConfigError("server.target_epsilon", "needs privacy.noise_multiplier > 0")


def malicious_set(cfg) -> frozenset[int]:
    """:func:`malicious_clients` as a set, for membership tests."""
    return frozenset(int(c) for c in malicious_clients(cfg))


def malicious_clients(cfg) -> np.ndarray:
    """Sorted ids of the malicious clients: ``attack.clients``, or a seeded sample of
    ``round(fraction x num_clients)`` (empty without an attack)."""
    a = cfg.attack
    if a.kind == "none":
        return np.empty(0, dtype=np.int64)
    if a.clients is not None:
        return np.unique(np.asarray(a.clients, dtype=np.int64))
    from fedray import seeding

    n = cfg.data.num_clients
    k = int(round(a.fraction * n))
    return np.sort(seeding.rng(cfg.seed, "attack").choice(n, size=k, replace=False)).astype(np.int64)
