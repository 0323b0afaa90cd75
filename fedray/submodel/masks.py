"""The one mask type of fedray.

A *mask* is a ``dict[str, np.ndarray]`` of boolean arrays keyed like the model's
state dict. ``mask[k][i]`` is True when coordinate ``i`` of tensor ``k`` was
trained (and is sent / aggregated). A key that is absent from the mask means
the whole tensor is not covered. Every submodel kind (depth, width slice,
structured groups, unstructured sparsity) decodes to this one type.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

Params = dict[str, np.ndarray]
Mask = dict[str, np.ndarray]


def full(params: Mapping[str, np.ndarray], keys: Iterable[str] | None = None) -> Mask:
    """All-True mask over ``keys`` (default: every tensor in ``params``)."""
    keys = params.keys() if keys is None else keys
    return {k: np.ones(np.shape(params[k]), dtype=bool) for k in keys}


def coverage(mask: Mask, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean array of ``shape``: the mask for ``key`` or all False if absent."""
    m = mask.get(key)
    return np.zeros(shape, dtype=bool) if m is None else m


def count(mask: Mask) -> int:
    """Number of covered coordinates."""
    return int(sum(int(m.sum()) for m in mask.values()))


def density(mask: Mask, params: Mapping[str, np.ndarray], keys: Iterable[str] | None = None) -> float:
    """Covered fraction of the coordinates of ``keys`` (default all of ``params``)."""
    keys = list(params.keys() if keys is None else keys)
    total = sum(int(np.size(params[k])) for k in keys)
    covered = sum(int(mask[k].sum()) for k in keys if k in mask)
    return covered / total if total else 0.0


def is_subset(a: Mask, b: Mask) -> bool:
    """True when every coordinate covered by ``a`` is covered by ``b``."""
    for k, m in a.items():
        if not m.any():
            continue
        if k not in b or np.any(m & ~b[k]):
            return False
    return True


def intersect(a: Mask, b: Mask) -> Mask:
    return {k: a[k] & b[k] for k in a if k in b}


def union(a: Mask, b: Mask) -> Mask:
    out = {k: v.copy() for k, v in a.items()}
    for k, v in b.items():
        out[k] = out[k] | v if k in out else v.copy()
    return out


def apply(params: Mapping[str, np.ndarray], mask: Mask) -> Params:
    """Zero the uncovered coordinates of the covered keys; drop uncovered keys."""
    return {k: np.where(m, params[k], 0).astype(params[k].dtype, copy=False) for k, m in mask.items()}


def equal(a: Mask, b: Mask) -> bool:
    keys = {k for k, v in a.items() if v.any()} | {k for k, v in b.items() if v.any()}
    return all(k in a and k in b and np.array_equal(a[k], b[k]) for k in keys)
