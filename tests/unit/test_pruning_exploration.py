"""AutoFLIP: guidance, quantile threshold, hybrid mask, random baseline."""
import numpy as np
import pytest
import torch

from fedray.models import build_model, model_spec
from fedray.pruning.exploration import guidance, hybrid_mask, random_mask, refresh_guidance
from fedray.pruning.magnitude import prunable_keys
from fedray.submodel import masks


def spec_of(name, shape, options, classes=2):
    torch.manual_seed(0)
    m = build_model(name, shape, classes, options=options)
    return model_spec(m, shape), {k: v.numpy() for k, v in m.state_dict().items()}


def test_guidance_by_hand():
    base = {"w": np.zeros(4), "c": np.ones(2), "n": np.array(3, dtype=np.int64)}
    explored = [{"w": np.array([1.0, 2.0, 0.0, 0.0]), "c": np.array([2.0, 2.0]), "n": 0},
                {"w": np.array([1.0, 0.0, 0.0, 2.0]), "c": np.array([0.0, 0.0]), "n": 0}]
    g = guidance(base, explored)
    assert set(g) == {"w", "c"}  # integer tensors carry no guidance
    assert g["w"] == pytest.approx([0.5, 1.0, 0.0, 1.0])  # raw mean [1, 2, 0, 2]
    assert g["c"].tolist() == [0.0, 0.0]  # constant -> zeros
    r = refresh_guidance([{"w": np.array([1.0, -1.0, 2.0])}])
    assert r["w"] == pytest.approx([0.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        guidance(base, [])


def hand_guidance():
    return {"layers.0.weight": np.array([[0.9, 0.8, 0.7], [0.1, 0.2, 0.0]]),
            "layers.1.weight": np.array([[1.0, 0.5], [0.6, 0.3]])}


def test_hybrid_mask_hand_case():
    spec, _ = spec_of("mlp", (1, 1, 3), {"hidden": [2]})
    g = hand_guidance()
    # sorted: 0 .1 .2 .3 .5 .6 .7 .8 .9 1; linear quantile at 0.3*9 = 2.7 -> 0.27
    m = hybrid_mask(spec, g, q=0.3, structured=False)
    assert set(m) == set(spec.shapes)
    assert m["layers.0.weight"].tolist() == [[True] * 3, [False] * 3]
    assert m["layers.1.weight"].all() and m["layers.0.bias"].all() and m["layers.1.bias"].all()

    s = hybrid_mask(spec, g, q=0.3, structured=True)
    # neuron 1 of layers.0 (mean 0.1 < 0.27) goes: its row, its bias and the consumer's column 1
    assert s["layers.0.bias"].tolist() == [True, False]
    assert s["layers.1.weight"].tolist() == [[True, False], [True, False]]
    assert s["layers.1.bias"].all()  # classifier outputs are never pruned


def test_structured_keeps_at_least_one_channel():
    spec, _ = spec_of("mlp", (1, 1, 3), {"hidden": [2]})
    g = {"layers.0.weight": np.zeros((2, 3)), "layers.1.weight": np.ones((2, 2))}
    g["layers.0.weight"][1, 0] = 0.01
    m = hybrid_mask(spec, g, q=0.9)  # tau = 1.0 (ties): every row mean of layers.0 is below it
    assert m["layers.0.bias"].tolist() == [False, True]


def test_structured_conv_removes_bn_entries():
    spec, _ = spec_of("vgg11", (3, 32, 32), {"width": 1 / 32}, classes=3)
    rng = np.random.default_rng(1)
    g = {k: 0.5 + 0.5 * rng.random(spec.shapes[k]) for k in (l.weight_key for l in spec.layers)}
    first = spec.layers[0]
    g[first.weight_key][0] = 0.0  # filter 0 of the first conv has no guidance
    u = hybrid_mask(spec, g, q=0.01, structured=False)
    m = hybrid_mask(spec, g, q=0.01)
    assert not m[first.weight_key][0].any()
    np.testing.assert_array_equal(m[first.weight_key][1:], u[first.weight_key][1:])
    assert [bool(m[k][0]) for k in first.bn_keys if not k.endswith("num_batches_tracked")] == [False] * 4
    assert all(m[k][1:].all() for k in first.bn_keys if not k.endswith("num_batches_tracked"))
    consumer = spec.layers[1].weight_key
    assert not m[consumer][:, 0].any()
    np.testing.assert_array_equal(m[consumer][:, 1:], u[consumer][:, 1:])


def test_structured_conv_removes_flatten_columns():
    spec, _ = spec_of("cnn", (1, 8, 8), {"channels": [3], "hidden": []}, classes=2)
    g = {"convs.0.weight": np.ones((3, 1, 3, 3)), "fcs.0.weight": np.linspace(1, 2, 96).reshape(2, 48)}
    g["convs.0.weight"][1] = np.linspace(0, 0.02, 9).reshape(1, 3, 3)  # mean 0.01
    # 123 values; q = 0.05 -> position 6.1 between 0.015 and 0.0175 -> tau = 0.01525
    m = hybrid_mask(spec, g, q=0.05)
    assert m["convs.0.bias"].tolist() == [True, False, True]
    assert not m["convs.0.weight"][1].any() and m["convs.0.weight"][[0, 2]].all()
    # channel 1 owns the flatten columns 16..31 (4x4 positions after one pool)
    fc = m["fcs.0.weight"]
    assert not fc[:, 16:32].any() and fc[:, :16].all() and fc[:, 32:].all()
    assert m["fcs.0.bias"].all()
    u = hybrid_mask(spec, g, q=0.05, structured=False)
    assert u["convs.0.weight"][1].ravel().tolist() == [False] * 7 + [True] * 2


def test_unstructured_fraction_matches_quantile():
    spec, _ = spec_of("mlp", (1, 8, 8), {"hidden": [32]}, classes=10)
    rng = np.random.default_rng(0)
    g = {l.weight_key: rng.random(spec.shapes[l.weight_key]) for l in spec.layers}
    m = hybrid_mask(spec, g, q=0.3, structured=False)
    wk = [l.weight_key for l in spec.layers]
    n = sum(m[k].size for k in wk)
    pruned = sum(int((~m[k]).sum()) for k in wk)
    assert abs(pruned / n - 0.3) < 1.0 / n + 1e-12
    sm = hybrid_mask(spec, g, q=0.3, structured=True)
    assert masks.is_subset(sm, m)


def test_random_mask_density_and_seed():
    spec, params = spec_of("mlp", (1, 4, 4), {"hidden": [8]})
    keys = prunable_keys(spec)
    a = random_mask(params, 0.4, np.random.default_rng(3), keys)
    b = random_mask(params, 0.4, np.random.default_rng(3), keys)
    n = sum(params[k].size for k in keys)
    assert list(a) == list(keys) and masks.count(a) == round(0.4 * n)
    assert masks.equal(a, b)
    assert masks.density(a, params, keys) == pytest.approx(0.4, abs=1 / n)
