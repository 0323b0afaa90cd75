"""Byzantine-robust aggregation rules: pure, masked-aware, weighted (numpy only).

Every rule works on a :class:`Stack`: the ``n`` updates of one aggregation as *moves* of the
model (deltas; a client that sent trained values is measured against the current model),
their coverage masks and their weights (the weight the method gives each update in its mean:
example counts, times the staleness factor for asynchronous methods).

Masked updates. A coordinate is aggregated over the updates whose mask covers it, and only
those: the per-coordinate rules (median, trimmed mean) sort and trim the covering values; the
vector rules (geometric median, centered clipping) measure each update's distance to the
estimate over its own mask and average each coordinate over its covering updates. Krum
compares the updates as moves of the whole model (an uncovered coordinate is a zero move).
A coordinate covered by fewer than ``min_coverage`` updates is not trusted to any rule:
``low="keep"`` leaves it where it is (zero move), ``low="mean"`` falls back to the weighted
mean of its covering updates. A coordinate nobody covers does not move.

Each rule returns ``{key: move}`` (float64, the key's flat size); :func:`multi_krum` returns
the indices of the selected updates instead (the method then averages those).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

__all__ = ["Stack", "clip_factors", "weighted_mean", "coordinate_median", "trimmed_mean", "krum_scores",
           "multi_krum", "geometric_median", "centered_clipping", "low_coverage", "norm_quantile"]


@dataclass
class Stack:
    """``u[k]``: (n, size) moves, zero where uncovered; ``cover[k]``: (n, size) bool, or None
    when every update covers all of ``k``; ``w``: (n,) non-negative weights."""

    u: dict[str, np.ndarray]
    cover: dict[str, np.ndarray | None]
    w: np.ndarray

    @property
    def n(self) -> int:
        return len(self.w)

    def covered(self, k: str) -> np.ndarray:
        c = self.cover.get(k)
        return np.ones(self.u[k].shape, bool) if c is None else c

    def count(self, k: str) -> np.ndarray:
        c = self.cover.get(k)
        return np.full(self.u[k].shape[1], self.n) if c is None else c.sum(axis=0)

    def norms(self) -> np.ndarray:
        """L2 norm of each update (over what it covers)."""
        sq = np.zeros(self.n)
        for v in self.u.values():
            sq += np.einsum("ij,ij->i", v, v)
        return np.sqrt(sq)

    def scaled(self, factors: np.ndarray) -> "Stack":
        return Stack({k: v * factors[:, None] for k, v in self.u.items()}, self.cover, self.w)

    def take(self, idx) -> "Stack":
        idx = np.asarray(idx, dtype=np.int64)
        return Stack({k: v[idx] for k, v in self.u.items()},
                     {k: (None if c is None else c[idx]) for k, c in self.cover.items()}, self.w[idx])


def clip_factors(norms: np.ndarray, bound: float) -> np.ndarray:
    """``min(1, C / ||u||)`` per update (1 for a zero update)."""
    norms = np.asarray(norms, dtype=np.float64)
    return np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def norm_quantile(norms, q: float) -> float:
    """The ``q`` quantile of recent norms (the adaptive clipping bound)."""
    return float(np.quantile(np.asarray(norms, dtype=np.float64), q))


def weighted_mean(s: Stack) -> dict[str, np.ndarray]:
    out = {}
    for k, v in s.u.items():
        cw = s.covered(k) * s.w[:, None]
        tot = cw.sum(axis=0)
        out[k] = np.divide((cw * v).sum(axis=0), tot, out=np.zeros(v.shape[1]), where=tot > 0)
    return out


def _sorted(s: Stack, k: str):
    """Per coordinate: the covering values ascending (uncovered last, as +inf), their weights
    (0 for uncovered) and the covering count."""
    cov = s.covered(k)
    x = np.where(cov, s.u[k], np.inf)
    order = np.argsort(x, axis=0, kind="stable")
    xs = np.take_along_axis(x, order, axis=0)
    ws = np.take_along_axis(cov * s.w[:, None], order, axis=0)
    return xs, ws, cov.sum(axis=0)


def coordinate_median(s: Stack) -> dict[str, np.ndarray]:
    """Weighted median of the covering values of each coordinate: the value where the
    cumulative weight reaches half the total; on an exact tie the midpoint of the two values
    around it (so equal weights give ``np.median``)."""
    out = {}
    for k in s.u:
        xs, ws, cnt = _sorted(s, k)
        cum = np.cumsum(ws, axis=0)
        half = cum[-1] / 2
        lo = np.argmax(cum >= half * (1 - 1e-12), axis=0)  # first index reaching half the weight
        cols = np.arange(xs.shape[1])
        tie = np.isclose(cum[lo, cols], half, rtol=1e-12, atol=0) & (lo + 1 < cnt)
        hi = np.where(tie, np.minimum(lo + 1, xs.shape[0] - 1), lo)
        med = (xs[lo, cols] + xs[hi, cols]) / 2
        out[k] = np.where(cnt > 0, med, 0.0)
    return out


def trimmed_mean(s: Stack, beta: float) -> dict[str, np.ndarray]:
    """Per coordinate with ``c`` covering values: drop the ``floor(beta * c)`` smallest and
    largest, weighted mean of the rest."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed mean beta must be in [0, 0.5), got {beta!r}")
    out = {}
    for k in s.u:
        xs, ws, cnt = _sorted(s, k)
        cut = np.floor(beta * cnt).astype(np.int64)
        pos = np.arange(xs.shape[0])[:, None]
        keep = (pos >= cut) & (pos < cnt - cut)
        wk = np.where(keep, ws, 0.0)
        tot = wk.sum(axis=0)
        num = np.where(keep, xs, 0.0) * wk
        out[k] = np.divide(num.sum(axis=0), tot, out=np.zeros(xs.shape[1]), where=tot > 0)
    return out


def _pairwise(s: Stack) -> np.ndarray:
    d = np.zeros((s.n, s.n))
    for v in s.u.values():
        g = v @ v.T
        sq = np.diag(g)
        d += sq[:, None] + sq[None, :] - 2 * g
    return np.maximum(d, 0.0)


def krum_scores(s: Stack, f: int) -> np.ndarray:
    """Krum (Blanchard et al. 2017): each update's sum of squared distances to its
    ``n - f - 2`` nearest others. Needs ``n > 2f + 2``."""
    n = s.n
    if n <= 2 * f + 2:
        raise ValueError(f"Krum with f={f} needs more than 2f+2 = {2 * f + 2} updates, got {n}")
    d = _pairwise(s)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, : n - f - 2].sum(axis=1)


def multi_krum(s: Stack, f: int, m: int | None = None) -> np.ndarray:
    """The ``m`` updates with the lowest Krum scores (``m = 1``: Krum; None: ``n - f``),
    ascending index order; ties go to the lower index."""
    scores = krum_scores(s, f)
    m = s.n - f if m is None else int(m)
    if not 1 <= m <= s.n:
        raise ValueError(f"multi-Krum m must be in [1, {s.n}], got {m}")
    return np.sort(np.argsort(scores, kind="stable")[:m])


def _masked_dist(s: Stack, v: Mapping[str, np.ndarray]) -> np.ndarray:
    """Each update's distance to the estimate ``v`` over its own mask."""
    sq = np.zeros(s.n)
    for k, x in s.u.items():
        diff = (x - v[k][None, :]) * s.covered(k)
        sq += np.einsum("ij,ij->i", diff, diff)
    return np.sqrt(sq)


def _reweighted(s: Stack, beta: np.ndarray) -> Stack:
    return Stack(s.u, s.cover, beta)


def geometric_median(s: Stack, nu: float = 1e-6, iters: int = 10, tol: float = 1e-7) -> dict[str, np.ndarray]:
    """Smoothed Weiszfeld (RFA, Pillutla et al. 2022): from the coordinate-wise median (a
    robust start: from the mean, far outliers need many more rounds),
    ``v <- sum_i b_i u_i / sum_i b_i`` per coordinate over the covering updates, with
    ``b_i = w_i / max(nu, ||u_i - v||)``, until the move is below ``tol`` or ``iters`` rounds."""
    v = coordinate_median(s)
    for _ in range(iters):
        beta = s.w / np.maximum(nu, _masked_dist(s, v))
        nv = weighted_mean(_reweighted(s, beta))
        step = np.sqrt(sum(float(((nv[k] - v[k]) ** 2).sum()) for k in v))
        v = nv
        if step <= tol:
            break
    return v


def centered_clipping(s: Stack, tau: float | None, iters: int = 3,
                      center: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Centered clipping (Karimireddy et al. 2021): from ``center`` (the previous aggregate;
    None: no move), ``iters`` times ``v <- v + mean_i clip(u_i - v, tau)``, the mean weighted and
    per coordinate over the covering updates, each ``u_i - v`` clipped over its own mask.
    ``tau=None``: the median distance to ``v`` at each iteration."""
    v = {k: (np.array(center[k], dtype=np.float64) if center is not None and k in center
             and np.shape(center[k]) == (x.shape[1],) else np.zeros(x.shape[1])) for k, x in s.u.items()}
    for _ in range(iters):
        dist = _masked_dist(s, v)
        t = float(np.median(dist)) if tau is None else float(tau)
        f = clip_factors(dist, t)
        diffs = Stack({k: (x - v[k][None, :]) * s.covered(k) for k, x in s.u.items()}, s.cover, s.w)
        step = weighted_mean(diffs.scaled(f))
        v = {k: v[k] + step[k] for k in v}
    return v


def low_coverage(s: Stack, moves: dict[str, np.ndarray], min_coverage: int, low: str) -> dict[str, np.ndarray]:
    """Apply the minimum-coverage rule to a rule's ``moves``: coordinates covered by fewer than
    ``min_coverage`` updates keep their value (``low="keep"``: zero move) or take the weighted
    mean of their covering updates (``low="mean"``)."""
    if low not in ("keep", "mean"):
        raise ValueError(f"low must be 'keep' or 'mean', got {low!r}")
    mean = weighted_mean(s) if low == "mean" else None
    out = {}
    for k, r in moves.items():
        few = s.count(k) < min_coverage
        if not few.any():
            out[k] = r
        else:
            out[k] = np.where(few, mean[k] if mean is not None else 0.0, r)
    return out
