"""AutoFLIP: loss-exploration guidance and the hybrid (structured + unstructured) mask.

Guidance (:func:`guidance`): ``G_j = mean_k (theta_k,j - theta_base,j)^2``
over the exploring clients, then min-max normalised per tensor to [0, 1]
(``(G - min) / (max - min)``); a tensor whose guidance is constant gets all
zeros (our choice: no coordinate of it stands out). :func:`refresh_guidance`
is the same formula over per-round deltas (base = 0).

Hybrid mask (:func:`hybrid_mask`), our reading of the method:

* ``tau = np.quantile(all guidance values of the weight tensors, q,
  method="linear")``. Only the Linear/Conv2d *weights* are pruned
  coordinate-wise and enter the quantile; biases and BatchNorm entries follow
  their channel (never pruned on their own).
* Unstructured part: weight coordinate ``j`` is kept iff ``G_j > tau``.
* Structured part (``structured=True``): for every prunable group (a hidden
  conv filter or Linear output neuron, :attr:`ModelSpec.groups`), when the
  mean guidance of its weight row (``weight[c]``) is below ``tau`` the whole
  channel goes: all its ``out_slices`` coordinates (weight row, bias, BN
  weight/bias/running statistics) and the consumer's input columns
  (``in_slices``). At least one channel per layer always stays (if every
  channel is below ``tau`` the one with the highest mean guidance is kept,
  ties by lower index). The classifier's outputs are never a group, so they
  are never removed.
* The mask covers every key of ``spec.shapes`` (the whole state dict) so that
  ``theta <- theta * M`` (:func:`fedray.submodel.masks.apply`) keeps every
  tensor; keys with nothing pruned are all True.

:func:`random_mask` is the "random pruning" baseline at a given density, cut
from the same global ranking helper as PR-FL's masks
(:func:`fedray.pruning.magnitude.global_ranking`) with uniform random scores.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fedray.models.spec import ModelSpec
from fedray.pruning.magnitude import global_ranking, prefix_count, top_mask
from fedray.submodel.masks import Mask

__all__ = ["guidance", "refresh_guidance", "hybrid_mask", "random_mask"]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _minmax(g: np.ndarray) -> np.ndarray:
    lo, hi = float(g.min()) if g.size else 0.0, float(g.max()) if g.size else 0.0
    if not hi > lo:
        return np.zeros_like(g)
    return (g - lo) / (hi - lo)


def _float_keys(base: Mapping[str, Any]) -> list[str]:
    return [k for k, v in base.items() if np.issubdtype(_np(v).dtype, np.floating)]


def guidance(base: Mapping[str, Any], explored: Sequence[Mapping[str, Any]],
             keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Normalised exploration guidance per tensor of ``keys`` (default: the
    floating-point tensors of ``base``), float64 in [0, 1]."""
    if not explored:
        raise ValueError("guidance needs at least one explored model")
    keys = _float_keys(base) if keys is None else list(keys)
    out = {}
    for k in keys:
        if k not in base:
            raise ValueError(f"base lacks key {k!r}")
        b = _np(base[k]).astype(np.float64)
        acc = np.zeros(b.shape, dtype=np.float64)
        for i, theta in enumerate(explored):
            if k not in theta:
                raise ValueError(f"explored model {i} lacks key {k!r}")
            t = _np(theta[k]).astype(np.float64)
            if t.shape != b.shape:
                raise ValueError(f"explored model {i}: {k!r} has shape {t.shape}, expected {b.shape}")
            acc += (t - b) ** 2
        out[k] = _minmax(acc / len(explored))
    return out


def refresh_guidance(deltas: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per-round refresh from sampled clients' deltas: ``mean_k delta_k^2``,
    min-max normalised per tensor (:func:`guidance` with base = 0)."""
    if not deltas:
        raise ValueError("refresh_guidance needs at least one delta")
    keys = _float_keys(deltas[0]) if keys is None else list(keys)
    zero = {k: np.zeros(np.shape(_np(deltas[0][k])), dtype=np.float64) for k in keys if k in deltas[0]}
    missing = [k for k in keys if k not in zero]
    if missing:
        raise ValueError(f"delta 0 lacks key {missing[0]!r}")
    return guidance(zero, deltas, keys)


def hybrid_mask(spec: ModelSpec, guidance: Mapping[str, np.ndarray], q: float = 0.3,
                structured: bool = True) -> Mask:
    """AutoFLIP's mask over every state-dict key (see the module docstring)."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    weight_keys = [layer.weight_key for layer in spec.layers]
    for k in weight_keys:
        if k not in guidance:
            raise ValueError(f"guidance lacks weight {k!r}")
        if np.shape(guidance[k]) != tuple(spec.shapes[k]):
            raise ValueError(f"guidance of {k!r} has shape {np.shape(guidance[k])}, expected {spec.shapes[k]}")
    values = np.concatenate([np.asarray(guidance[k], dtype=np.float64).reshape(-1) for k in weight_keys])
    tau = float(np.quantile(values, q, method="linear"))
    mask: Mask = {k: np.ones(shape, dtype=bool) for k, shape in spec.shapes.items()}
    for k in weight_keys:
        mask[k] = np.asarray(guidance[k], dtype=np.float64) > tau
    if structured:
        for grp in spec.groups:
            w = np.asarray(guidance[spec.layer(grp.layer).weight_key], dtype=np.float64)
            row_mean = w.reshape(grp.size, -1).mean(axis=1)
            remove = row_mean < tau
            if remove.all():
                best = int(np.lexsort((np.arange(grp.size), -row_mean))[0])
                remove[best] = False
            gone = np.flatnonzero(remove)
            if gone.size == 0:
                continue
            for key, axis in grp.out_slices:
                sl = [slice(None)] * len(spec.shapes[key])
                sl[axis] = gone
                mask[key][tuple(sl)] = False
            for key, axis, block in grp.in_slices:
                cols = (gone[:, None] * block + np.arange(block)).ravel()
                sl = [slice(None)] * len(spec.shapes[key])
                sl[axis] = cols
                mask[key][tuple(sl)] = False
    return mask


def random_mask(params_like: Mapping[str, Any], density: float, rng: np.random.Generator,
                keys: Sequence[str]) -> Mask:
    """Uniformly random unstructured mask over ``keys`` keeping
    ``round(density * N)`` coordinates (``N`` = all coordinates of ``keys``)."""
    keys = list(keys)
    scores = {}
    for k in keys:
        if k not in params_like:
            raise ValueError(f"params lack key {k!r}")
        scores[k] = rng.random(np.shape(_np(params_like[k])))
    ranking = global_ranking(scores, keys)
    return top_mask(ranking, prefix_count(float(density), ranking.size))
