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
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from fedray.models.spec import Keep, ModelSpec, width_keep
from fedray.submodel.masks import Mask

__all__ = ["keep_mask", "width_submodel"]


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
