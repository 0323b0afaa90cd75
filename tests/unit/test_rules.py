"""Aggregation rules: hand-computed cases and seeded randomized properties.

(The randomized property tests draw their cases from seeded numpy generators;
hypothesis is not installed in the project environment.)
"""
import copy

import numpy as np
import pytest

from fedray.aggregation import rules
from fedray.aggregation.rules import (
    Contribution,
    MaskedAccumulator,
    apply_delta_mean,
    common_depth,
    delta,
    layerwise_threshold,
    masked_mean,
    mix,
    momentum_step,
    participation_threshold,
    weighted_mean,
    width_sliced_mean,
)

T, F = True, False


def C(values, mask, weight):
    vals = {k: np.asarray(v, dtype=np.float32) if not isinstance(v, np.ndarray) else v
            for k, v in values.items()}
    return Contribution(vals, {k: np.asarray(m, dtype=bool) for k, m in mask.items()}, weight)


def full_mask(params, keys=None):
    keys = params.keys() if keys is None else keys
    return {k: np.ones(np.shape(params[k]), bool) for k in keys}


# --------------------------------------------------------------------- weighted mean
def test_weighted_mean_by_hand():
    g = {"w": np.array([9.0, 9.0], np.float32), "b": np.array([1.0], np.float32)}
    c1 = C({"w": [0.0, 2.0], "b": [5.0]}, {}, 1)  # masks are ignored
    c2 = C({"w": [4.0, 6.0]}, {"w": [F, F]}, 3)  # lacks "b"
    out = weighted_mean(g, [c1, c2])
    np.testing.assert_array_equal(out["w"], [3.0, 5.0])  # (0*1+4*3)/4, (2+18)/4
    np.testing.assert_array_equal(out["b"], [1.0])  # not sent by everyone: kept
    assert out["w"].dtype == np.float32


def test_weighted_mean_no_contribs_and_zero_weight_keep():
    g = {"w": np.array([1.0, 2.0])}
    out = weighted_mean(g, [])
    np.testing.assert_array_equal(out["w"], g["w"])
    assert out["w"] is not g["w"]
    out = weighted_mean(g, [C({"w": [5.0, 5.0]}, {}, 0.0)])
    np.testing.assert_array_equal(out["w"], [1.0, 2.0])


# ---------------------------------------------------------------------- masked mean
def test_masked_mean_by_hand():
    g = {"w": np.full(4, 10.0, np.float32), "u": np.array([7.0], np.float32)}
    c1 = C({"w": [0.0, 0.0, 0.0, np.nan]}, {"w": [T, T, F, F]}, 1)
    c2 = C({"w": [4.0, 8.0, 4.0, np.inf], "u": [100.0]}, {"w": [T, F, T, F]}, 3)
    out = masked_mean(g, [c1, c2])
    # coord 0: (0*1 + 4*3)/4 = 3; coord 1: only c1 -> 0; coord 2: only c2 -> 4;
    # coord 3: nobody (junk outside masks ignored) -> 10; "u" absent from masks -> 7.
    np.testing.assert_array_equal(out["w"], [3.0, 0.0, 4.0, 10.0])
    np.testing.assert_array_equal(out["u"], [7.0])
    assert out["w"].dtype == np.float32


def test_masked_mean_2d_and_zero_weight_no_nan():
    g = {"k": np.zeros((2, 2))}
    c1 = C({"k": [[2.0, 2.0], [2.0, 2.0]]}, {"k": [[T, T], [F, F]]}, 0.0)
    c2 = C({"k": [[6.0, 6.0], [6.0, 6.0]]}, {"k": [[F, T], [F, F]]}, 2.0)
    out = masked_mean(g, [c1, c2])
    np.testing.assert_array_equal(out["k"], [[0.0, 6.0], [0.0, 0.0]])
    assert np.isfinite(out["k"]).all()


def test_integer_and_bool_buffers_take_max():
    g = {"nbt": np.array(5, np.int64), "cnt": np.array([9, 1, 4], np.int64),
         "flag": np.array([F, F, T])}
    c1 = C({"nbt": np.array(7, np.int64), "cnt": np.array([7, 3, 100], np.int64),
            "flag": np.array([T, F, F])},
           {"nbt": np.array(T), "cnt": [T, T, F], "flag": [T, T, T]}, 1)
    c2 = C({"nbt": np.array(6, np.int64), "cnt": np.array([8, 2, 100], np.int64)},
           {"nbt": np.array(T), "cnt": [T, T, F]}, 3)
    for out in (masked_mean(g, [c1, c2]), weighted_mean(g, [c1, c2])):
        assert out["nbt"] == 7 and out["nbt"].dtype == np.int64
        assert out["flag"].dtype == np.bool_
    out = masked_mean(g, [c1, c2])
    np.testing.assert_array_equal(out["cnt"], [9, 3, 4])  # max with global; uncovered kept
    np.testing.assert_array_equal(out["flag"], [T, F, T])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtype_preserved(dtype):
    g = {"w": np.zeros(3, dtype)}
    c = Contribution({"w": np.array([1.0, 2.0, 3.0], np.float64)}, {"w": np.array([T, F, T])}, 2.0)
    for out in (masked_mean(g, [c]), weighted_mean(g, [c]), apply_delta_mean(g, [c], 1.0),
                mix(g, c.values, 0.5), momentum_step(g, c.values, None, 1.0, 0.0)[0],
                layerwise_threshold(g, [c], [["w"]], 0.5), common_depth(g, [c], [["w"]])):
        assert out["w"].dtype == dtype


def test_width_sliced_mean_heterofl():
    # 4 output channels; client A full width (beta=1), B the leading half (beta=1/2).
    g = {"conv": np.zeros((4, 2), np.float32), "bias": np.zeros(4, np.float32)}
    lead = np.zeros((4, 2), bool)
    lead[:2] = True
    a = Contribution({"conv": np.ones((4, 2), np.float32), "bias": np.ones(4, np.float32)},
                     full_mask(g), 1.0)
    b = Contribution({"conv": np.full((4, 2), 3, np.float32), "bias": np.full(4, 3, np.float32)},
                     {"conv": lead, "bias": np.array([T, T, F, F])}, 1.0)
    out = width_sliced_mean(g, [a, b])
    np.testing.assert_array_equal(out["conv"], [[2, 2], [2, 2], [1, 1], [1, 1]])
    np.testing.assert_array_equal(out["bias"], [2, 2, 1, 1])


def test_accumulator_incremental_matches_one_shot_and_float32():
    rng = np.random.default_rng(3)
    g = {"a": rng.standard_normal((5, 4)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    cs = [Contribution({k: rng.standard_normal(v.shape).astype(np.float32) for k, v in g.items()},
                       {k: rng.random(v.shape) < 0.5 for k, v in g.items()}, float(rng.integers(1, 9)))
          for _ in range(4)]
    acc = MaskedAccumulator(g)
    for c in cs:
        acc.add(c)
    assert acc.count == 4 and acc.total_weight == sum(c.weight for c in cs)
    one = masked_mean(g, cs)
    inc = acc.mean(g)
    for k in g:
        np.testing.assert_array_equal(one[k], inc[k])
    f32 = masked_mean(g, cs, acc_dtype=np.float32)
    for k in g:
        np.testing.assert_allclose(f32[k], one[k], rtol=1e-5, atol=1e-6)


def test_bad_contribution_leaves_accumulator_unchanged():
    g = {"a": np.zeros(2), "b": np.zeros(2)}
    acc = MaskedAccumulator(g)
    acc.add(C({"a": [2.0, 2.0], "b": [2.0, 2.0]}, full_mask(g), 1))
    with pytest.raises(ValueError, match="'b'"):
        acc.add(C({"a": [9.0, 9.0], "b": [9.0]}, full_mask(g), 1))  # "a" fine, "b" bad
    assert acc.count == 1
    np.testing.assert_array_equal(acc.mean(g)["a"], [2.0, 2.0])


def test_validation_errors():
    g = {"w": np.zeros(2)}
    with pytest.raises(ValueError, match="'x'"):
        masked_mean(g, [C({"x": [1.0, 1.0]}, {"x": [T, T]}, 1)])
    with pytest.raises(ValueError, match="shape"):
        masked_mean(g, [C({"w": [1.0, 1.0, 1.0]}, {"w": [T, T, T]}, 1)])
    with pytest.raises(ValueError, match="bool"):
        masked_mean(g, [Contribution({"w": np.ones(2)}, {"w": np.ones(2)}, 1)])
    with pytest.raises(ValueError, match="weight"):
        masked_mean(g, [C({"w": [1.0, 1.0]}, {"w": [T, T]}, -1)])
    with pytest.raises(ValueError, match="lack"):
        masked_mean(g, [C({}, {"w": [T, T]}, 1)])
    with pytest.raises(ValueError, match="'x'"):
        weighted_mean(g, [C({"w": [1.0, 1.0], "x": [1.0]}, {}, 1)])
    with pytest.raises(ValueError, match="eta"):
        mix(g, g, 1.5)


def test_inputs_not_mutated_and_outputs_fresh():
    g = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}
    c = C({"w": [5.0, 6.0], "n": np.array(4, np.int64)}, {"w": [T, F], "n": np.array(T)}, 2)
    before_g, before_c = copy.deepcopy(g), copy.deepcopy(c)
    outs = [masked_mean(g, [c]), weighted_mean(g, [c]), apply_delta_mean(g, [c], 0.5),
            mix(g, c.values, 0.5), momentum_step(g, c.values, {"w": np.ones(2, np.float32)}, 1.0, 0.5)[0],
            layerwise_threshold(g, [c], [["w"]], 0.5), common_depth(g, [], [["w"]]),
            masked_mean(g, [])]
    for out in outs:
        assert set(out) == set(g)
        for k in g:
            assert out[k] is not g[k] and not np.shares_memory(out[k], g[k])
    for k in g:
        np.testing.assert_array_equal(g[k], before_g[k])
        np.testing.assert_array_equal(c.values[k], before_c.values[k])
        np.testing.assert_array_equal(c.mask[k], before_c.mask[k])


# ----------------------------------------------------------------- MA-CLAMP / CLAMP
LAYERS = [["l0.w", "l0.b", "l0.rm"], ["l1.w", "l1.b"], ["l2.w"]]


def _model():
    return {"l0.w": np.zeros((2, 2), np.float32), "l0.b": np.zeros(2, np.float32),
            "l0.rm": np.zeros(2, np.float32), "l0.nbt": np.array(10, np.int64),
            "l1.w": np.zeros((2, 2), np.float32), "l1.b": np.zeros(2, np.float32),
            "l2.w": np.zeros(2, np.float32)}


def _depth_contrib(g, trained_layers, value, weight, bn=None):
    """Depth submodel: trains ``trained_layers`` (indices) fully; values = ``value``."""
    keys = [k for i in trained_layers for k in LAYERS[i] if k != "l0.rm"]
    vals = {k: np.full(v.shape, value, v.dtype) for k, v in g.items() if k in keys}
    if bn is not None:
        vals["l0.rm"] = np.full(2, bn, np.float32)
        vals["l0.nbt"] = np.array(bn, np.int64)
    return Contribution(vals, full_mask(g, keys), weight)


def test_participation_threshold_by_hand():
    assert participation_threshold(0.5, 5) == 2
    assert participation_threshold(0.8, 5) == 4
    assert participation_threshold(0.1, 5) == 1  # max(1, 0)
    assert participation_threshold(0.0, 3) == 1
    assert participation_threshold(1.0, 10) == 10
    assert participation_threshold(0.29, 100) == 29  # binary rounding absorbed
    with pytest.raises(ValueError, match="rho"):
        participation_threshold(1.5, 5)


def test_layerwise_threshold_rho_half_five_selected():
    g = _model()
    a = _depth_contrib(g, [1, 2], 2.0, 1, bn=1)  # trains l1, l2
    b = _depth_contrib(g, [0, 1, 2], 6.0, 3, bn=5)  # trains all
    c = _depth_contrib(g, [2], 9.0, 4)  # trains l2, sends no BN stats
    out = layerwise_threshold(g, [a, b, c], LAYERS, rho=0.5, num_selected=5,
                              bn_keys=["l0.rm", "l0.nbt"])
    # threshold max(1, floor(0.5*5)) = 2
    np.testing.assert_array_equal(out["l0.w"], np.zeros((2, 2)))  # trained by 1 -> kept
    np.testing.assert_array_equal(out["l0.b"], [0, 0])
    np.testing.assert_array_equal(out["l1.w"], np.full((2, 2), 5.0))  # (2*1 + 6*3)/4
    np.testing.assert_array_equal(out["l2.w"], [7.0, 7.0])  # (2*1 + 6*3 + 9*4)/8
    np.testing.assert_array_equal(out["l0.rm"], [4.0, 4.0])  # BN over all senders: (1+15)/4
    assert out["l0.nbt"] == 10  # max(10, 1, 5)


def test_layerwise_threshold_rho_08_keeps_layer_trained_by_three():
    g = _model()
    cs = [_depth_contrib(g, [2], 1.0, 1), _depth_contrib(g, [1, 2], 2.0, 1),
          _depth_contrib(g, [0, 1, 2], 3.0, 1)]
    out = layerwise_threshold(g, cs, LAYERS, rho=0.8, num_selected=5)  # threshold 4
    for k in g:
        np.testing.assert_array_equal(out[k], g[k])
    cs.append(_depth_contrib(g, [2], 6.0, 1))
    out = layerwise_threshold(g, cs, LAYERS, rho=0.8, num_selected=5)
    np.testing.assert_array_equal(out["l2.w"], [3.0, 3.0])  # now 4 trained it: (1+2+3+6)/4
    np.testing.assert_array_equal(out["l1.w"], np.zeros((2, 2)))


def test_layerwise_threshold_default_selected_and_unlisted_keys():
    g = _model()
    a = _depth_contrib(g, [2], 4.0, 1)
    b = _depth_contrib(g, [1, 2], 8.0, 1)
    # |S| = 2 -> threshold 1: every layer someone trained is averaged;
    # "l0.nbt" (in no layer) is its own layer.
    out = layerwise_threshold(g, [a, b], LAYERS, rho=0.5)
    np.testing.assert_array_equal(out["l2.w"], [6.0, 6.0])
    np.testing.assert_array_equal(out["l1.b"], [8.0, 8.0])
    np.testing.assert_array_equal(out["l0.w"], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="num_selected"):
        layerwise_threshold(g, [a, b], LAYERS, rho=0.5, num_selected=1)


def test_common_depth_updates_only_common_layers():
    g = _model()
    cs = [_depth_contrib(g, [2], 1.0, 1), _depth_contrib(g, [1, 2], 3.0, 1),
          _depth_contrib(g, [0, 1, 2], 5.0, 2)]
    out = common_depth(g, cs, LAYERS)
    np.testing.assert_array_equal(out["l2.w"], [3.5, 3.5])  # (1 + 3 + 10)/4
    np.testing.assert_array_equal(out["l1.w"], np.zeros((2, 2)))
    np.testing.assert_array_equal(out["l0.w"], np.zeros((2, 2)))
    out = common_depth(g, cs[1:], LAYERS)
    np.testing.assert_array_equal(out["l1.w"], np.full((2, 2), 13 / 3, np.float32))  # (3 + 10)/3
    np.testing.assert_array_equal(out["l2.w"], np.full(2, 13 / 3, np.float32))
    np.testing.assert_array_equal(out["l0.b"], [0, 0])


# ------------------------------------------------------------------ FedBuff / FedAsync
def test_delta_by_hand():
    d = delta({"w": np.array([3.0, 1.0], np.float32), "n": np.array(7)},
              {"w": np.array([1.0, 1.0], np.float32), "n": np.array(4)})
    np.testing.assert_array_equal(d["w"], [2.0, 0.0])
    assert d["w"].dtype == np.float32 and d["n"] == 3


def test_apply_delta_mean_divides_by_k():
    g = {"w": np.array([1.0, 1.0]), "n": np.array(10, np.int64)}
    d1 = C({"w": [2.0, 0.0], "n": np.array(3, np.int64)}, {"w": [T, T], "n": np.array(T)}, 1.0)
    d2 = C({"w": [4.0, 4.0], "n": np.array(5, np.int64)}, {"w": [T, F], "n": np.array(T)}, 0.5)
    out = apply_delta_mean(g, [d1, d2], eta_g=0.5)
    # sum w_i d_i = [2 + 2, 0 + 0] = [4, 0]; /K=2 -> [2, 0]; *0.5 -> [1, 0]
    np.testing.assert_array_equal(out["w"], [2.0, 1.0])
    assert out["n"] == 15  # counter advances by the largest delta
    np.testing.assert_array_equal(apply_delta_mean(g, [], 1.0)["w"], g["w"])


def test_fedbuff_single_delta_equals_fedasync_mix():
    rng = np.random.default_rng(0)
    theta = {"w": rng.standard_normal(6).astype(np.float32)}
    new = {"w": rng.standard_normal(6).astype(np.float32)}
    s, eta = 0.5, 0.6  # staleness weight, server rate
    d = Contribution(delta(new, theta), full_mask(theta), s)
    np.testing.assert_allclose(apply_delta_mean(theta, [d], eta)["w"], mix(theta, new, eta * s)["w"],
                               rtol=1e-6, atol=1e-6)


def test_mix_by_hand():
    g = {"w": np.array([0.0, 10.0], np.float32), "n": np.array(3, np.int64), "k": np.ones(1)}
    new = {"w": np.array([4.0, 0.0], np.float32), "n": np.array(2, np.int64)}
    out = mix(g, new, 0.25)
    np.testing.assert_array_equal(out["w"], [1.0, 7.5])
    assert out["n"] == 3
    np.testing.assert_array_equal(out["k"], [1.0])
    np.testing.assert_array_equal(mix(g, new, 1.0)["w"], new["w"])
    np.testing.assert_array_equal(mix(g, new, 0.0)["w"], g["w"])


def test_momentum_step_by_hand():
    x = {"w": np.array([1.0]), "n": np.array(2, np.int64)}
    x1, v1 = momentum_step(x, {"w": np.array([0.5]), "n": np.array(4, np.int64)}, None, lr=1.0, beta=0.9)
    np.testing.assert_allclose(v1["w"], [0.5])  # g = 1 - 0.5
    np.testing.assert_allclose(x1["w"], [0.5])
    assert x1["n"] == 4 and "n" not in v1
    x2, v2 = momentum_step(x1, {"w": np.array([0.25])}, v1, lr=1.0, beta=0.9)
    np.testing.assert_allclose(v2["w"], [0.7])  # 0.9*0.5 + 0.25
    np.testing.assert_allclose(x2["w"], [-0.2])  # 0.5 - 0.7
    x3, _ = momentum_step(x1, {"w": np.array([0.25])}, v1, lr=0.5, beta=0.0)
    np.testing.assert_allclose(x3["w"], [0.375])  # 0.5 - 0.5*0.25
    with pytest.raises(ValueError, match="beta"):
        momentum_step(x, x, None, 1.0, 1.0)


# ------------------------------------------------------- randomized property tests
def _random_case(seed, n=4, full=False):
    rng = np.random.default_rng(seed)
    g = {"a": rng.standard_normal((3, 5)).astype(np.float32),
         "b": rng.standard_normal(4).astype(np.float32),
         "c": rng.standard_normal(6).astype(np.float32)}
    cs = []
    for _ in range(n):
        vals = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in g.items()}
        if full:
            mask = full_mask(g)
        else:
            mask = {k: rng.random(v.shape) < 0.5 for k, v in g.items() if rng.random() < 0.8}
        cs.append(Contribution(vals, mask, float(rng.integers(0, 6))))
    return g, cs, rng


def _assert_params_close(x, y):
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_allclose(x[k], y[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", range(8))
def test_permutation_invariance(seed):
    g, cs, rng = _random_case(seed)
    perm = [cs[i] for i in rng.permutation(len(cs))]
    _assert_params_close(masked_mean(g, cs), masked_mean(g, perm))
    _assert_params_close(weighted_mean(g, cs), weighted_mean(g, perm))
    layers = [["a", "b"], ["c"]]
    _assert_params_close(layerwise_threshold(g, cs, layers, 0.5, 6),
                         layerwise_threshold(g, perm, layers, 0.5, 6))


@pytest.mark.parametrize("seed", range(8))
def test_full_masks_masked_mean_equals_weighted_mean(seed):
    g, cs, _ = _random_case(seed, full=True)
    _assert_params_close(masked_mean(g, cs), weighted_mean(g, cs))


@pytest.mark.parametrize("seed", range(8))
def test_uncovered_unchanged_and_covered_within_range(seed):
    g, cs, _ = _random_case(seed)
    out = masked_mean(g, cs)
    for k, old in g.items():
        cover = np.zeros(old.shape, bool)
        lo = np.full(old.shape, np.inf)
        hi = np.full(old.shape, -np.inf)
        for c in cs:
            if k in c.mask and c.weight > 0:
                m = c.mask[k]
                cover |= m
                lo = np.where(m, np.minimum(lo, c.values[k]), lo)
                hi = np.where(m, np.maximum(hi, c.values[k]), hi)
        np.testing.assert_array_equal(out[k][~cover], old[~cover])
        assert np.all(out[k][cover] >= lo[cover] - 1e-6) and np.all(out[k][cover] <= hi[cover] + 1e-6)
        assert out[k].dtype == old.dtype


def test_weighted_mean_of_dense_payloads_is_bit_identical_to_the_numpy_path():
    """Dense payload-backed updates (what FedAvg clients send) take the merge kernels; a
    sparse one among them sends the whole mean back to the accumulator. Same bits either way."""
    from fedray.aggregation.merge import lazy_decode
    from fedray.submodel.encode import encode

    rng = np.random.default_rng(3)
    g = {"w": rng.standard_normal((6, 5)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32),
         "n": np.array(4, np.int64)}
    shapes = {k: v.shape for k, v in g.items()}
    ups = [{k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in g.items()} for _ in range(4)]
    weights = [14.0, 13.0, 15.0, 14.0]
    for sparse in (False, True):
        masks = [None] * 4
        if sparse:  # the second update covers a third of "w" only: no longer dense
            masks[1] = {"w": rng.random((6, 5)) < 0.3, "b": np.ones(6, bool), "n": np.ones((), bool)}
        payloads = [encode(u, m) for u, m in zip(ups, masks)]
        backed = [Contribution(*lazy_decode(p, shapes), w) for p, w in zip(payloads, weights)]
        assert rules._dense_alike(backed) == (not sparse)
        kernel = weighted_mean(g, backed)
        sent = [{k: np.where(m[k], u[k], 0).astype(u[k].dtype) if m else u[k] for k in u} for u, m in zip(ups, masks)]
        plain = weighted_mean(g, [Contribution(v, full_mask(g), w) for v, w in zip(sent, weights)])
        for k in g:
            assert kernel[k].dtype == g[k].dtype
            assert np.array_equal(kernel[k], plain[k]), (sparse, k)


def test_masked_delta_mean_moves_each_coordinate_by_the_mean_of_the_deltas_covering_it():
    g = {"w": np.array([1.0, 1.0, 1.0], np.float32), "n": np.array(5, np.int64), "b": np.array([True, False])}
    d1 = {"w": np.array([2.0, 4.0, 0.0], np.float32), "n": np.array(2, np.int64), "b": np.array([False, False])}
    d2 = {"w": np.array([0.0, 1.0, 0.0], np.float32), "n": np.array(1, np.int64), "b": np.array([True, True])}
    m1 = {"w": np.array([True, True, False]), "n": np.array(True), "b": np.array([True, True])}
    m2 = {"w": np.array([False, True, False]), "n": np.array(True), "b": np.array([True, True])}
    out = rules.masked_delta_mean(g, [rules.Contribution(d1, m1, 1.0), rules.Contribution(d2, m2, 3.0)], 0.5)
    # w: [1 + 0.5 * 2, 1 + 0.5 * (4 + 3 * 1) / 4, 1 (nobody)]; n (a counter): 5 + max(2, 1); b kept
    np.testing.assert_allclose(out["w"], [2.0, 1.875, 1.0])
    assert out["w"].dtype == np.float32 and int(out["n"]) == 7 and out["b"].tolist() == [True, False]
