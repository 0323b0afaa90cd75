"""Depth submodels: the last ``d`` layers of a model (CLAMP, MA-CLAMP, FedPMT, FedDrop).

A layer is a Linear/Conv2d with its bias and the BatchNorm that follows it
(:mod:`fedray.models.spec`). The depth-``d`` submodel trains every parameter
of the last ``d`` layers; its mask covers all their state-dict keys, BatchNorm
running statistics and ``num_batches_tracked`` included, so that the update
carries them. Earlier layers are frozen and absent from the mask.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from fedray.models.spec import ModelSpec
from fedray.submodel.masks import Mask

__all__ = ["depth_mask", "depth_trainable"]


def depth_mask(spec: ModelSpec, params_like: Mapping[str, np.ndarray], d: int) -> Mask:
    """All-True arrays for every key of the last ``d`` layers (``0 <= d <= L``), in layer order."""
    out: Mask = {}
    for layer in spec.last_layers(d):
        for k in layer.keys:
            if k not in params_like:
                raise ValueError(f"params lack key {k!r} of layer '{layer.name}'")
            out[k] = np.ones(np.shape(params_like[k]), dtype=bool)
    return out


def depth_trainable(spec: ModelSpec, d: int) -> frozenset[str]:
    """Trainable parameter keys (no buffers) of the last ``d`` layers."""
    params = set(spec.param_keys)
    return frozenset(k for layer in spec.last_layers(d) for k in layer.keys if k in params)
