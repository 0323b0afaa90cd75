"""Depth and width submodels over real models."""
import math

import numpy as np
import pytest
import torch

from fedray.models import build_model, model_spec
from fedray.submodel import masks
from fedray.submodel.depth import depth_mask, depth_trainable
from fedray.submodel.width import keep_mask, width_submodel


def make(name, shape, options):
    torch.manual_seed(0)
    m = build_model(name, shape, 10, options=options)
    state = {k: v.numpy() for k, v in m.state_dict().items()}
    return m, model_spec(m, shape), state


def test_depth_mask_and_trainable_mlp():
    _, spec, state = make("mlp", (1, 8, 8), {"hidden": [16, 8]})
    m = depth_mask(spec, state, 2)
    assert list(m) == ["layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias"]
    assert all(v.all() and v.shape == state[k].shape for k, v in m.items())
    assert depth_trainable(spec, 1) == frozenset({"layers.2.weight", "layers.2.bias"})
    assert depth_mask(spec, state, 0) == {}
    assert set(depth_mask(spec, state, 3)) == set(state)
    with pytest.raises(ValueError):
        depth_mask(spec, state, 4)


def test_depth_mask_includes_bn_buffers_trainable_excludes_them():
    _, spec, state = make("vgg11", (3, 32, 32), {"width": 1 / 64})
    m = depth_mask(spec, state, 2)
    last_conv = spec.layers[-2]
    assert set(m) == set(last_conv.keys) | set(spec.layers[-1].keys)
    assert any(k.endswith("running_mean") for k in m) and any(k.endswith("num_batches_tracked") for k in m)
    tr = depth_trainable(spec, 2)
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in tr)
    assert set(last_conv.bn_keys) & tr == {k for k in last_conv.bn_keys if k.endswith(("weight", "bias"))}


def test_width_submodel_cnn():
    _, spec, state = make("cnn", (1, 8, 8), {"channels": [4, 6], "hidden": [10]})
    keep, m = width_submodel(spec, state, 0.5)
    assert {k: list(v) for k, v in keep.items()} == {"convs.0": [0, 1], "convs.1": [0, 1, 2], "fcs.0": [0, 1, 2, 3, 4]}
    assert set(m) == set(state)
    assert m["convs.0.weight"][:2].all() and not m["convs.0.weight"][2:].any()
    assert m["convs.1.weight"][:3, :2].all() and m["convs.1.weight"].sum() == 3 * 2 * 9
    # conv->flatten->linear: channel c owns columns c*4 .. c*4+3 (2x2 after two pools)
    w = m["fcs.0.weight"]
    assert w.shape == (10, 24) and w[:5, :12].all() and w.sum() == 5 * 12
    # classifier keeps every output
    assert m["fcs.1.weight"].shape == (10, 10) and m["fcs.1.weight"][:, :5].all() and m["fcs.1.weight"].sum() == 50
    assert m["fcs.1.bias"].all()
    # the mask's per-key counts equal the compact shapes
    shapes = spec.compact_shapes(keep)
    assert all(int(m[k].sum()) == math.prod(shapes[k]) for k in state)
    full_keep, full_mask = width_submodel(spec, state, 1.0)
    assert masks.count(full_mask) == sum(v.size for v in state.values())


def test_keep_mask_arbitrary_channels_mlp():
    _, spec, state = make("mlp", (1, 4, 4), {"hidden": [5]})
    m = keep_mask(spec, state, {"layers.0": [4, 1]})
    assert np.flatnonzero(m["layers.0.weight"].any(axis=1)).tolist() == [1, 4]
    assert np.flatnonzero(m["layers.0.bias"]).tolist() == [1, 4]
    assert np.flatnonzero(m["layers.1.weight"].any(axis=0)).tolist() == [1, 4]
    with pytest.raises(ValueError):
        width_submodel(spec, state, 0.0)
