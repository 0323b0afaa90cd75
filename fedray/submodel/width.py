"""Width submodels: channel slices of every prunable layer (HeteroFL, CA-HFP).

``keep = {layer: kept channel indices}`` (see :mod:`fedray.models.spec`).
:func:`keep_mask` turns any ``keep`` into the one mask type: for every
state-dict key, True exactly at the coordinates of the compact tensor
(``np.ix_`` of :meth:`ModelSpec.slice_index`): a producer's weight rows, bias
and BatchNorm entries of the kept channels, and the consumer's matching input
columns. Layers that are not prunable (the class outputs, ResNet's stem and
residual stream) keep all their outputs; scalars (``num_batches_tracked``)
are covered.

:func:`width_submodel` is HeteroFL's rule: the first ``ceil(ratio * C)``
channels of every prunable layer and of every residual stream (ResNet's stages;
:func:`fedray.models.spec.width_keep` with ``streams=True``).

:func:`mask_keep` is the other way round: the channels of every prunable group that a mask
still covers (any coordinate of the channel's weight row, bias or BatchNorm entries), so a
structured mask (AutoFLIP's, whose removed channels are uncovered everywhere) becomes a
physically smaller model plus the unstructured mask inside it.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from fedray.models.spec import Keep, ModelSpec, width_keep
from fedray.submodel.masks import Mask

__all__ = ["keep_mask", "mask_keep", "width_submodel"]


def keep_mask(spec: ModelSpec, params_like: Mapping[str, np.ndarray], keep: Keep) -> Mask:
    """Mask of the submodel ``keep`` over every key of ``params_like``."""
    index = spec.slice_index(keep)
    out: Mask = {}
    for k, like in params_like.items():
        if k not in index:
            raise ValueError(f"key {k!r} is not in the model spec")
        shape = np.shape(like)
        if tuple(shape) != tuple(spec.shapes[k]):
            raise ValueError(f"tensor {k!r} has shape {tuple(shape)}, the spec says {spec.shapes[k]}")
        m = np.zeros(shape, dtype=bool)
        idx = index[k]
        if idx:
            m[np.ix_(*idx)] = True
        else:
            m[...] = True
        out[k] = m
    return out


def width_submodel(spec: ModelSpec, params_like: Mapping[str, np.ndarray],
                   ratio: float) -> tuple[dict[str, np.ndarray], Mask]:
    """HeteroFL slice at ``ratio`` in (0, 1]: ``(keep, mask)``."""
    keep = width_keep(spec, ratio, streams=True)
    return keep, keep_mask(spec, params_like, keep)


def mask_keep(spec: ModelSpec, mask: Mask) -> dict[str, np.ndarray]:
    """Kept channels of every prunable group (:attr:`ModelSpec.groups`) under ``mask``: those with
    a covered coordinate in any of the group's ``out_slices``; a group with none keeps channel 0
    (a layer never vanishes). Keys absent from ``mask`` count as covered."""
    keep = {}
    for g in spec.groups:
        alive = np.zeros(g.size, dtype=bool)
        for key, axis in g.out_slices:
            m = mask.get(key)
            if m is None:
                alive[:] = True
                break
            alive |= np.moveaxis(np.asarray(m, dtype=bool), axis, 0).reshape(g.size, -1).any(axis=1)
        if not alive.any():
            alive[0] = True
        keep[g.layer] = np.flatnonzero(alive).astype(np.int64)
    return keep
