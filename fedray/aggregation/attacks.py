"""What a malicious client sends (pure; simulation of model poisoning).

:func:`craft` replaces the rows of the malicious updates of one aggregation in a
:class:`~fedray.aggregation.robust.Stack` (moves of the model, see there). ALIE and IPM use
the honest updates of the same aggregation, as their papers do (an omniscient attacker), so
the simulation crafts them at the aggregator: ALIE and IPM at aggregation time over the
buffer (after the norm guard and clipping saw the attacker's honest update, which a real
attacker would craft to pass them anyway), the others before the buffer, where the crafted
update meets the norm guard and clipping like any other. Label flipping is data poisoning: the client trains on flipped labels
(:func:`flip_labels`) and sends what it trained.

- ``sign_flip``: ``-u``; ``scale``: ``lambda u``; ``noise``: ``N(0, sigma^2)`` on every
  coordinate it covers (the honest update is discarded);
- ``alie`` (Baruch et al. 2019): per coordinate ``mu - z sd`` of the honest covering
  values (population std), ``z`` by default the paper's ``z_max = Phi^-1((n - s) / n)``,
  ``s = floor(n / 2 + 1) - f`` with ``n`` updates of which ``f`` malicious;
- ``ipm`` (Xie et al. 2020): ``-epsilon mu``.

Where no honest update covers a coordinate, ALIE and IPM send their own honest value there;
an aggregation without honest updates (FedAsync aggregates one at a time) leaves them honest.
"""
from __future__ import annotations

import math

import numpy as np

from fedray.aggregation.robust import Stack, weighted_mean

__all__ = ["MODEL_POISONING", "SELF_CONTAINED", "craft", "alie_z", "flip_labels"]

MODEL_POISONING = ("sign_flip", "scale", "noise", "alie", "ipm")
SELF_CONTAINED = ("sign_flip", "scale", "noise")  # need no other update: crafted before the buffer


def alie_z(n: int, f: int) -> float:
    """The paper's ``z_max`` for ``n`` updates of which ``f`` are malicious."""
    from scipy.stats import norm

    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    return float(norm.ppf(min(max(p, 1e-12), 1 - 1e-12)))


def _honest_stats(s: Stack, honest: np.ndarray):
    h = s.take(np.flatnonzero(honest))
    h.w = np.ones(h.n)
    mu = weighted_mean(h)
    var = weighted_mean(Stack({k: (v - mu[k][None, :]) ** 2 * h.covered(k) for k, v in h.u.items()}, h.cover, h.w))
    return mu, {k: np.sqrt(v) for k, v in var.items()}, {k: h.count(k) for k in h.u}


def craft(kind: str, s: Stack, malicious: np.ndarray, *, scale: float = 10.0, sigma: float = 1.0,
          z: float | None = None, epsilon: float = 0.1, rngs=None) -> Stack:
    """``s`` with the rows where ``malicious`` is True replaced by what the attack sends.
    ``rngs[i]``: the generator of row ``i``'s noise (``noise`` only)."""
    malicious = np.asarray(malicious, bool)
    if kind not in MODEL_POISONING or not malicious.any():
        return s
    u = {k: v.copy() for k, v in s.u.items()}
    rows = np.flatnonzero(malicious)
    if kind in ("alie", "ipm"):
        honest = ~malicious
        if not honest.any():
            return s
        mu, sd, cnt = _honest_stats(s, honest)
        zz = alie_z(s.n, int(malicious.sum())) if z is None else float(z)
    for i in rows:
        for k, v in u.items():
            cov = s.covered(k)[i]
            if kind == "sign_flip":
                v[i] = -v[i]
            elif kind == "scale":
                v[i] = scale * v[i]
            elif kind == "noise":
                v[i] = np.where(cov, rngs[i].normal(0.0, sigma, v.shape[1]), 0.0)
            else:
                target = mu[k] - zz * sd[k] if kind == "alie" else -epsilon * mu[k]
                v[i] = np.where(cov & (cnt[k] > 0), target, v[i])
    return Stack(u, s.cover, s.w)


def flip_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Label flipping: class ``c`` becomes ``num_classes - 1 - c``."""
    if hasattr(y, "flipped"):  # generated on demand (fedray.data.users)
        return y.flipped(num_classes)
    return (num_classes - 1 - np.asarray(y)).astype(np.asarray(y).dtype, copy=False)
