"""Cache-blocked multi-way merge of masked updates (numba kernels).

The aggregator merges K encoded updates of one tensor without decoding them
to full shape. :func:`merge` walks the tensor's flat coordinates in tiles of
``tile`` coordinates (default 32768: two float64 tile accumulators take
512 KiB and stay in L2); inside a tile every *piece* (one contribution's
part of the tensor) adds its covered coordinates, in piece order, to
tile-local float64 sums; then the tile is finalised into ``out``. Memory
traffic is one read of every piece plus one read of ``old`` and one write of
``out``, instead of several passes over full-shape float64 accumulators per
contribution.

A piece is any object with ``kind``, ``values`` and ``index`` attributes (a
:class:`fedray.submodel.encode.Entry` is one, so is :class:`Piece`):

- ``"dense"``: ``values`` holds the whole tensor (full coverage);
- ``"sparse"``: ``index = (flat,)``: sorted, unique flat indices (int32 or
  int64) and ``values`` the matching values;
- ``"slices"``: one sorted, unique index array per axis and ``values`` the
  sub-block ``tensor[np.ix_(*index)]``;
- ``"masked"``: ``index = (mask,)`` a full-shape bool mask and ``values``
  full-shape values; coordinates outside the mask are never read into a sum
  (they may hold anything, NaN included).

Pieces must be valid (what :func:`fedray.aggregation.validate.check` ensures
for payloads: sorted unique in-range indices, matching lengths); :func:`merge`
re-checks sizes and the first/last index in O(1) per piece and the kernel
never writes outside the tile for any index array, so an invalid piece gives
a wrong result, never a memory error.

Modes (``w_i`` = ``weights[i]``; sums run over the pieces covering a
coordinate, in piece order, in float64; the result is cast to the dtype of
``old``):

- ``MEAN``: ``sum w_i v_i / sum w_i`` where ``sum w_i > 0``, else ``old``
  (:func:`fedray.aggregation.rules.masked_mean`).
- ``DELTA``: ``old + scale * sum w_i v_i`` (FedBuff with ``scale = eta_g / K``;
  an uncovered coordinate is a zero delta).
- ``MIX``: ``x <- (1 - w_i) x + w_i v_i`` applied piece after piece on the
  covered coordinates, rounded to ``old``'s dtype after every step, exactly
  like repeated :func:`fedray.aggregation.rules.mix` on masked targets
  (FedAsync). ``w_i`` is the mixing rate, in [0, 1].

Determinism: every coordinate's sum is formed in piece order whatever the
tiling and the number of threads, so serial and parallel runs are bitwise
identical, and a MEAN / DELTA / MIX result equals ``rules.masked_mean`` /
``rules.apply_delta_mean`` / ``rules.masked_mix`` on the decoded
contributions (numpy path, float64 accumulation) bit for bit: both form
``float64(w) * float64(v)`` and add in contribution order. Reordering the
pieces changes a sum only by float64 rounding, so the float32 result is in
practice order-independent (a tie at float32 rounding could differ by one ulp).

Only float32 and float64 tensors are handled here (:data:`DTYPES`); the
callers route other dtypes (integer counters, float16) to the numpy rules.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numba
import numpy as np
from numba import njit, prange, typed

__all__ = ["MEAN", "DELTA", "MIX", "TILE", "DTYPES", "Piece", "merge", "merge_reference"]

MEAN, DELTA, MIX = 0, 1, 2
TILE = 32768
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_DENSE, _SPARSE32, _SPARSE64, _SLICES, _MASKED = 0, 1, 2, 3, 4
_MODES = {MEAN: "MEAN", DELTA: "DELTA", MIX: "MIX"}


class Piece(NamedTuple):
    """One contribution's part of one tensor (see the module docstring)."""

    kind: str
    values: np.ndarray
    index: tuple = ()


# ---------------------------------------------------------------------- kernels
@njit(cache=True, nogil=True, error_model="numpy")
def _tile(t0, t1, kinds, slots, weights, strides, vals, i32, i64, rows, inner, masks,
          old, out, mode, scale, acc_w, acc_m, cur):
    # ``cur[e]``: first position of sparse piece e not below t0 (tiles run in
    # increasing order inside a chunk); at most ``tl`` unique sorted indices
    # fall in the tile, so the end is a binary search over ``tl`` entries.
    tl = t1 - t0
    if mode == 2:  # MIX works on the output tile directly
        for i in range(tl):
            out[t0 + i] = old[t0 + i]
    else:
        for i in range(tl):
            acc_w[i] = 0.0
        if mode == 0:
            for i in range(tl):
                acc_m[i] = 0.0
    for e in range(kinds.shape[0]):
        kind = kinds[e]
        w = weights[e]
        v = vals[e]
        s = slots[e]
        if kind == 0:  # dense
            if mode == 2:
                for i in range(tl):
                    out[t0 + i] = out[t0 + i] * (1.0 - w) + v[t0 + i] * w
            else:
                for i in range(tl):
                    acc_w[i] += w * v[t0 + i]
                if mode == 0:
                    for i in range(tl):
                        acc_m[i] += w
        elif kind == 1 or kind == 2:  # sparse, int32 / int64 indices
            if kind == 1:
                ix32 = i32[s]
                c0 = cur[e]
                c1 = c0 + np.searchsorted(ix32[c0:min(ix32.shape[0], c0 + tl)], t1)
                cur[e] = c1
                if mode == 0:
                    for c in range(c0, c1):
                        j = np.int64(ix32[c]) - t0
                        if (j | (tl - 1 - j)) >= 0:  # 0 <= j < tl with one branch
                            acc_w[j] += w * v[c]
                            acc_m[j] += w
                elif mode == 1:
                    for c in range(c0, c1):
                        j = np.int64(ix32[c]) - t0
                        if (j | (tl - 1 - j)) >= 0:
                            acc_w[j] += w * v[c]
                else:
                    for c in range(c0, c1):
                        j = np.int64(ix32[c])
                        if j >= t0 and j < t1:
                            out[j] = out[j] * (1.0 - w) + v[c] * w
            else:
                ix64 = i64[s]
                c0 = cur[e]
                c1 = c0 + np.searchsorted(ix64[c0:min(ix64.shape[0], c0 + tl)], t1)
                cur[e] = c1
                for c in range(c0, c1):
                    j = ix64[c] - t0
                    if j >= 0 and j < tl:
                        if mode == 2:
                            out[t0 + j] = out[t0 + j] * (1.0 - w) + v[c] * w
                        else:
                            acc_w[j] += w * v[c]
                            if mode == 0:
                                acc_m[j] += w
        elif kind == 3:  # slices: rows of the leading axis x flat offsets inside a row
            r = rows[s]
            off = inner[s]
            stride = strides[e]
            n_in = off.shape[0]
            a0 = np.searchsorted(r, t0 // stride)
            a1 = np.searchsorted(r, (t1 - 1) // stride, side="right")
            for a in range(a0, a1):
                base = r[a] * stride
                b0 = np.searchsorted(off, t0 - base) if base < t0 else 0
                b1 = np.searchsorted(off, t1 - base) if base + stride > t1 else n_in
                for b in range(b0, b1):
                    j = base + off[b] - t0
                    if j >= 0 and j < tl:
                        x = v[a * n_in + b]
                        if mode == 2:
                            out[t0 + j] = out[t0 + j] * (1.0 - w) + x * w
                        else:
                            acc_w[j] += w * x
                            if mode == 0:
                                acc_m[j] += w
        else:  # masked full-shape values
            m = masks[s]
            if mode == 2:
                for i in range(tl):
                    if m[t0 + i]:
                        out[t0 + i] = out[t0 + i] * (1.0 - w) + v[t0 + i] * w
            else:
                for i in range(tl):
                    if m[t0 + i]:
                        acc_w[i] += w * v[t0 + i]
                        if mode == 0:
                            acc_m[i] += w
    if mode == 0:  # branch-free so that the division vectorises
        for i in range(tl):
            d = acc_m[i]
            q = acc_w[i] / (d if d > 0.0 else 1.0)
            out[t0 + i] = q if d > 0.0 else old[t0 + i]
    elif mode == 1:
        for i in range(tl):
            out[t0 + i] = old[t0 + i] + acc_w[i] * scale


@njit(cache=True, nogil=True, error_model="numpy")
def _chunk(ch, nchunks, n, tile, kinds, slots, weights, strides, vals, i32, i64, rows, inner, masks,
           old, out, mode, scale):
    ntiles = (n + tile - 1) // tile
    lo = ch * ntiles // nchunks
    hi = (ch + 1) * ntiles // nchunks
    acc_w = np.empty(tile, np.float64)
    acc_m = np.empty(tile if mode == 0 else 1, np.float64)
    cur = np.zeros(kinds.shape[0], np.int64)
    for e in range(kinds.shape[0]):
        if kinds[e] == 1:
            cur[e] = np.searchsorted(i32[slots[e]], lo * tile)
        elif kinds[e] == 2:
            cur[e] = np.searchsorted(i64[slots[e]], lo * tile)
    for t in range(lo, hi):
        t0 = t * tile
        t1 = min(n, t0 + tile)
        _tile(t0, t1, kinds, slots, weights, strides, vals, i32, i64, rows, inner, masks,
              old, out, mode, scale, acc_w, acc_m, cur)


@njit(cache=True, nogil=True, error_model="numpy")
def _merge_serial(n, tile, kinds, slots, weights, strides, vals, i32, i64, rows, inner, masks,
                  old, out, mode, scale):
    _chunk(0, 1, n, tile, kinds, slots, weights, strides, vals, i32, i64, rows, inner, masks,
           old, out, mode, scale)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _merge_parallel(n, tile, nchunks, kinds, slots, weights, strides, vals, i32, i64, rows, inner, masks,
                    old, out, mode, scale):
    for ch in prange(nchunks):
        _chunk(ch, nchunks, n, tile, kinds, slots, weights, strides, vals, i32, i64, rows, inner, masks,
               old, out, mode, scale)


# ---------------------------------------------------------------------- packing
def _ro(a: np.ndarray, dtype=None) -> np.ndarray:
    """Flat, C-contiguous, read-only view (a copy only when ``a`` is not contiguous
    or has another dtype): the typed lists need one array type per list."""
    a = np.ascontiguousarray(a, dtype=dtype).reshape(-1).view()
    a.flags.writeable = False
    return a


def _slice_offsets(index: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Sorted flat offsets, inside one leading-axis row, of the cross product of
    the trailing per-axis indices."""
    off = np.zeros(1, np.int64)
    for ax in range(1, len(shape)):
        off = (off[:, None] * shape[ax] + np.asarray(index[ax], np.int64)[None, :]).reshape(-1)
    return off


def _pack(pieces: Sequence, shape: tuple[int, ...], dtype: np.dtype, name: str):
    n = math.prod(shape)
    kinds = np.empty(len(pieces), np.int64)
    slots = np.zeros(len(pieces), np.int64)
    strides = np.ones(len(pieces), np.int64)
    vals, i32, i64, rows, inner, masks = (typed.List() for _ in range(6))
    for e, p in enumerate(pieces):
        v = np.asarray(p.values)
        if v.dtype != dtype:
            raise ValueError(f"{name!r}: piece values have dtype {v.dtype}, expected {dtype}")
        vals.append(_ro(v))
        if p.kind == "dense":
            if v.size != n:
                raise ValueError(f"{name!r}: dense piece has {v.size} values, expected {n}")
            kinds[e] = _DENSE
        elif p.kind == "sparse" or (p.kind == "slices" and len(shape) == 1 and len(p.index) == 1):
            ix = np.asarray(p.index[0])  # a 1-D slice index is a flat sparse index
            if ix.ndim != 1 or ix.shape[0] != v.size or not np.issubdtype(ix.dtype, np.integer):
                raise ValueError(f"{name!r}: sparse index does not match its {v.size} values")
            if ix.size and (ix[0] < 0 or ix[-1] >= n):
                raise ValueError(f"{name!r}: sparse index out of range [0, {n})")
            if ix.dtype == np.int32:
                kinds[e], slots[e] = _SPARSE32, len(i32)
                i32.append(_ro(ix))
            else:
                kinds[e], slots[e] = _SPARSE64, len(i64)
                i64.append(_ro(ix, np.int64))
        elif p.kind == "slices":
            index = [np.asarray(ix) for ix in p.index]
            if len(index) != len(shape) or not shape:
                raise ValueError(f"{name!r}: slices need one index per axis of {shape}")
            for ax, ix in enumerate(index):
                if ix.size and (ix.min() < 0 or ix.max() >= shape[ax]):
                    raise ValueError(f"{name!r}: slice index of axis {ax} out of range [0, {shape[ax]})")
            if v.size != math.prod(len(ix) for ix in index):
                raise ValueError(f"{name!r}: slice values do not match the index block")
            kinds[e], slots[e] = _SLICES, len(rows)
            strides[e] = max(1, math.prod(shape[1:]))
            rows.append(index[0].astype(np.int64))
            inner.append(_slice_offsets(index, shape))
        elif p.kind == "masked":
            m = np.asarray(p.index[0])
            if m.dtype != np.bool_ or m.size != n or v.size != n:
                raise ValueError(f"{name!r}: masked piece needs a bool mask and values of {n} elements")
            kinds[e], slots[e] = _MASKED, len(masks)
            masks.append(_ro(m))
        else:
            raise ValueError(f"{name!r}: unknown piece kind {p.kind!r}")
    # Every typed list needs its element type even when no piece uses it.
    for lst, like in ((vals, np.empty(0, dtype)), (i32, np.empty(0, np.int32)), (i64, np.empty(0, np.int64)),
                      (masks, np.empty(0, np.bool_))):
        if len(lst) == 0:
            lst.append(_ro(like))
    for lst in (rows, inner):
        if len(lst) == 0:
            lst.append(np.zeros(1, np.int64))
    return kinds, slots, strides, vals, i32, i64, rows, inner, masks


def _check_mode(mode: int, weights: np.ndarray) -> None:
    if mode not in _MODES:
        raise ValueError(f"unknown merge mode {mode!r}")
    if weights.size and (not np.isfinite(weights).all() or weights.min() < 0):
        raise ValueError("merge weights must be finite and >= 0")
    if mode == MIX and weights.size and weights.max() > 1:
        raise ValueError("mixing rates must be in [0, 1]")


def merge(old: np.ndarray, pieces: Sequence, weights: Sequence[float], mode: int = MEAN, *,
          scale: float = 1.0, tile: int = TILE, parallel: bool | None = None, name: str = "tensor") -> np.ndarray:
    """Merge ``pieces`` of one tensor into a new array shaped and typed like ``old``.

    ``weights[i]`` belongs to ``pieces[i]``; ``scale`` is the DELTA step factor
    (ignored otherwise). ``parallel=None`` runs the tiles on
    ``numba.get_num_threads()`` threads when the tensor has at least two
    tiles; ``True`` / ``False`` force it. ``name`` only labels errors.
    ``old``'s dtype must be in :data:`DTYPES`.
    """
    old = np.asarray(old)
    if old.dtype not in DTYPES:
        raise ValueError(f"{name!r}: merge kernels take float32/float64 tensors, got {old.dtype}")
    w = np.ascontiguousarray(weights, dtype=np.float64).reshape(-1)
    if w.size != len(pieces):
        raise ValueError(f"{name!r}: {len(pieces)} pieces but {w.size} weights")
    _check_mode(mode, w)
    tile = int(tile)
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    flat_old = _ro(old)
    out = np.empty(old.shape, old.dtype)
    n = flat_old.size
    if n == 0 or not pieces:
        out[...] = old
        return out
    kinds, slots, strides, *lists = _pack(pieces, tuple(old.shape), old.dtype, name)
    packed = (kinds, slots, w, strides, *lists)
    ntiles = (n + tile - 1) // tile
    threads = numba.get_num_threads()
    if parallel is None:
        parallel = threads > 1 and ntiles > 1
    flat_out = out.reshape(-1)
    if parallel:
        _merge_parallel(n, tile, max(1, min(threads, ntiles)), *packed, flat_old, flat_out, mode, float(scale))
    else:
        _merge_serial(n, tile, *packed, flat_old, flat_out, mode, float(scale))
    return out


# --------------------------------------------------------------------- reference
def _coverage(p, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Full-shape float64 values and bool mask of one piece (reference only)."""
    vals = np.zeros(shape, np.float64)
    m = np.zeros(shape, bool)
    v = np.asarray(p.values)
    if p.kind == "dense":
        vals[...] = v.reshape(shape)
        m[...] = True
    elif p.kind == "sparse":
        vals.reshape(-1)[p.index[0]] = v
        m.reshape(-1)[p.index[0]] = True
    elif p.kind == "slices":
        ix = np.ix_(*p.index)
        vals[ix] = v
        m[ix] = True
    elif p.kind == "masked":
        m[...] = np.asarray(p.index[0]).reshape(shape)
        vals[m] = v.reshape(shape)[m]
    else:
        raise ValueError(f"unknown piece kind {p.kind!r}")
    return vals, m


def merge_reference(old: np.ndarray, pieces: Sequence, weights: Sequence[float], mode: int = MEAN, *,
                    scale: float = 1.0) -> np.ndarray:
    """Plain numpy statement of :func:`merge` (full-shape passes, same order and
    float64 sums; for tests)."""
    old = np.asarray(old)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    _check_mode(mode, w)
    shape = old.shape
    if mode == MIX:
        x = np.array(old, copy=True)
        for p, wi in zip(pieces, w):
            v, m = _coverage(p, shape)
            mixed = (x.astype(np.float64) * (1.0 - wi) + v * wi).astype(old.dtype)
            x = np.where(m, mixed, x)
        return x
    acc_w = np.zeros(shape, np.float64)
    acc_m = np.zeros(shape, np.float64)
    for p, wi in zip(pieces, w):
        v, m = _coverage(p, shape)
        acc_w[m] += wi * v[m]
        acc_m[m] += wi
    if mode == DELTA:
        return (old.astype(np.float64) + acc_w * float(scale)).astype(old.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = acc_w / acc_m
    return np.where(acc_m > 0, q, old).astype(old.dtype)
