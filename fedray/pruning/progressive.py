"""PR-FL: density allocation, recovery schedule, importance and nested masks.

Pure pieces of PR-FL (pruning and recovery, buffered asynchronous FL); the
method module composes them with MaskFedAvg (:mod:`fedray.aggregation.rules`).

Stage 1 (allocate, :func:`allocate_densities`): ``tbar_i`` = mean of the last
``I`` round times of client ``i`` (:class:`RoundTimeFifo`);
``rho_i = max(min_j tbar_j / tbar_i, rho_min_i)``.

Stage 2 (recover): when the monitored accuracy plateaus
(:func:`plateau_update`), ``rho_min <- min(1, rho_min + delta_rho)``
(:func:`recovery_step`) and the densities are recomputed.

Masks (:func:`importance_scores`, :func:`nested_masks`): importance =
accumulated squared gradients normalised per upload; one global ordering with
a per-tensor floor; each density keeps a prefix so masks nest.

Distribution (:func:`residual_split`): the smallest submodel in full, then the
differences between consecutive nested ones (their bytes are counted by
:class:`fedray.channel.Channel`, like every other payload).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np

from fedray.pruning.magnitude import global_ranking, prefix_count, top_mask
from fedray.submodel.masks import Mask, is_subset

__all__ = ["RoundTimeFifo", "observed_time", "allocate_densities", "recovery_step", "Plateau", "plateau_update",
           "recover_on_plateau", "importance_scores", "nested_masks", "residual_split"]


# --------------------------------------------------------------------------- round times

@dataclass(frozen=True)
class RoundTimeFifo:
    """The last ``capacity`` (``I``) round times of every client; immutable.

    ``entries`` is a tuple of ``(client, times)`` sorted by client, oldest
    time first. :meth:`push` returns a new FIFO.
    """

    capacity: int
    entries: tuple[tuple[int, tuple[float, ...]], ...] = ()

    def __post_init__(self):
        if self.capacity < 1:
            raise ValueError(f"FIFO capacity must be >= 1, got {self.capacity}")

    def times(self, client: int) -> tuple[float, ...]:
        for c, ts in self.entries:
            if c == client:
                return ts
        return ()

    def push(self, client: int, round_s: float) -> "RoundTimeFifo":
        if not (math.isfinite(round_s) and round_s > 0):
            raise ValueError(f"round time of client {client} must be positive and finite, got {round_s}")
        d = dict(self.entries)
        d[int(client)] = (tuple(d.get(int(client), ())) + (float(round_s),))[-self.capacity:]
        return replace(self, entries=tuple(sorted(d.items())))

    def means(self) -> dict[int, float]:
        """``tbar_i`` for every client with at least one time."""
        return {c: float(np.mean(ts)) for c, ts in self.entries if ts}


def observed_time(telemetry: Mapping | None, source: str = "comm") -> float | None:
    """The time a device reported that allocates densities: its communication time
    (``comm_s``, source ``"comm"``, PR-FL's) or its whole round (``round_s``, source
    ``"round"``); None when it is missing, not finite or not positive."""
    t = (telemetry or {}).get("comm_s" if source == "comm" else "round_s")
    if t is None or not math.isfinite(t) or t <= 0:
        return None
    return float(t)


# --------------------------------------------------------------------------- densities

def allocate_densities(mean_times: Mapping[int, float] | Sequence[float] | np.ndarray,
                       rho_min: float | Sequence[float] | np.ndarray | Mapping[int, float]):
    """``rho_i = max(min_j tbar_j / tbar_i, rho_min_i)``.

    ``mean_times`` is a mapping client -> ``tbar_i`` (the result is then a
    dict with the same keys) or an array (the result is an array).
    ``rho_min`` is a scalar or per-client (same keys / length).
    """
    if isinstance(mean_times, Mapping):
        clients = list(mean_times)
        t = np.array([mean_times[c] for c in clients], dtype=np.float64)
        if isinstance(rho_min, Mapping):
            floor = np.array([rho_min[c] for c in clients], dtype=np.float64)
        else:
            floor = np.broadcast_to(np.asarray(rho_min, dtype=np.float64), t.shape)
    else:
        clients = None
        t = np.asarray(mean_times, dtype=np.float64)
        floor = np.broadcast_to(np.asarray(rho_min, dtype=np.float64), t.shape)
    if t.ndim != 1 or t.size == 0:
        raise ValueError("mean round times must be a non-empty 1-D collection")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ValueError("mean round times must be positive and finite")
    if np.any(floor < 0) or np.any(floor > 1):
        raise ValueError("rho_min must lie in [0, 1]")
    rho = np.maximum(t.min() / t, floor)
    if clients is None:
        return rho
    return {c: float(r) for c, r in zip(clients, rho)}


def recovery_step(rho_min, delta: float = 0.2):
    """``min(1, rho_min + delta)`` (scalar or array; the sum is rounded to 12
    decimals so that 0.1 + 0.2 gives 0.3)."""
    if delta <= 0:
        raise ValueError(f"delta_rho must be > 0, got {delta}")
    out = np.minimum(1.0, np.round(np.asarray(rho_min, dtype=np.float64) + delta, 12))
    return float(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------- plateau

@dataclass(frozen=True)
class Plateau:
    """Early-stopping style plateau detector state.

    An evaluation *improves* when ``accuracy > best + min_delta``; after
    ``patience`` evaluations in a row without improvement the detector fires
    and its counter restarts at 0. ``best`` is kept across firings (our
    choice): after a recovery step the model must beat its best accuracy so
    far within ``patience`` evaluations or the next recovery step follows.
    """

    patience: int = 5
    min_delta: float = 0.0
    best: float = -math.inf
    bad: int = 0

    def __post_init__(self):
        if self.patience < 1:
            raise ValueError(f"plateau patience must be >= 1, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"plateau min_delta must be >= 0, got {self.min_delta}")


def plateau_update(state: Plateau, accuracy: float) -> tuple[Plateau, bool]:
    """Feed one evaluation; returns ``(new_state, plateaued)``."""
    if not math.isfinite(accuracy):
        raise ValueError(f"accuracy must be finite, got {accuracy}")
    if accuracy > state.best + state.min_delta:
        return replace(state, best=float(accuracy), bad=0), False
    bad = state.bad + 1
    if bad >= state.patience:
        return replace(state, bad=0), True
    return replace(state, bad=bad), False


def recover_on_plateau(state: Plateau, rho_min: float, accuracy: float, delta: float) -> tuple[Plateau, float, bool]:
    """Stage 2's step for one evaluation: feed ``accuracy`` to the plateau monitor
    (:func:`plateau_update`); on a plateau with ``rho_min < 1`` the floor becomes
    :func:`recovery_step` ``(rho_min, delta)``. Returns ``(new_state, new_rho_min, plateaued)``:
    ``plateaued`` with an unchanged ``rho_min = 1`` means a plateau of the full model."""
    state, plateaued = plateau_update(state, accuracy)
    if plateaued and rho_min < 1.0:
        rho_min = recovery_step(rho_min, delta)
    return state, float(rho_min), plateaued


# --------------------------------------------------------------------------- importance and masks

def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def importance_scores(sq_grads_list: Sequence[Mapping[str, np.ndarray]], params: Mapping[str, np.ndarray],
                      keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """PR-FL importance of every coordinate of ``keys`` (default: ``params`` order).

    * Each upload ``u`` holds accumulated squared gradients (absent key =
      zeros). It is divided by its total over ``keys`` so that every upload
      counts equally whatever its number of steps, batch size or loss scale;
      an upload whose total is 0 contributes nothing.
    * ``score_j = sum_u sq_u,j / total_u``.
    * Coordinates with score 0 (no gradient in any upload) get
      ``0.5 * s_min * |w_j| / max |w|`` (max over those coordinates), where
      ``s_min`` is the smallest positive gradient score: they rank below every
      coordinate a gradient touched, ordered by magnitude among themselves.
      With no gradient at all the scores are ``|w|``.
    """
    keys = list(params.keys() if keys is None else keys)
    shapes = {}
    for k in keys:
        if k not in params:
            raise ValueError(f"params lack key {k!r}")
        shapes[k] = np.shape(params[k])
    scores = {k: np.zeros(shapes[k], dtype=np.float64) for k in keys}
    for i, up in enumerate(sq_grads_list):
        arrays = {}
        for k in keys:
            if k in up:
                a = _np(up[k]).astype(np.float64)
                if a.shape != shapes[k]:
                    raise ValueError(f"upload {i}: squared gradients of {k!r} have shape {a.shape}, "
                                     f"expected {shapes[k]}")
                if not np.all(np.isfinite(a)) or np.any(a < 0):
                    raise ValueError(f"upload {i}: squared gradients of {k!r} must be finite and >= 0")
                arrays[k] = a
        total = sum(float(a.sum()) for a in arrays.values())
        if total <= 0:
            continue
        for k, a in arrays.items():
            scores[k] += a / total
    positive = [s[s > 0] for s in scores.values() if np.any(s > 0)]
    mags = {k: np.abs(_np(params[k]).astype(np.float64)) for k in keys}
    if not positive:
        return mags
    s_min = float(min(p.min() for p in positive))
    untouched_max = max((float(mags[k][scores[k] == 0].max()) for k in keys if np.any(scores[k] == 0)),
                        default=0.0)
    scale = 0.5 * s_min / untouched_max if untouched_max > 0 else 0.0
    for k in keys:
        zero = scores[k] == 0
        scores[k] = np.where(zero, mags[k] * scale, scores[k])
    return scores


def nested_masks(scores: Mapping[str, np.ndarray], densities: Sequence[float], *, layer_floor: float = 0.05,
                 keys: Sequence[str] | None = None) -> list[Mask]:
    """One mask per density (in the order given), nested by construction.

    ``keys`` default to the keys of ``scores``, in order (pass
    :func:`fedray.pruning.magnitude.prunable_keys` for weights and biases).
    One global ordering (:func:`fedray.pruning.magnitude.global_ranking`):
    first the floor coordinates -- the ``ceil(layer_floor * size)`` best of
    every tensor -- then all the others, each part by (-score, key order,
    index). Density ``rho`` keeps the prefix of length
    ``max(round(rho * N), F)`` where ``N`` counts all coordinates and ``F`` the
    floor coordinates: the density is met exactly (to rounding) whenever
    ``rho * N >= F``; below that the floor wins and every tensor keeps its floor.
    Masks with ``rho_i <= rho_j`` satisfy ``mask_i`` subset of ``mask_j``.
    """
    keys = list(scores.keys() if keys is None else keys)
    if not 0 <= layer_floor <= 1:
        raise ValueError(f"layer floor must be in [0, 1], got {layer_floor}")
    priority = {}
    for k in keys:
        if k not in scores:
            raise ValueError(f"scores lack key {k!r}")
        s = np.asarray(scores[k], dtype=np.float64)
        n_floor = math.ceil(round(layer_floor * s.size, 9))
        p = np.zeros(s.size, dtype=bool)
        if n_floor:
            # best n_floor of this tensor, ties by lower flat index
            best = np.lexsort((np.arange(s.size), -s.reshape(-1)))[:n_floor]
            p[best] = True
        priority[k] = p.reshape(s.shape)
    ranking = global_ranking(scores, keys, priority)
    floor_total = int(sum(int(p.sum()) for p in priority.values()))
    return [top_mask(ranking, max(prefix_count(float(rho), ranking.size), floor_total)) for rho in densities]


# --------------------------------------------------------------------------- residual split

def residual_split(masks_sorted_by_density: Sequence[Mask]) -> list[Mask]:
    """Pieces of the residual distribution: the first (smallest) mask in full,
    then ``mask_r & ~mask_{r-1}`` for each next mask. Masks must nest in the
    order given. Every piece lists only keys with at least one coordinate;
    pieces are disjoint and their union is the last (largest) mask."""
    masks = list(masks_sorted_by_density)
    for r in range(1, len(masks)):
        if not is_subset(masks[r - 1], masks[r]):
            raise ValueError(f"masks are not nested: mask {r - 1} is not a subset of mask {r}")
    pieces: list[Mask] = []
    prev: Mask = {}
    for m in masks:
        piece = {}
        for k, v in m.items():
            diff = v & ~prev[k] if k in prev else v.copy()
            if diff.any():
                piece[k] = diff
        pieces.append(piece)
        prev = m
    return pieces
