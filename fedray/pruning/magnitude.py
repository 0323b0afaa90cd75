"""Shared scoring and ranking helpers of the pruning methods.

One global ranking implementation (:func:`global_ranking`) serves every
unstructured mask in fedray: PR-FL's nested masks
(:func:`fedray.pruning.progressive.nested_masks`) and the random-pruning
baseline (:func:`fedray.pruning.exploration.random_mask`).

Conventions
    * Scores are ``dict[str, np.ndarray]`` of finite numbers, one array per
      tensor (same shape as the parameter); higher = more important = kept
      first.
    * The ranking orders *coordinates* of the concatenation of the tensors of
      ``keys`` (in the order given, flattened C-order). Ties are broken
      deterministically: by descending score, then key order, then flat index
      (a stable sort). Coordinates flagged in ``priority`` come before all
      others (used for PR-FL's per-layer floor).
    * A mask keeps a *prefix* of the ranking, so masks cut from one ranking
      with growing lengths nest by construction.
    * Unstructured masks cover the keys returned by :func:`prunable_keys`: the
      weight and the bias of every Linear/Conv2d layer. BatchNorm parameters
      and buffers are never pruned coordinate-wise (structured pruning removes
      them together with their channel).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from fedray.models.spec import ModelSpec
from fedray.submodel.masks import Mask

__all__ = ["Ranking", "prunable_keys", "magnitude_scores", "global_ranking", "prefix_count", "top_mask"]


def prunable_keys(spec: ModelSpec) -> tuple[str, ...]:
    """Weight and bias keys of every Linear/Conv2d layer, in layer (input -> output) order."""
    out: list[str] = []
    for layer in spec.layers:
        out.append(layer.weight_key)
        if layer.bias_key:
            out.append(layer.bias_key)
    return tuple(out)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def magnitude_scores(params: Mapping[str, np.ndarray], keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """``|w|`` (float64) for each of ``keys`` (default: every key of ``params``)."""
    keys = list(params.keys() if keys is None else keys)
    out = {}
    for k in keys:
        if k not in params:
            raise ValueError(f"params lack key {k!r}")
        out[k] = np.abs(_np(params[k]).astype(np.float64))
    return out


@dataclass(frozen=True)
class Ranking:
    """A global order of the coordinates of ``keys``.

    ``order[r]`` is the position (in the concatenation of the flattened
    tensors, in ``keys`` order) of the coordinate of rank ``r`` (0 = most
    important). ``offsets[i]`` is where tensor ``keys[i]`` starts.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: np.ndarray
    order: np.ndarray

    @property
    def size(self) -> int:
        return int(self.order.size)


def global_ranking(scores: Mapping[str, np.ndarray], keys: Sequence[str] | None = None,
                   priority: Mapping[str, np.ndarray] | None = None) -> Ranking:
    """Rank every coordinate of ``keys`` (default: ``scores`` order) globally.

    Sort key, most significant first: ``priority`` (True first; absent key =
    all False), descending score, key order, flat index.
    """
    keys = tuple(scores.keys() if keys is None else keys)
    if len(set(keys)) != len(keys):
        raise ValueError("keys must not repeat")
    flat, prio, shapes = [], [], []
    for k in keys:
        if k not in scores:
            raise ValueError(f"scores lack key {k!r}")
        s = np.asarray(scores[k], dtype=np.float64)
        if not np.all(np.isfinite(s)):
            raise ValueError(f"scores of {k!r} are not all finite")
        shapes.append(tuple(s.shape))
        flat.append(s.reshape(-1))
        if priority is not None and k in priority:
            p = np.asarray(priority[k], dtype=bool)
            if p.shape != s.shape:
                raise ValueError(f"priority of {k!r} has shape {p.shape}, expected {s.shape}")
            prio.append(p.reshape(-1))
        else:
            prio.append(np.zeros(s.size, dtype=bool))
    sizes = [f.size for f in flat]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)[:-1] if keys else np.zeros(0, np.int64)
    all_scores = np.concatenate(flat) if flat else np.zeros(0)
    all_prio = np.concatenate(prio) if prio else np.zeros(0, dtype=bool)
    position = np.arange(all_scores.size, dtype=np.int64)
    # lexsort: last key is the primary one; the position key makes ties explicit
    order = np.lexsort((position, -all_scores, ~all_prio)).astype(np.int64)
    return Ranking(keys=keys, shapes=tuple(shapes), offsets=offsets, order=order)


def prefix_count(density: float, total: int) -> int:
    """Number of coordinates a mask of ``density`` keeps out of ``total``:
    ``round(density * total)`` with halves rounded up (and the product rounded
    to 9 decimals first so that e.g. ``0.3 * 10`` gives exactly 3)."""
    if not 0.0 <= density <= 1.0 or not math.isfinite(density):
        raise ValueError(f"density must be in [0, 1], got {density}")
    return int(math.floor(round(density * total, 9) + 0.5))


def top_mask(ranking: Ranking, n: int) -> Mask:
    """Mask keeping the ``n`` best-ranked coordinates (every key of the ranking appears)."""
    if not 0 <= n <= ranking.size:
        raise ValueError(f"prefix length must be in 0..{ranking.size}, got {n}")
    keep = np.zeros(ranking.size, dtype=bool)
    keep[ranking.order[:n]] = True
    out: Mask = {}
    for k, shape, start in zip(ranking.keys, ranking.shapes, ranking.offsets):
        size = int(np.prod(shape, dtype=np.int64))
        out[k] = keep[start:start + size].reshape(shape).copy()
    return out
