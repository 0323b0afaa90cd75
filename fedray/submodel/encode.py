"""Sparse wire format of updates.

A :class:`Payload` carries only what a client trained, tensor by tensor:

- ``dense``: the whole tensor (a fully trained layer);
- ``slices``: one int32 index array per axis plus the values of the sub-block
  ``tensor[np.ix_(*index)]`` (structured submodels: channels, rows, widths);
- ``sparse``: flat int32 (or int64) indices plus values (very sparse unstructured masks);
- ``bitmask``: the flattened mask packed 8 coordinates a byte, coordinate ``i`` in bit
  ``i % 8`` of byte ``i // 8`` (``np.packbits(..., bitorder="little")``: a 16-bit
  little-endian load is the lane mask of 16 coordinates) plus the covered values in C
  order (unstructured masks above ~3% density, where a bit per coordinate is cheaper
  than a 4-byte index per covered one).

``encode`` picks the smallest correct form for each tensor; ``decode`` returns
full-shape values and the one :mod:`fedray.submodel.masks` mask type.
Communication bytes are the real ``nbytes`` of the arrays in the payload.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from fedray.submodel.masks import Mask

BITORDER = "little"  # bit order of ``bitmask`` entries (np.packbits / np.unpackbits)


@dataclass(frozen=True)
class Entry:
    kind: str  # "dense" | "slices" | "sparse"
    values: np.ndarray
    index: tuple[np.ndarray, ...] = ()

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + sum(i.nbytes for i in self.index))


@dataclass(frozen=True)
class Payload:
    """Encoded tensors plus ``aux``, the extra arrays a method's submodel declares (e.g.
    PR-FL's accumulated squared gradients); both count as sent bytes. ``state`` is the
    client's new state for the per-client store (:mod:`fedray.client.state`): it stays on the
    device, so it is not part of what the device sends (the simulation carries it here)."""

    entries: dict[str, Entry] = field(default_factory=dict)
    aux: dict[str, np.ndarray] = field(default_factory=dict)
    state: dict | None = None

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values()) + sum(int(v.nbytes) for v in self.aux.values())

    def keys(self):
        return self.entries.keys()


def _index_dtype(n: int):
    return np.int32 if n < 2**31 else np.int64


def _as_slices(m: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """If ``m`` is exactly a cross product of per-axis index sets, return them."""
    if m.ndim == 0:
        return None
    idx = []
    for ax in range(m.ndim):
        other = tuple(a for a in range(m.ndim) if a != ax)
        idx.append(np.flatnonzero(m.any(axis=other) if other else m).astype(np.int32))
    if int(np.prod([len(i) for i in idx])) != int(m.sum()):
        return None
    return tuple(idx)


def _forms(size: int, itemsize: int, m: np.ndarray) -> tuple[int, dict]:
    """Covered count and the byte size of every exact form of mask ``m`` (dense excluded)."""
    n = int(m.sum())
    forms = {"sparse": n * (itemsize + np.dtype(_index_dtype(size)).itemsize),
             "bitmask": -(-size // 8) + n * itemsize}
    sl = _as_slices(m)
    if sl is not None:
        forms["slices"] = (n * itemsize + sum(i.nbytes for i in sl), sl)
    return n, forms


def _choose(forms: dict) -> tuple[str, int]:
    """Smallest form; slices win ties (they keep structure), then bitmask, then sparse."""
    order = {"slices": 0, "bitmask": 1, "sparse": 2}
    best = min(forms, key=lambda k: ((forms[k][0] if k == "slices" else forms[k]), order[k]))
    return best, forms[best][0] if best == "slices" else forms[best]


def encode_tensor(values: np.ndarray, m: np.ndarray | None) -> Entry | None:
    """Encode one tensor under its boolean mask (None = fully trained)."""
    values = np.asarray(values)
    if m is None or m.all():
        return Entry("dense", np.asarray(values, order="C"))
    n, forms = _forms(values.size, values.itemsize, m)
    if n == 0:
        return None
    kind, _ = _choose(forms)
    if kind == "slices":
        sl = forms["slices"][1]
        return Entry("slices", np.ascontiguousarray(values[np.ix_(*sl)]), sl)
    if kind == "bitmask":
        return Entry("bitmask", np.ascontiguousarray(values[m]), (np.packbits(m.reshape(-1), bitorder=BITORDER),))
    flat = np.flatnonzero(m).astype(_index_dtype(values.size))
    return Entry("sparse", values.reshape(-1)[flat], (flat,))


def encode(params: Mapping[str, np.ndarray], mask: Mask | None = None) -> Payload:
    """Encode the covered coordinates of ``params``.

    ``mask=None`` sends every tensor densely; otherwise only keys in ``mask``
    are sent, each in its smallest exact form.
    """
    if mask is None:
        return Payload({k: Entry("dense", np.asarray(v, order="C")) for k, v in params.items()})
    out = {}
    for k, m in mask.items():
        e = encode_tensor(params[k], m)
        if e is not None:
            out[k] = e
    return Payload(out)


def decode_entry(e: Entry, shape: tuple[int, ...], dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Full-shape (values, mask) for one entry; uncovered values are zero."""
    dtype = e.values.dtype if dtype is None else dtype
    if e.kind == "dense":
        return e.values.reshape(shape), np.ones(shape, dtype=bool)
    vals = np.zeros(shape, dtype=dtype)
    m = np.zeros(shape, dtype=bool)
    if e.kind == "slices":
        ix = np.ix_(*e.index)
        vals[ix] = e.values
        m[ix] = True
    elif e.kind == "sparse":
        vals.reshape(-1)[e.index[0]] = e.values
        m.reshape(-1)[e.index[0]] = True
    elif e.kind == "bitmask":
        m = np.unpackbits(e.index[0], count=int(np.prod(shape, dtype=np.int64)), bitorder=BITORDER).view(bool).reshape(shape)
        vals[m] = e.values
    else:
        raise ValueError(f"unknown payload entry kind {e.kind!r}")
    return vals, m


def decode(payload: Payload, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], Mask]:
    """Full-shape values and the mask of what the payload covers."""
    values, mask = {}, {}
    for k, e in payload.entries.items():
        values[k], mask[k] = decode_entry(e, tuple(shapes[k]))
    return values, mask


def tensor_nbytes(ref: np.ndarray, m: np.ndarray | None) -> int:
    """Bytes :func:`encode_tensor` would send for a tensor like ``ref`` under ``m``
    (no values needed: used to predict communication at dispatch time)."""
    itemsize = np.dtype(ref.dtype).itemsize
    if m is None or m.all():
        return int(np.size(ref)) * itemsize
    n, forms = _forms(int(np.size(ref)), itemsize, m)
    return 0 if n == 0 else _choose(forms)[1]


def payload_nbytes(like: Mapping[str, np.ndarray], mask: Mask | None = None) -> int:
    """Bytes of ``encode(values_like, mask)`` without encoding anything."""
    if mask is None:
        return sum(int(np.size(v)) * np.dtype(v.dtype).itemsize for v in like.values())
    return sum(tensor_nbytes(like[k], m) for k, m in mask.items())
