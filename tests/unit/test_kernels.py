"""Tile merge kernels and the payload buffer against the numpy rules.

Every check compares bit for bit: the kernels form the same float64 products
and sums in contribution order as :class:`rules.MaskedAccumulator`.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from fedray.aggregation import kernels as K
from fedray.aggregation import rules
from fedray.aggregation.merge import PayloadMask, PayloadValues, lazy_decode, payload_backed
from fedray.submodel.encode import BITORDER, Entry, Payload, decode, encode, encode_tensor
from fedray.update import Update

SHAPES = {"conv": (6, 5, 3, 3), "fc": (7, 11), "bias": (13,), "scalar": ()}


def model(rng, dtype=np.float32):
    p = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    p["count"] = np.array(5, np.int64)
    p["flag"] = np.zeros(4, bool)
    return p


def random_mask(rng, shape, how):
    if how == "dense":
        return np.ones(shape, bool)
    if how == "empty":
        return np.zeros(shape, bool)
    if how == "slices" and len(shape) >= 1:
        m = np.zeros(shape, bool)
        idx = [np.sort(rng.choice(n, max(1, n // 2), replace=False)) for n in shape]
        m[np.ix_(*idx)] = True
        return m
    return rng.random(shape) < rng.uniform(0.1, 0.9)


def client(rng, g, how=None):
    """(values, mask) with a per-tensor coverage drawn from sparse/slices/dense/empty/absent."""
    vals, mask = {}, {}
    for k, v in g.items():
        choice = how or rng.choice(["sparse", "slices", "dense", "empty", "absent"])
        if choice == "absent":
            continue
        if np.issubdtype(v.dtype, np.floating):
            vals[k] = (v + rng.normal(size=v.shape)).astype(v.dtype)
        elif v.dtype == bool:
            vals[k] = rng.random(v.shape) < 0.5
        else:
            vals[k] = (v + rng.integers(-3, 4, size=v.shape)).astype(v.dtype)
        mask[k] = random_mask(rng, v.shape, choice)
    return vals, mask


def contributions(rng, g, k, how=None):
    shapes = {n: v.shape for n, v in g.items()}
    fast, plain = [], []
    for _ in range(k):
        vals, mask = client(rng, g, how)
        p = encode(vals, mask)
        w = float(rng.choice([0.0, 1.0, 2.5, rng.uniform(0.1, 30)]))
        fast.append(rules.Contribution(*lazy_decode(p, shapes), w))
        plain.append(rules.Contribution(*decode(p, shapes), w))
    return fast, plain


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------ kernel vs reference
@pytest.mark.parametrize("mode", [K.MEAN, K.DELTA, K.MIX])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_equals_reference_across_tiles_and_threads(mode, dtype):
    rng = np.random.default_rng(mode)
    shape = (9, 4, 5)
    old = rng.normal(size=shape).astype(dtype)
    pieces, ws = [], []
    for how in ["sparse", "slices", "dense", "sparse", "slices"]:
        e = encode_tensor(rng.normal(size=shape).astype(dtype), None if how == "dense" else random_mask(rng, shape, how))
        pieces.append(e)
        ws.append(rng.uniform(0, 1))
    vals = rng.normal(size=shape).astype(dtype)
    m = random_mask(rng, shape, "sparse")
    vals[~m] = np.nan  # never read
    pieces.append(K.Piece("masked", vals, (m,)))
    ws.append(0.5)
    pieces.append(Entry("sparse", rng.normal(size=3).astype(dtype), (np.array([0, 77, 179], np.int64),)))
    ws.append(0.25)
    sl = (np.array([1, 4, 8]), np.array([0, 3]), np.array([2]))
    pieces.append(Entry("slices", rng.normal(size=(3, 2, 1)).astype(dtype), sl))
    ws.append(0.75)
    assert {"bitmask", "slices", "dense", "sparse", "masked"} <= {p.kind for p in pieces}
    ref = K.merge_reference(old, pieces, ws, mode, scale=0.3)
    assert np.isfinite(ref).all()
    for tile in (1, 5, 16, 64, 4096):  # 5 rounds up to 8
        for parallel in (False, True):
            out = K.merge(old, pieces, ws, mode, scale=0.3, tile=tile, parallel=parallel)
            assert out.dtype == old.dtype and out.shape == old.shape
            np.testing.assert_array_equal(out, ref, err_msg=f"tile={tile} parallel={parallel}")


def test_merge_many_matches_single_tensor_merges():
    rng = np.random.default_rng(1)
    olds = [rng.normal(size=s).astype(np.float32) for s in [(50,), (3, 40), (2, 2, 33)]]
    pieces = [[encode_tensor(rng.normal(size=o.shape).astype(np.float32), random_mask(rng, o.shape, "sparse"))
               for _ in range(3)] for o in olds]
    ws = [rng.uniform(0, 2, size=3) for _ in olds]
    outs = K.merge_many(olds, pieces, ws, K.MEAN, tile=16, parallel=True)
    for o, ps, w, out in zip(olds, pieces, ws, outs):
        np.testing.assert_array_equal(out, K.merge(o, ps, w, K.MEAN, tile=16, parallel=False))


def test_kernel_edge_cases():
    old = np.arange(10, dtype=np.float32)
    assert np.array_equal(K.merge(old, [], []), old)
    zero_w = [Entry("sparse", np.full(2, 7, np.float32), (np.array([1, 8], np.int32),))]
    np.testing.assert_array_equal(K.merge(old, zero_w, [0.0]), old)  # zero weight changes nothing
    np.testing.assert_array_equal(K.merge(old, zero_w, [2.0]), np.where(np.isin(np.arange(10), [1, 8]), 7, old))
    np.testing.assert_array_equal(K.merge(old, zero_w, [1.0], K.DELTA, scale=0.5),
                                  old + np.where(np.isin(np.arange(10), [1, 8]), 3.5, 0))
    np.testing.assert_array_equal(K.merge(old, zero_w, [0.25], K.MIX),
                                  np.where(np.isin(np.arange(10), [1, 8]), 0.75 * old + 0.25 * 7, old))
    scalar = np.array(2.0, np.float32)
    assert K.merge(scalar, [Entry("dense", np.array(4.0, np.float32))], [1.0]).shape == ()
    with pytest.raises(ValueError, match="out of range"):
        K.merge(old, [Entry("sparse", np.ones(1, np.float32), (np.array([10], np.int32),))], [1.0])
    with pytest.raises(ValueError, match="dtype"):
        K.merge(old, [Entry("dense", np.ones(10, np.float64))], [1.0])
    with pytest.raises(ValueError, match="weights"):
        K.merge(old, zero_w, [-1.0])
    with pytest.raises(ValueError, match="float32/float64"):
        K.merge(old.astype(np.float16), [], [])
    bits = np.packbits(np.isin(np.arange(10), [1, 8]), bitorder=BITORDER)
    bm = Entry("bitmask", np.full(2, 7, np.float32), (bits,))
    for mode in (K.MEAN, K.DELTA, K.MIX):  # a bitmask merges like the same sparse entry
        np.testing.assert_array_equal(K.merge(old, [bm], [0.25], mode, scale=0.5),
                                      K.merge(old, zero_w, [0.25], mode, scale=0.5))
    short = K.merge(old, [Entry("bitmask", np.ones(1, np.float32), (bits,))], [1.0])  # more bits than values:
    assert np.isfinite(short).all()  # a wrong result (validation rejects such updates), never a read past the end
    with pytest.raises(ValueError, match="uint8 bytes"):
        K.merge(old, [Entry("bitmask", np.ones(2, np.float32), (bits[:1],))], [1.0])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_checks_every_element(dtype):
    a = np.linspace(-3, 3, 1001).astype(dtype)
    a[5] = np.finfo(dtype).max
    assert K.all_finite(a) and K.all_finite(a[::7]) and K.all_finite(a[:0])
    for bad in (np.nan, np.inf, -np.inf):
        for at in (0, 500, 1000):
            b = a.copy()
            b[at] = bad
            assert not K.all_finite(b) and not K.all_finite(b.reshape(7, 11, 13))
    assert K.all_finite(np.arange(5))


def test_all_finite_on_threads_checks_every_chunk():
    n = K.PARALLEL_MIN + 12345  # the threaded path: pieces of TILE * 16, the last one short
    a = np.ones(n, np.float32)
    assert K.all_finite(a)
    for at in (0, K.TILE * 16 - 1, K.TILE * 16, n - 1):
        for bad in (np.nan, -np.inf):
            b = a.copy()
            b[at] = bad
            assert not K.all_finite(b)


def test_popcount_counts_packed_mask_bits():
    m = np.random.default_rng(0).random(1003) < 0.3
    assert K.popcount(np.packbits(m)) == m.sum() and K.popcount(np.zeros(0, np.uint8)) == 0
    raw = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8)
    for start in range(9):  # 64-bit words in the middle, bytes at an unaligned head and tail
        for n in (0, 1, 7, 8, 9, 17, 64, 250):
            b = raw[start:start + n]
            assert K.popcount(b) == int(np.unpackbits(b).sum()), (start, n)
    with pytest.raises(ValueError, match="uint8"):
        K.popcount(np.ones(3, np.int64))


def test_strictly_increasing_is_sorted_unique_in_range():
    ok = np.array([0, 3, 9], np.int32)
    assert K.strictly_increasing(ok, 0, 10) and K.strictly_increasing(ok.astype(np.uint64), 0, 10)
    assert K.strictly_increasing(ok[:0], 0, 0)
    for bad in ([0, 3, 10], [-1, 3], [3, 3], [4, 3]):
        assert not K.strictly_increasing(np.array(bad, np.int64), 0, 10), bad
    with pytest.raises(ValueError, match="integer"):
        K.strictly_increasing(np.array([0.5]), 0, 10)


# ------------------------------------------------------------------ rules fast path
@pytest.mark.parametrize("k", [1, 3, 8])
def test_masked_mean_fast_path_equals_numpy_rules(k):
    rng = np.random.default_rng(k)
    g = model(rng)
    fast, plain = contributions(rng, g, k)
    assert payload_backed(fast) and not payload_backed(plain)
    assert_same(rules.masked_mean(g, fast), rules.masked_mean(g, plain))
    assert_same(rules.width_sliced_mean(g, fast), rules.width_sliced_mean(g, plain))
    assert_same(rules.apply_delta_mean(g, fast, 0.7), rules.apply_delta_mean(g, plain, 0.7))
    rates = rng.uniform(0, 1, size=k)
    assert_same(rules.masked_mix(g, fast, rates), rules.masked_mix(g, plain, rates))


def test_masked_mix_is_fedasync_mix_of_masked_targets():
    from fedray.methods.fedasync import masked_target

    rng = np.random.default_rng(5)
    g = model(rng)
    fast, plain = contributions(rng, g, 3)
    theta = g
    for c, r in zip(plain, [0.3, 0.6, 1.0]):
        theta = rules.mix(theta, masked_target(theta, c), r)
    assert_same(rules.masked_mix(g, fast, [0.3, 0.6, 1.0]), theta)


def test_float64_model_and_all_sparse_vgg_like_masks():
    rng = np.random.default_rng(7)
    g = model(rng, np.float64)
    fast, plain = contributions(rng, g, 4, how="sparse")
    assert_same(rules.masked_mean(g, fast), rules.masked_mean(g, plain))


def test_empty_coverage_keeps_values_and_counts_for_delta():
    rng = np.random.default_rng(3)
    g = model(rng)
    shapes = {k: v.shape for k, v in g.items()}
    empty = rules.Contribution(*lazy_decode(Payload({}), shapes), 4.0)
    assert_same(rules.masked_mean(g, [empty]), {k: v.copy() for k, v in g.items()})
    fast, plain = contributions(rng, g, 2)
    # K = 3 contributions: the empty one still counts in FedBuff's 1/K
    assert_same(rules.apply_delta_mean(g, fast + [empty], 1.0),
                rules.apply_delta_mean(g, plain + [rules.Contribution({}, {}, 4.0)], 1.0))


def test_filtered_mask_dicts_and_nan_outside_mask():
    """HeteroFL passes a filtered plain dict of the decoded masks; arbitrary masks
    over payload values go to the masked piece, NaN outside the mask is ignored."""
    rng = np.random.default_rng(11)
    g = model(rng)
    fast, plain = contributions(rng, g, 3, how="sparse")
    keep = ["conv", "bias", "count"]
    f2 = [rules.Contribution(c.values, {k: c.mask[k] for k in keep if k in c.mask}, c.weight) for c in fast]
    p2 = [rules.Contribution(c.values, {k: c.mask[k] for k in keep if k in c.mask}, c.weight) for c in plain]
    assert_same(rules.masked_mean(g, f2), rules.masked_mean(g, p2))
    # An own mask (not the payload's) over payload values: coordinates the payload lacks read as 0.
    own = random_mask(rng, SHAPES["fc"], "sparse")
    f3 = [rules.Contribution(fast[0].values, {"fc": own}, 1.0)]
    p3 = [rules.Contribution(plain[0].values, {"fc": own}, 1.0)]
    assert_same(rules.masked_mean(g, f3), rules.masked_mean(g, p3))
    nan_vals = np.where(own, 1.0, np.nan).astype(np.float32)
    out = K.merge(g["fc"], [K.Piece("masked", nan_vals, (own,))], [2.0])
    np.testing.assert_array_equal(out, np.where(own, 1.0, g["fc"]))


def test_fast_path_errors_match_rules():
    rng = np.random.default_rng(2)
    g = model(rng)
    fast, _ = contributions(rng, g, 1, how="sparse")
    bad_w = rules.Contribution(fast[0].values, fast[0].mask, -1.0)
    with pytest.raises(ValueError, match="weight"):
        rules.masked_mean(g, [bad_w])
    small = {k: v for k, v in g.items() if k != "conv"}
    with pytest.raises(ValueError, match="unknown parameter key 'conv'"):
        rules.masked_mean(small, fast)
    with pytest.raises(ValueError, match="mixing rate"):
        rules.masked_mix(g, fast, [1.5])


# ------------------------------------------------------------------ buffer and aggregator
def test_lazy_decode_is_decode_without_decoding():
    rng = np.random.default_rng(4)
    g = model(rng)
    vals, mask = client(rng, g, "sparse")
    p = encode(vals, mask)
    shapes = {k: v.shape for k, v in g.items()}
    lv, lm = lazy_decode(p, shapes)
    assert isinstance(lv, PayloadValues) and isinstance(lm, PayloadMask)
    assert lv.source._values == {}  # nothing decoded yet
    dv, dm = decode(p, shapes)
    assert set(lv) == set(dv) == set(lm) and len(lv) == len(dv) and "nope" not in lv
    for k in dv:
        np.testing.assert_array_equal(lv[k], dv[k])
        np.testing.assert_array_equal(lm[k], dm[k])
        assert not lv[k].flags.writeable and not lm[k].flags.writeable
        assert lm[k] is lm[k]  # cached
    with pytest.raises(KeyError):
        lv["nope"]
    c = rules.Contribution(lv, lm, 2.0)
    c2 = pickle.loads(pickle.dumps(c))  # checkpoints carry the payload, not decoded arrays
    assert c2.values.source is c2.mask.source and c2.values.source._values == {}
    assert_same(rules.masked_mean(g, [c2]), rules.masked_mean(g, [c]))


def test_aggregator_core_buffers_payloads_and_merges_them():
    from fedray.config import from_dict
    from tests import kit

    rng = np.random.default_rng(6)
    g = {k: v for k, v in model(rng).items()}
    cfg = from_dict({"method": {"name": "fedbuff", "buffer_size": 3, "staleness": "constant"},
                     "data": {"name": "digits", "num_clients": 10}})
    core = kit.core_for(cfg, g)
    payloads = [encode(*client(rng, g, "sparse")) for _ in range(3)]
    for i, p in enumerate(payloads[:2]):
        core.receive([(Update(dispatch_id=i, client_id=i, base_version=0, num_examples=10, kind="delta"), p, None)])
    assert all(isinstance(e.contribution.values, PayloadValues) for e in core.pending)
    assert all(e.contribution.values.source._values == {} for e in core.pending)  # still encoded
    core.receive([(Update(dispatch_id=2, client_id=2, base_version=0, num_examples=10, kind="delta"), payloads[2], None)])
    assert core.version == 1
    shapes = {k: v.shape for k, v in g.items()}
    expect = rules.apply_delta_mean(g, [rules.Contribution(*decode(p, shapes), 1.0) for p in payloads], 1.0)
    assert_same(core.params, expect)


def test_popcounts_counts_many_masks_in_one_call_as_one_by_one():
    rng = np.random.default_rng(5)
    buf = rng.integers(0, 256, 4096, dtype=np.uint8)
    masks = [buf[s:s + n] for s, n in [(0, 0), (1, 7), (3, 100), (8, 64), (5, 1000), (0, 4096)]]  # any alignment
    assert K.popcounts(masks).tolist() == [int(np.unpackbits(m).sum()) for m in masks]
    assert K.popcounts([]).tolist() == []
    with pytest.raises(ValueError, match="uint8"):
        K.popcounts([buf, np.ones(3, np.int64)])


def test_a_parallel_kernel_leaves_torchs_thread_count_alone():
    """Regression: numba's OpenMP layer, started by the first parallel merge in a process, reset
    torch's thread count (cluster.torch_threads) there; training in the aggregator then differed in
    the last bits. A fresh process, since the layer starts once; the kernel keeps its 2 threads."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1); torch.get_num_threads(); import numpy as np; "  # OpenMP up first
            "from fedray.aggregation import kernels as K; "
            "assert K.all_finite(np.ones(K.PARALLEL_MIN * 2, np.float32)); import numba; "
            "print(torch.get_num_threads(), numba.get_num_threads())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NUMBA_NUM_THREADS": "2"})  # (the layer starts with 2 threads)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "2"]
