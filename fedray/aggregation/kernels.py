"""Cache-blocked multi-way merge of masked updates (numba kernels).

The aggregator merges K encoded updates of one tensor without decoding them
to full shape. :func:`merge` walks the tensor's flat coordinates in tiles of
``tile`` coordinates (rounded up to a power of two; default 16384: the two
float64 tile accumulators take 256 KiB and stay in L2); inside a tile every *piece* (one contribution's
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
- ``"bitmask"``: ``index = (bits,)``: the flattened mask packed 8
  coordinates a byte, coordinate ``i`` in bit ``i % 8`` of byte ``i // 8``
  (``np.packbits(..., bitorder="little")``, :data:`fedray.submodel.encode.BITORDER`),
  and ``values`` the covered values in coordinate order. It is merged as it
  travels: per two mask bytes, one masked *expand load* (``vexpandps`` on
  AVX-512; LLVM emulates it elsewhere) puts the next ``popcount`` values in
  the 16 lanes whose bits are set, and one masked vector add per accumulator
  takes them in;
- ``"masked"``: ``index = (mask,)`` a full-shape bool mask and ``values``
  full-shape values; coordinates outside the mask are never read into a sum
  (they may hold anything, NaN included).

Pieces must be valid (what :func:`fedray.aggregation.validate.check` ensures
for payloads: sorted unique in-range indices, matching lengths); :func:`merge`
re-checks sizes and the first/last index in O(1) per piece, the kernel
never writes outside its tile buffers for any index array (offsets are
masked to the power-of-two tile) and never reads past a bitmask piece's
values (it stops at a byte pair with more set bits than values are left),
so an invalid piece gives a wrong result, never a memory error.

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

import contextlib
import contextvars
import math
import sys
from typing import NamedTuple, Sequence

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir

from fedray.submodel.encode import decode_entry

__all__ = ["MEAN", "DELTA", "MIX", "TILE", "DTYPES", "Piece", "merge", "merge_many", "merge_reference",
           "all_finite", "popcount", "strictly_increasing"]

MEAN, DELTA, MIX = 0, 1, 2
TILE = 16384
PARALLEL_MIN = 1 << 20
"""Coordinates below which a merge runs on one thread: waking the thread pool costs more than
it saves, and its idle workers spin on the cores the client actors train on."""
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_DENSE, _SPARSE32, _SPARSE64, _SLICES, _MASKED, _BITMASK = 0, 1, 2, 3, 4, 5
_MODES = {MEAN: "MEAN", DELTA: "DELTA", MIX: "MIX"}


class Piece(NamedTuple):
    """One contribution's part of one tensor (see the module docstring)."""

    kind: str
    values: np.ndarray
    index: tuple = ()


# ---------------------------------------------------------------------- kernels
# The kernels see the pieces through two int64 tables of raw addresses and
# lengths (building numba typed lists costs ~5 us per array from Python, i.e.
# tens of milliseconds per aggregation; a table row costs ~1 us). The Python
# side keeps every referenced array alive for the duration of the call.
#
# pieces table columns: kind, values addr, #values, index addr (sparse index,
#   slice rows (int64), mask or packed bits), #index, inner-offsets addr, #inner, row stride
# tensors table columns: old addr, out addr, #coordinates, first piece, end piece
# work table columns: tensor, first tile, end tile (tiles run in order inside an item)
_AHEAD = 512  # values to prefetch ahead in a bitmask piece (measured: 256-1024 all help, ~15%)
_K, _VAL, _NVAL, _IDX, _NIDX, _INN, _NINN, _STRIDE = range(8)
_OLD, _OUT, _N, _P0, _P1 = range(5)


@intrinsic
def _voidptr(typingctx, addr):
    """int64 address -> void* (for ``numba.carray``)."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(addr), codegen


@intrinsic
def _expand16(typingctx, like, acc_w, acc_m, vals, word, w, with_m):
    """Two mask bytes of a bitmask piece into 16 tile slots; returns their popcount.

    ``acc_w`` / ``acc_m``: addresses of 16 consecutive float64 accumulators;
    ``vals``: address of the first value to take (dtype of ``like``);
    ``word``: ``byte0 | byte1 << 8`` (lane j = coordinate j: the little
    bit order of the wire format). For every set lane j: ``acc_w[j] += w *
    float64(v)`` and, when ``with_m``, ``acc_m[j] += w`` (a select keeps the
    other lanes bit for bit). Reads exactly ``popcount(word)`` values.
    """
    if not isinstance(like, types.Array) or like.dtype not in (types.float32, types.float64):
        return None

    def codegen(context, builder, signature, args):
        _, aw, am, vp, word_, w_, wm = args
        mod = builder.module
        i16, ptr, f64 = ir.IntType(16), ir.PointerType(), ir.DoubleType()
        ft = ir.FloatType() if like.dtype == types.float32 else f64
        vt, v64, v1 = ir.VectorType(ft, 16), ir.VectorType(f64, 16), ir.VectorType(ir.IntType(1), 16)
        x16 = builder.trunc(word_, i16)
        mask = builder.bitcast(x16, v1)  # lane j = bit j = coordinate j
        name = "llvm.masked.expandload.v16f32" if ft is not f64 else "llvm.masked.expandload.v16f64"
        expand = cgutils.get_or_insert_function(mod, ir.FunctionType(vt, [ptr, v1, vt]), name)
        x = builder.call(expand, [builder.inttoptr(vp, ptr), mask, ir.Constant(vt, None)])
        if ft is not f64:
            x = builder.fpext(x, v64)
        ws = ir.Constant(v64, None)
        for j in range(16):
            ws = builder.insert_element(ws, w_, ir.Constant(ir.IntType(32), j))

        def add(addr, term):
            p = builder.inttoptr(addr, ptr)
            old = builder.load(p, typ=v64)
            old.align = 8
            builder.store(builder.select(mask, builder.fadd(old, term), old), p).align = 8

        add(aw, builder.fmul(x, ws))  # the same float64 product and sum as the scalar path
        with builder.if_then(builder.icmp_unsigned("!=", wm, ir.Constant(wm.type, 0))):
            add(am, ws)
        ctpop = cgutils.get_or_insert_function(mod, ir.FunctionType(i16, [i16]), "llvm.ctpop.i16")
        return builder.zext(builder.call(ctpop, [x16]), ir.IntType(64))

    return types.int64(like, acc_w, acc_m, vals, word, w, with_m), codegen


@intrinsic
def _prefetch(typingctx, addr):
    """Software prefetch of the cache line at ``addr`` into all cache levels (a hint:
    never faults). The bitmask loop interleaves K value streams tile by tile,
    which the hardware prefetchers follow poorly."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32, ptr = ir.IntType(32), ir.PointerType()
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr, i32, i32, i32]),
                                           "llvm.prefetch.p0")
        builder.call(f, [builder.inttoptr(args[0], ptr), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(addr), codegen


@intrinsic
def _popcount8(typingctx, byte):
    """Set bits of one mask byte (int64)."""
    if not isinstance(byte, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i8 = ir.IntType(8)
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i8, [i8]), "llvm.ctpop.i8")
        return builder.zext(builder.call(f, [builder.trunc(args[0], i8)]), ir.IntType(64))

    return types.int64(byte), codegen


@intrinsic
def _popcount64(typingctx, word):
    """Set bits of one unsigned integer of up to 64 bits (zero-extended; int64)."""
    if not isinstance(word, types.Integer) or word.bitwidth > 64:
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64")
        x = args[0] if word.bitwidth == 64 else builder.zext(args[0], i64)
        return builder.call(f, [x])

    return types.int64(word), codegen


@njit(cache=True, nogil=True)
def _aligned(n):
    """float64 work array of ``n`` elements starting on a 64-byte boundary (whole vector rows)."""
    raw = np.empty(n + 8, np.float64)
    off = ((-raw.ctypes.data) & 63) >> 3
    return raw[off:off + n]


@njit(cache=True, nogil=True, error_model="numpy")
def _item(wi, work, tens, pcs, weights, like, mode, scale, tile):
    t = work[wi, 0]
    lo, hi = work[wi, 1], work[wi, 2]
    n = tens[t, _N]
    p0, p1 = tens[t, _P0], tens[t, _P1]
    old = numba.carray(_voidptr(tens[t, _OLD]), n, like.dtype)
    out = numba.carray(_voidptr(tens[t, _OUT]), n, like.dtype)
    acc_w = _aligned(tile)
    acc_m = _aligned(tile if mode == 0 else 1)  # only MEAN reads it
    # Accumulators have a power-of-two length: masking a tile offset with
    # ``wrap`` costs one AND and keeps even an invalid (unsorted) index array
    # inside them (a wrong result, never a stray write); MIX writes ``out``
    # directly and checks the range instead.
    wrap = tile - 1
    # cur[e]: first position of sparse piece e not below the tile start. At most
    # ``tl`` unique sorted indices fall in a tile, so its end is a binary
    # search over ``tl`` entries.
    cur = np.zeros(p1 - p0, np.int64)
    for e in range(p0, p1):
        if pcs[e, _K] == 1:
            cur[e - p0] = np.searchsorted(numba.carray(_voidptr(pcs[e, _IDX]), pcs[e, _NIDX], np.int32), lo * tile)
        elif pcs[e, _K] == 2:
            cur[e - p0] = np.searchsorted(numba.carray(_voidptr(pcs[e, _IDX]), pcs[e, _NIDX], np.int64), lo * tile)
        elif pcs[e, _K] == 5:  # values before the first tile: popcount of the bytes before it
            bits = numba.carray(_voidptr(pcs[e, _IDX]), pcs[e, _NIDX], np.uint8)
            cur[e - p0] = _popcount(bits[:(lo * tile) >> 3])
    itemsize = like.itemsize
    aw0 = acc_w.ctypes.data
    am0 = acc_m.ctypes.data
    fin = 0.0
    for tt in range(lo, hi):
        t0 = tt * tile
        t1 = min(n, t0 + tile)
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
        for e in range(p0, p1):
            kind = pcs[e, _K]
            w = weights[e]
            v = numba.carray(_voidptr(pcs[e, _VAL]), pcs[e, _NVAL], like.dtype)
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
            elif kind == 1:  # sparse, int32 indices (the common case)
                ix = numba.carray(_voidptr(pcs[e, _IDX]), pcs[e, _NIDX], np.int32)
                c0 = cur[e - p0]
                c1 = c0 + np.searchsorted(ix[c0:min(ix.shape[0], c0 + tl)], t1)
                cur[e - p0] = c1
                if mode == 0:
                    for c in range(c0, c1):
                        j = (np.int64(ix[c]) - t0) & wrap
                        acc_w[j] += w * v[c]
                        acc_m[j] += w
                elif mode == 1:
                    for c in range(c0, c1):
                        j = (np.int64(ix[c]) - t0) & wrap
                        acc_w[j] += w * v[c]
                else:
                    for c in range(c0, c1):
                        j = np.int64(ix[c])
                        if j >= t0 and j < t1:
                            out[j] = out[j] * (1.0 - w) + v[c] * w
            elif kind == 2:  # sparse, int64 indices
                ix64 = numba.carray(_voidptr(pcs[e, _IDX]), pcs[e, _NIDX], np.int64)
                c0 = cur[e - p0]
                c1 = c0 + np.searchsorted(ix64[c0:min(ix64.shape[0], c0 + tl)], t1)
                cur[e - p0] = c1
                for c in range(c0, c1):
                    j = ix64[c] - t0
                    if mode != 2:
                        acc_w[j & wrap] += w * v[c]
                        if mode == 0:
                            acc_m[j & wrap] += w
                    elif j >= 0 and j < tl:
                        out[t0 + j] = out[t0 + j] * (1.0 - w) + v[c] * w
            elif kind == 3:  # slices: rows of the leading axis x flat offsets inside a row
                r = numba.carray(_voidptr(pcs[e, _IDX]), pcs[e, _NIDX], np.int64)
                off = numba.carray(_voidptr(pcs[e, _INN]), pcs[e, _NINN], np.int64)
                stride = pcs[e, _STRIDE]
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
            elif kind == 5:  # bitmask: pairs of bytes = 16 coordinates (tiles start on a pair)
                bits = numba.carray(_voidptr(pcs[e, _IDX]), pcs[e, _NIDX], np.uint8)
                nb = bits.shape[0]
                nv = v.shape[0]
                c = cur[e - p0]
                b1 = min(nb, (t1 + 7) >> 3)
                if mode == 2:
                    for b in range(t0 >> 3, b1):
                        byte = bits[b]
                        for j in range(8):
                            if (byte >> j) & 1:
                                i = b * 8 + j
                                if i < t1 and c < nv:
                                    out[i] = out[i] * (1.0 - w) + v[c] * w
                                c += 1
                else:
                    vaddr = pcs[e, _VAL]
                    for b in range(t0 >> 3, b1, 2):
                        word = np.int64(bits[b]) | ((np.int64(bits[b + 1]) << 8) if b + 1 < nb else 0)
                        if word:
                            if c + 16 > nv and c + _popcount8(word >> 8) + _popcount8(word) > nv:
                                break  # more set bits than values: invalid piece, never read past them
                            _prefetch(vaddr + (c + _AHEAD) * itemsize)
                            o = ((b * 8 - t0) & wrap) * 8  # 16 slots inside the tile (tile >= 16)
                            c += _expand16(like, aw0 + o, am0 + o, vaddr + c * itemsize, word, w, mode == 0)
                cur[e - p0] = c
            else:  # masked full-shape values
                m = numba.carray(_voidptr(pcs[e, _IDX]), pcs[e, _NIDX], np.bool_)
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
        _finish(acc_w, acc_m, old[t0:t1], out[t0:t1], mode, scale)
        fin += _finite_sum(out[t0:t1])  # the tile just written, still in cache: 0, or NaN if not finite
    return fin


@njit(cache=True, nogil=True, error_model="numpy")
def _finish(acc_w, acc_m, old, out, mode, scale):
    """Tile accumulators -> ``out`` (MEAN / DELTA; MIX wrote ``out`` already). A
    function of its own: inlined in ``_item``, LLVM turned the select into a
    branch that mispredicts on every other coordinate of a 50% mask."""
    if mode == 0:  # acc_w / 0 where uncovered is computed and discarded: the loop vectorises
        for i in range(out.shape[0]):
            d = acc_m[i]
            q = acc_w[i] / d
            out[i] = q if d > 0.0 else old[i]
    elif mode == 1:
        for i in range(out.shape[0]):
            out[i] = old[i] + acc_w[i] * scale


@njit(cache=True, nogil=True, error_model="numpy")
def _run_serial(work, tens, pcs, weights, like, mode, scale, tile, fin):
    for wi in range(work.shape[0]):
        fin[wi] = _item(wi, work, tens, pcs, weights, like, mode, scale, tile)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _run_parallel(work, tens, pcs, weights, like, mode, scale, tile, fin):
    for wi in prange(work.shape[0]):
        fin[wi] = _item(wi, work, tens, pcs, weights, like, mode, scale, tile)


_STARTED = False  # numba's thread pool (started by the first numba.get_num_threads of the process)


def _threads() -> int:
    """``numba.get_num_threads()``. Its first call starts numba's thread pool; with the OpenMP
    layer that sets OpenMP's thread count, which is torch's too (one libgomp), so torch's count
    (``cluster.torch_threads``) is put back: the pool keeps its own threads."""
    global _STARTED
    if _STARTED:
        return numba.get_num_threads()
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    n = numba.get_num_threads()
    _STARTED = True
    if torch is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
    return n


# ---------------------------------------------------------------------- packing
def _ro(a: np.ndarray, dtype=None) -> np.ndarray:
    """Flat, C-contiguous view (a copy only when ``a`` is not contiguous or
    has another dtype)."""
    if a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
        return a.reshape(-1)
    return np.ascontiguousarray(a, dtype=dtype).reshape(-1)


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _slice_offsets(index: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Sorted flat offsets, inside one leading-axis row, of the cross product of
    the trailing per-axis indices."""
    off = np.zeros(1, np.int64)
    for ax in range(1, len(shape)):
        off = (off[:, None] * shape[ax] + np.asarray(index[ax], np.int64)[None, :]).reshape(-1)
    return off


def _row(p, shape: tuple[int, ...], dtype: np.dtype, name: str, keep: list) -> list[int]:
    """One pieces-table row; appends every array it points to to ``keep``."""
    n = math.prod(shape)
    v = np.asarray(p.values)
    if v.dtype != dtype:
        raise ValueError(f"{name!r}: piece values have dtype {v.dtype}, expected {dtype}")
    v = _ro(v)
    keep.append(v)
    row = [0, _addr(v), v.size, 0, 0, 0, 0, 1]
    if p.kind == "dense":
        if v.size != n:
            raise ValueError(f"{name!r}: dense piece has {v.size} values, expected {n}")
    elif p.kind == "sparse" or (p.kind == "slices" and len(shape) == 1 and len(p.index) == 1):
        ix = np.asarray(p.index[0])  # a 1-D slice index is a flat sparse index
        if ix.ndim != 1 or ix.shape[0] != v.size or ix.dtype.kind not in "iu":
            raise ValueError(f"{name!r}: sparse index does not match its {v.size} values")
        if ix.size and (ix[0] < 0 or ix[-1] >= n):
            raise ValueError(f"{name!r}: sparse index out of range [0, {n})")
        ix = _ro(ix) if ix.dtype == np.int32 else _ro(ix, np.int64)
        keep.append(ix)
        row[_K] = _SPARSE32 if ix.dtype == np.int32 else _SPARSE64
        row[_IDX], row[_NIDX] = _addr(ix), ix.size
    elif p.kind == "slices":
        index = [np.asarray(ix) for ix in p.index]
        if len(index) != len(shape) or not shape:
            raise ValueError(f"{name!r}: slices need one index per axis of {shape}")
        for ax, ix in enumerate(index):
            if ix.size and (ix.min() < 0 or ix.max() >= shape[ax]):
                raise ValueError(f"{name!r}: slice index of axis {ax} out of range [0, {shape[ax]})")
        if v.size != math.prod(len(ix) for ix in index):
            raise ValueError(f"{name!r}: slice values do not match the index block")
        rows = index[0].astype(np.int64)
        inner = _slice_offsets(index, shape)
        keep.extend((rows, inner))
        row[_K] = _SLICES
        row[_IDX], row[_NIDX], row[_INN], row[_NINN] = _addr(rows), rows.size, _addr(inner), inner.size
        row[_STRIDE] = max(1, math.prod(shape[1:]))
    elif p.kind == "bitmask":
        bits = np.asarray(p.index[0])
        if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != -(-n // 8):
            raise ValueError(f"{name!r}: bitmask needs {-(-n // 8)} uint8 bytes")
        bits = _ro(bits)
        keep.append(bits)
        row[_K] = _BITMASK
        row[_IDX], row[_NIDX] = _addr(bits), bits.size
    elif p.kind == "masked":
        m = np.asarray(p.index[0])
        if m.dtype != np.bool_ or m.size != n or v.size != n:
            raise ValueError(f"{name!r}: masked piece needs a bool mask and values of {n} elements")
        m = _ro(m)
        keep.append(m)
        row[_K] = _MASKED
        row[_IDX], row[_NIDX] = _addr(m), m.size
    else:
        raise ValueError(f"{name!r}: unknown piece kind {p.kind!r}")
    return row


def _check_mode(mode: int, weights: np.ndarray) -> None:
    if mode not in _MODES:
        raise ValueError(f"unknown merge mode {mode!r}")
    if weights.size and (not np.isfinite(weights).all() or weights.min() < 0):
        raise ValueError("merge weights must be finite and >= 0")
    if mode == MIX and weights.size and weights.max() > 1:
        raise ValueError("mixing rates must be in [0, 1]")


_SEEN: contextvars.ContextVar = contextvars.ContextVar("fedray_merge_finite", default=None)


@contextlib.contextmanager
def finite_outputs():
    """Inside the block, every array :func:`merge_many` writes is recorded in the yielded dict as
    ``{id(array): (array, finite)}``; ``finite`` comes from the kernel's own writes (each tile is
    summed times zero while it is still in cache), so checking the merged model costs no second
    read of it. Valid only for arrays nobody modified in place since (the aggregator asks right
    after the server's ``aggregate``; see ``Server.fused_check``)."""
    seen: dict = {}
    token = _SEEN.set(seen)
    try:
        yield seen
    finally:
        _SEEN.reset(token)


def merge_many(olds: Sequence[np.ndarray], pieces: Sequence[Sequence], weights: Sequence[Sequence[float]],
               mode: int = MEAN, *, scale: float = 1.0, tile: int | None = None, parallel: bool | None = None,
               names: Sequence[str] | None = None) -> list[np.ndarray]:
    """:func:`merge` for several tensors of one dtype in one kernel call.

    ``pieces[t]`` / ``weights[t]`` belong to ``olds[t]``. With ``parallel``
    (default: when ``numba.get_num_threads() > 1`` and the tensors hold at least
    :data:`PARALLEL_MIN` coordinates) the tiles of all tensors are cut into about four
    contiguous work items per thread and run with ``prange``; each coordinate's sum is
    the same whatever the cut.
    """
    olds = [np.asarray(o) for o in olds]
    names = [f"tensor {i}" for i in range(len(olds))] if names is None else list(names)
    if not (len(pieces) == len(weights) == len(olds) == len(names)):
        raise ValueError("olds, pieces, weights and names must have the same length")
    if not olds:
        return []
    dtype = olds[0].dtype
    if dtype not in DTYPES or any(o.dtype != dtype for o in olds):
        raise ValueError(f"merge kernels take tensors of one dtype among float32/float64, got "
                         f"{sorted({str(o.dtype) for o in olds})}")
    tile = TILE if tile is None else int(tile)
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    tile = max(16, 1 << (tile - 1).bit_length())  # a power of two (see _item), whole bitmask byte pairs
    keep: list[np.ndarray] = []
    outs: list[np.ndarray] = []
    tens, rows, wts, spans = [], [], [], []
    for old, ps, ws, name in zip(olds, pieces, weights, names):
        w = np.asarray(ws, dtype=np.float64).reshape(-1)
        if w.size != len(ps):
            raise ValueError(f"{name!r}: {len(ps)} pieces but {w.size} weights")
        _check_mode(mode, w)
        out = np.empty(old.shape, dtype)
        outs.append(out)
        if old.size == 0 or not ps:
            out[...] = old
            continue
        flat_old = _ro(old)
        keep.append(flat_old)
        p0 = len(rows)
        rows.extend(_row(p, tuple(old.shape), dtype, name, keep) for p in ps)
        wts.append(w)
        tens.append([_addr(flat_old), _addr(out), old.size, p0, len(rows)])
        spans.append((-(-old.size // tile)))
    if not tens:
        return outs
    threads = _threads()
    total = sum(spans)
    if parallel is None:
        parallel = threads > 1 and total > 1 and sum(o.size for o in olds) >= PARALLEL_MIN
    per_item = max(1, -(-total // (4 * threads))) if parallel else max(spans)
    work = [[t, lo, min(lo + per_item, nt)] for t, nt in enumerate(spans) for lo in range(0, nt, per_item)]
    fin = np.zeros(len(work))
    args = (np.array(work, np.int64), np.array(tens, np.int64), np.array(rows, np.int64),
            np.concatenate(wts), np.empty(0, dtype), mode, float(scale), tile, fin)
    (_run_parallel if parallel else _run_serial)(*args)
    del keep
    seen = _SEEN.get()
    if seen is not None:  # whether each tensor the kernel wrote is finite, from its own writes
        by_tensor = np.zeros(len(tens))
        np.add.at(by_tensor, args[0][:, 0], fin)
        done = [out for out, (old, ps) in zip(outs, zip(olds, pieces)) if old.size and ps]
        for out, x in zip(done, by_tensor):
            seen[id(out)] = (out, bool(x == 0.0))
    return outs


def merge(old: np.ndarray, pieces: Sequence, weights: Sequence[float], mode: int = MEAN, *,
          scale: float = 1.0, tile: int | None = None, parallel: bool | None = None, name: str = "tensor") -> np.ndarray:
    """Merge ``pieces`` of one tensor into a new array shaped and typed like ``old``.

    ``weights[i]`` belongs to ``pieces[i]``; ``scale`` is the DELTA step factor
    (ignored otherwise); ``tile`` (default :data:`TILE`, read at call time)
    is rounded up to a power of two.
    ``parallel=None`` runs on ``numba.get_num_threads()`` threads when there
    are at least two tiles and :data:`PARALLEL_MIN` coordinates; ``True`` / ``False``
    force it. ``name`` only labels errors. ``old``'s dtype must be in :data:`DTYPES`.
    """
    old = np.asarray(old)
    if old.dtype not in DTYPES:
        raise ValueError(f"{name!r}: merge kernels take float32/float64 tensors, got {old.dtype}")
    return merge_many([old], [pieces], [weights], mode, scale=scale, tile=tile, parallel=parallel,
                      names=[name])[0]


# ------------------------------------------------------------------ validation
@njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})
def _finite_sum(v):
    """``sum(v * 0)``: 0 when every element is finite, NaN as soon as one is Inf or
    NaN. Reassociation lets the sum vectorise (one streaming pass); without the
    no-NaN / no-Inf flags LLVM may not fold ``v * 0`` to 0."""
    s = v.dtype.type(0.0)
    for i in range(v.shape[0]):
        s += v[i] * v.dtype.type(0.0)
    return s


@njit(cache=True, nogil=True)
def _increasing_in(ix, lo, hi):
    if ix.shape[0] == 0:
        return True
    ok = (ix[0] >= lo) & (ix[ix.shape[0] - 1] < hi)
    for i in range(1, ix.shape[0]):
        ok &= ix[i] > ix[i - 1]
    return ok


@njit(cache=True, nogil=True, parallel=True)
def _finite_sum_parallel(v, chunk):
    """:func:`_finite_sum` of ``chunk``-long pieces on all numba threads (NaN if any piece is)."""
    parts = np.zeros(-(-v.shape[0] // chunk), v.dtype)
    for c in prange(parts.shape[0]):
        parts[c] = _finite_sum(v[c * chunk:min(v.shape[0], (c + 1) * chunk)])
    return _finite_sum(parts)


def all_finite(a: np.ndarray) -> bool:
    """No NaN and no Inf in ``a``: one vectorised pass for float32/float64, no temporaries (on
    every numba thread from :data:`PARALLEL_MIN` elements, as the merge)."""
    a = np.asarray(a)
    if a.dtype not in DTYPES:
        return bool(np.isfinite(a).all())
    flat = _ro(a)
    if flat.size >= PARALLEL_MIN and _threads() > 1:
        return bool(_finite_sum_parallel(flat, TILE * 16) == 0.0)
    return bool(_finite_sum(flat) == 0.0)


@njit(cache=True, nogil=True)
def _popcount(words):
    """Set bits of an array of unsigned integers (uint8 bytes or uint64 words)."""
    c = 0
    for i in range(words.shape[0]):
        c += _popcount64(words[i])
    return c


@njit(cache=True, nogil=True)
def _popcount_rows(addrs, sizes, out):
    """``out[i]`` = set bits of the ``sizes[i]`` bytes at ``addrs[i]``: 64 bits per step from the
    first 8-aligned byte, the bytes before and after it one by one."""
    for i in range(addrs.shape[0]):
        a, n = addrs[i], sizes[i]
        b = numba.carray(_voidptr(a), n, np.uint8)
        head = min(n, (8 - a % 8) % 8)
        words = (n - head) // 8
        c = _popcount(b[:head]) + _popcount(b[head + 8 * words:])
        if words:
            c += _popcount(numba.carray(_voidptr(a + head), words, np.uint64))
        out[i] = c


def popcounts(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Set bits of each uint8 array in ``masks`` (packed masks' coverage), in one kernel call:
    a payload's masks are counted together, not at ~4 us of call overhead each."""
    masks = [_ro(np.asarray(m)) for m in masks]
    if any(m.dtype != np.uint8 for m in masks):
        raise ValueError(f"packed masks are uint8, got {sorted({str(m.dtype) for m in masks})}")
    out = np.zeros(len(masks), np.int64)
    if masks:
        _popcount_rows(np.array([_addr(m) for m in masks], np.int64), np.array([m.size for m in masks], np.int64), out)
    return out


def popcount(bits: np.ndarray) -> int:
    """Set bits in one uint8 array (see :func:`popcounts`)."""
    return int(popcounts([bits])[0])


def strictly_increasing(ix: np.ndarray, lo: int, hi: int) -> bool:
    """``ix`` (1-D integers) sorted, without duplicates, inside ``[lo, hi)``: one pass."""
    ix = np.asarray(ix)
    if ix.dtype.kind not in "iu":
        raise ValueError(f"index arrays must be integer, got {ix.dtype}")
    return bool(_increasing_in(_ro(ix, np.int64) if ix.dtype.kind == "u" else _ro(ix), lo, hi))


# --------------------------------------------------------------------- reference
def _coverage(p, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Full-shape float64 values and bool mask of one piece (reference only)."""
    if p.kind == "masked":
        m = np.asarray(p.index[0]).reshape(shape)
        vals = np.zeros(shape, np.float64)
        vals[m] = np.asarray(p.values).reshape(shape)[m]
        return vals, m
    v, m = decode_entry(p, shape)  # dense / sparse / slices / bitmask: the wire decoder
    return v.astype(np.float64), m


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
