"""The update wire format: encode/decode round trips, the chosen form, real byte counts."""
from __future__ import annotations

import numpy as np
import pytest

from fedray.submodel import masks as M
from fedray.submodel.encode import decode, encode, payload_nbytes


@pytest.fixture()
def params():
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.standard_normal((64, 32, 3, 3)).astype(np.float32),
            "conv.bias": rng.standard_normal(64).astype(np.float32),
            "fc.weight": rng.standard_normal((10, 32)).astype(np.float32),
            "bn.num_batches_tracked": np.array(7, dtype=np.int64)}


def test_dense_round_trip_and_bytes(params):
    p = encode(params)
    assert all(e.kind == "dense" for e in p.entries.values())
    values, mask = decode(p, {k: v.shape for k, v in params.items()})
    for k, v in params.items():
        assert np.array_equal(values[k], v) and mask[k].all() and values[k].shape == v.shape
    assert p.nbytes == sum(v.nbytes for v in params.values()) == payload_nbytes(params)


def test_structured_mask_travels_as_slices(params):
    keep = np.arange(0, 64, 4)
    m = {"conv.weight": np.zeros((64, 32, 3, 3), bool), "conv.bias": np.zeros(64, bool)}
    m["conv.weight"][keep] = True
    m["conv.bias"][keep] = True
    p = encode(params, m)
    e = p.entries["conv.weight"]
    assert e.kind == "slices" and e.values.shape == (16, 32, 3, 3)
    assert np.array_equal(e.index[0], keep)
    # 16 kept filters of 288 float32 plus the per-axis int32 indices (16 + 32 + 3 + 3)
    assert e.nbytes == 16 * 288 * 4 + (16 + 32 + 3 + 3) * 4
    values, mask = decode(p, {k: params[k].shape for k in m})
    for k in m:
        assert np.array_equal(mask[k], m[k])
        assert np.array_equal(values[k][m[k]], params[k][m[k]]) and not values[k][~m[k]].any()
    assert p.nbytes == payload_nbytes(params, m)


def test_very_sparse_mask_travels_as_flat_indices(params):
    rng = np.random.default_rng(1)
    m = {"fc.weight": rng.random((10, 32)) < 0.02}
    p = encode(params, m)
    e = p.entries["fc.weight"]
    n = int(m["fc.weight"].sum())
    assert e.kind == "sparse" and e.values.shape == (n,) and e.index[0].dtype == np.int32
    assert e.nbytes == n * (4 + 4) == payload_nbytes(params, m)
    values, mask = decode(p, {"fc.weight": (10, 32)})
    assert np.array_equal(mask["fc.weight"], m["fc.weight"])
    assert np.array_equal(values["fc.weight"][m["fc.weight"]], params["fc.weight"][m["fc.weight"]])


def test_empty_mask_sends_nothing_and_scalars_keep_their_shape(params):
    m = {"conv.bias": np.zeros(64, bool), "bn.num_batches_tracked": np.ones((), bool)}
    p = encode(params, m)
    assert set(p.keys()) == {"bn.num_batches_tracked"}
    assert p.entries["bn.num_batches_tracked"].values.shape == ()
    assert p.nbytes == 8 == payload_nbytes(params, m)


@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
def test_random_masks_round_trip(params, density):
    rng = np.random.default_rng(int(density * 100))
    m = {k: rng.random(v.shape) < density for k, v in params.items() if v.ndim}
    values, mask = decode(encode(params, m), {k: v.shape for k, v in params.items()})
    for k, mk in m.items():
        if mk.any():
            assert np.array_equal(mask[k], mk)
            assert np.array_equal(values[k][mk], params[k][mk])
        else:
            assert k not in mask


def test_mask_helpers(params):
    full = M.full(params)
    half = {k: np.zeros(v.shape, bool) for k, v in params.items()}
    half["fc.weight"][:5] = True
    assert M.is_subset(half, full) and not M.is_subset(full, half)
    assert M.count(half) == 5 * 32
    assert M.density(half, params, ["fc.weight"]) == 0.5
    assert M.equal(M.intersect(half, full), half) and M.equal(M.union(half, full), full)
    assert not M.apply(params, half)["fc.weight"][5:].any()


def test_dense_masks_travel_as_bitmasks_and_are_cheaper_than_dense(params):
    rng = np.random.default_rng(3)
    m = {"fc.weight": rng.random((10, 32)) < 0.7}
    n = int(m["fc.weight"].sum())
    p = encode(params, m)
    e = p.entries["fc.weight"]
    assert e.kind == "bitmask" and e.index[0].dtype == np.uint8
    assert p.nbytes == 320 // 8 + n * 4 == payload_nbytes(params, m) < params["fc.weight"].nbytes
    values, mask = decode(p, {"fc.weight": (10, 32)})
    assert np.array_equal(mask["fc.weight"], m["fc.weight"])
    assert np.array_equal(values["fc.weight"][m["fc.weight"]], params["fc.weight"][m["fc.weight"]])


def test_bitmask_validation(params):
    from fedray.aggregation.validate import check
    from fedray.submodel.encode import Entry, Payload
    from fedray.update import Update

    h = Update(dispatch_id=0, client_id=0, base_version=0, num_examples=3)
    m = np.zeros((10, 32), bool)
    m[:, :20] = True
    m[0, 25] = True  # not a cross product: bitmask
    e = encode(params, {"fc.weight": m}).entries["fc.weight"]
    assert e.kind == "bitmask"
    assert check(h, Payload({"fc.weight": e}), params) is None
    short = Entry("bitmask", e.values[:-1], e.index)
    assert check(h, Payload({"fc.weight": short}), params) == "mask_mismatch"
    bad = Entry("bitmask", e.values, (e.index[0][:-1],))
    assert check(h, Payload({"fc.weight": bad}), params) == "mask_mismatch"
    odd = {"b": np.zeros(13, np.float32)}  # 13 coordinates: 3 padding bits, the high ones of byte 1
    m13 = np.arange(13) % 3 == 0
    e13 = encode(odd, {"b": m13}).entries["b"]
    assert e13.kind == "bitmask" and check(h, Payload({"b": e13}), odd) is None
    assert np.array_equal(decode(Payload({"b": e13}), {"b": (13,)})[1]["b"], m13)
    padded = e13.index[0].copy()
    padded[1] |= 0x80
    assert check(h, Payload({"b": Entry("bitmask", np.zeros(6, np.float32), (padded,))}), odd) == "mask_mismatch"
