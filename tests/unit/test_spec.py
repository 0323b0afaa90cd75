"""ModelSpec: layers, keys, FLOPs by hand, groups, slicing and compact models."""
import numpy as np
import pytest
import torch
from torch import nn

from fedray.models import build_compact, build_model, extract, model_spec, scatter, width_keep
from fedray.submodel import masks

DIGITS = (1, 8, 8)


def spec_of(name, shape, options=None, num_classes=10):
    torch.manual_seed(0)
    m = build_model(name, shape, num_classes, options=options)
    return m, model_spec(m, shape)


# ---------------------------------------------------------------------- FLOPs by hand

def test_mlp_flops_by_hand():
    _, s = spec_of("mlp", DIGITS)
    assert s.layer_names == ("layers.0", "layers.1") and s.L == 2
    assert s.layer_flops("layers.0") == 2 * 64 * 128 + 128 == 16512
    assert s.layer_flops("layers.1") == 2 * 128 * 10 + 10 == 2570
    assert s.forward_flops() == 19082
    # full: forward + weight grads of both + input grad of layers.1 (layers.0 is trained before it)
    assert s.train_flops({"layers.0", "layers.1"}, 1) == 19082 + 19082 + 2570 == 40734
    assert s.train_flops({"layers.0", "layers.1"}, 3) == 3 * 40734
    # last layer only: forward + its weight grad, no input gradients
    assert s.train_flops({"layers.1"}, 2) == 2 * (19082 + 2570)
    assert s.train_flops(set(), 5) == 5 * 19082
    assert s.layer("layers.0").params == 64 * 128 + 128
    with pytest.raises(KeyError):
        s.train_flops({"nope"}, 1)


def test_conv_flops_by_hand():
    _, s = spec_of("cnn", DIGITS, {"channels": [32], "hidden": []})
    conv = 2 * 1 * 9 * 32 * 64 + 32 * 64  # (2*Cin*kh*kw + 1) * Cout * H * W
    assert s.layer_flops("convs.0") == conv == 38912
    fc = 2 * (32 * 4 * 4) * 10 + 10
    assert s.layer_flops("fcs.0") == fc == 10250
    assert s.forward_flops() == conv + fc
    assert s.train_flops({"convs.0", "fcs.0"}, 1) == 2 * (conv + fc) + fc
    assert s.train_flops(s.layer_names[-1:], 1) == conv + 2 * fc
    layer = s.layer("convs.0")
    assert (layer.kind, layer.in_channels, layer.out, layer.out_shape) == ("conv", 1, 32, (32, 8, 8))


def test_batchnorm_flops_and_keys_belong_to_conv():
    _, s = spec_of("vgg11", (3, 32, 32), {"width": 1 / 64})
    first = s.layers[0]
    assert first.name == "features.0" and first.out == 1 and first.bn == "features.1"
    assert first.forward_flops == (2 * 3 * 9 + 1) * 1 * 32 * 32 + 2 * 1 * 32 * 32 == 58368
    assert first.keys == ("features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
                          "features.1.running_mean", "features.1.running_var", "features.1.num_batches_tracked")
    assert first.params == 1 * 3 * 9 + 1 + 2


def test_full_training_is_about_three_times_forward():
    for name, shape in [("cnn", (1, 28, 28)), ("vgg11", (3, 32, 32))]:
        _, s = spec_of(name, shape)
        ratio = s.train_flops(s.layer_names, 1) / s.forward_flops()
        assert 2.8 < ratio <= 3.0


# ---------------------------------------------------------------------- keys

@pytest.mark.parametrize("name,shape", [("mlp", DIGITS), ("cnn", DIGITS), ("vgg11", (3, 32, 32)),
                                        ("resnet18", (3, 32, 32))])
def test_layer_keys_cover_state_dict_exactly_once(name, shape):
    m, s = spec_of(name, shape)
    covered = [k for layer in s.layers for k in layer.keys]
    assert len(covered) == len(set(covered))
    assert set(covered) == set(m.state_dict())
    assert set(s.param_keys) == {n for n, _ in m.named_parameters()}
    assert set(s.buffer_keys) == set(m.state_dict()) - set(s.param_keys)
    assert all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
               for k in s.buffer_keys)
    assert s.num_params() == sum(p.numel() for p in m.parameters())
    assert s.shapes == {k: tuple(v.shape) for k, v in m.state_dict().items()}


def test_resnet_layers_in_execution_order():
    _, s = spec_of("resnet18", (3, 32, 32), {"width": 0.125})
    assert s.L == 21  # stem + 16 block convs + 3 shortcut convs + linear
    assert s.layer_names[:3] == ("conv1", "layer1.0.conv1", "layer1.0.conv2")
    assert s.layer_names[5:8] == ("layer2.0.shortcut.0", "layer2.0.conv1", "layer2.0.conv2")
    assert s.layers[-1].name == "linear" and s.layers[-1].kind == "linear"
    assert s.layer("layer2.0.shortcut.0").bn == "layer2.0.shortcut.1"


def test_last_layers_and_keys_of_last():
    _, s = spec_of("mlp", DIGITS, {"hidden": [32, 16]})
    assert [layer.name for layer in s.last_layers(2)] == ["layers.1", "layers.2"]
    assert s.keys_of_last(1) == {"layers.2.weight", "layers.2.bias"}
    assert s.keys_of_last(0) == set()
    assert s.keys_of_last(3) == set(s.keys)
    with pytest.raises(ValueError):
        s.last_layers(4)


def test_spec_restores_training_mode_and_leaves_bn_stats():
    m = build_model("vgg11", (3, 32, 32), 10, options={"width": 0.0625})
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    model_spec(m, (3, 32, 32))
    assert all(x.training for x in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_unsupported_structures_raise():
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4, 3)
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            return self.out(self.emb(x.long()).mean(1))

    with pytest.raises(ValueError, match="emb"):
        model_spec(Emb(), (5,))

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(ValueError, match="did not run"):
        model_spec(Unused(), (3,))


# ---------------------------------------------------------------------- groups

def test_cnn_groups_conv_conv_and_conv_flatten_linear():
    _, s = spec_of("cnn", DIGITS)
    assert [g.layer for g in s.groups] == ["convs.0", "convs.1", "fcs.0"]  # no group for the class outputs
    g0, g1, g2 = s.groups
    assert g0.size == 32
    assert g0.out_slices == (("convs.0.weight", 0), ("convs.0.bias", 0))
    assert g0.in_slices == (("convs.1.weight", 1, 1),)
    assert g1.in_slices == (("fcs.0.weight", 1, 2 * 2),)  # 8x8 -> two pools -> 2x2 per channel
    assert g2.in_slices == (("fcs.1.weight", 1, 1),)
    _, s28 = spec_of("cnn", (1, 28, 28))
    assert s28.group("convs.1").in_slices == (("fcs.0.weight", 1, 7 * 7),)


def test_resnet_groups_only_block_internal():
    _, s = spec_of("resnet18", (3, 32, 32), {"width": 0.125})
    assert [g.layer for g in s.groups] == [f"layer{i}.{b}.conv1" for i in range(1, 5) for b in range(2)]
    g = s.group("layer3.0.conv1")
    assert g.out_slices == (("layer3.0.conv1.weight", 0), ("layer3.0.bn1.weight", 0), ("layer3.0.bn1.bias", 0),
                            ("layer3.0.bn1.running_mean", 0), ("layer3.0.bn1.running_var", 0))
    assert g.in_slices == (("layer3.0.conv2.weight", 1, 1),)
    with pytest.raises(KeyError):
        s.group("conv1")


def test_vgg_groups_include_bn_and_last_conv_feeds_classifier():
    _, s = spec_of("vgg11", (3, 32, 32), {"width": 0.0625})
    assert len(s.groups) == 8
    last = s.groups[-1]
    assert last.in_slices == (("classifier.weight", 1, 1),)
    assert ("features.26.running_var", 0) in last.out_slices


# ---------------------------------------------------------------------- slicing

def test_slice_index_expands_blocks():
    _, s = spec_of("cnn", DIGITS)
    idx = s.slice_index({"convs.1": np.array([9, 0, 5, 5])})
    assert np.array_equal(idx["convs.1.weight"][0], [0, 5, 9])
    assert np.array_equal(idx["convs.1.bias"][0], [0, 5, 9])
    assert np.array_equal(idx["convs.1.weight"][1], np.arange(32))
    assert np.array_equal(idx["fcs.0.weight"][1], [0, 1, 2, 3, 20, 21, 22, 23, 36, 37, 38, 39])
    assert np.array_equal(idx["fcs.0.weight"][0], np.arange(128))
    with pytest.raises(ValueError):
        s.slice_index({"convs.1": [64]})
    with pytest.raises(KeyError):
        s.slice_index({"fcs.1": [0]})


def test_extract_scatter_round_trip():
    m, s = spec_of("vgg11", (3, 32, 32), {"width": 0.0625})
    rng = np.random.default_rng(0)
    keep = {g.layer: rng.choice(g.size, size=max(1, g.size // 2), replace=False) for g in s.groups}
    index = s.slice_index(keep)
    state = {k: v.numpy() for k, v in m.state_dict().items()}
    compact = extract(state, index)
    assert {k: v.shape for k, v in compact.items()} == s.compact_shapes(keep)
    zeros = {k: np.zeros_like(v) for k, v in state.items()}
    full, mask = scatter(compact, index, zeros)
    for k, v in state.items():
        assert full[k].shape == v.shape and mask[k].dtype == bool
        assert np.array_equal(full[k][mask[k]], v[mask[k]])  # every value back at its original index
        assert not np.any(full[k][~mask[k]])
        assert mask[k].sum() == compact[k].size
    assert masks.count(mask) == sum(v.size for v in compact.values())
    kept0 = np.sort(keep["features.0"])
    assert np.array_equal(np.flatnonzero(mask["features.0.bias"]), kept0)
    assert np.array_equal(np.flatnonzero(mask["features.4.weight"].any(axis=(0, 2, 3))), kept0)
    same, _ = scatter(compact, index, state)
    assert all(np.array_equal(same[k], state[k]) for k in state)
    with pytest.raises(ValueError):
        scatter({"features.0.bias": np.zeros(99)}, index, state)


def test_width_keep_rule():
    _, s = spec_of("mlp", DIGITS, {"hidden": [10, 64]})
    keep = width_keep(s, 0.6)
    assert np.array_equal(keep["layers.0"], np.arange(6))
    assert np.array_equal(keep["layers.1"], np.arange(39))  # ceil(38.4)
    assert set(keep) == {"layers.0", "layers.1"}
    assert len(width_keep(s, 1 / 16)["layers.0"]) == 1
    with pytest.raises(ValueError):
        width_keep(s, 0.0)


def _zero_scattered(model, spec, keep):
    index = spec.slice_index(keep)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    compact = extract(state, index)
    zeros = {k: np.zeros_like(v) for k, v in state.items()}
    full, _ = scatter(compact, index, zeros)
    # keep BN variances at 1 where pruned so eval-mode BN stays finite (output is 0 there anyway)
    for k in full:
        if k.endswith("running_var"):
            full[k] = np.where(full[k] == 0, 1.0, full[k]).astype(full[k].dtype)
    return compact, {k: torch.from_numpy(v) for k, v in full.items()}


def test_compact_cnn_equals_full_with_pruned_channels_zeroed():
    m, s = spec_of("cnn", DIGITS)
    keep = {"convs.0": [1, 4, 7, 30], "convs.1": np.arange(0, 64, 3), "fcs.0": np.arange(100, 128)}
    compact_state, zeroed = _zero_scattered(m, s, keep)
    compact = build_compact("cnn", DIGITS, 10, {}, s, keep)
    compact.load_state_dict({k: torch.from_numpy(v) for k, v in compact_state.items()}, strict=True)
    m.load_state_dict(zeroed, strict=True)
    x = torch.randn(6, *DIGITS, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(compact(x), m(x), atol=1e-5)


def test_compact_resnet_equals_full_with_pruned_channels_zeroed_in_eval_mode():
    m, s = spec_of("resnet18", (3, 32, 32), {"width": 0.125})
    with torch.no_grad():  # non-trivial BN statistics
        for x in m.modules():
            if isinstance(x, nn.BatchNorm2d):
                x.running_mean.uniform_(-0.5, 0.5)
                x.running_var.uniform_(0.5, 2.0)
                x.bias.uniform_(-0.5, 0.5)
    rng = np.random.default_rng(1)
    keep = {g.layer: rng.choice(g.size, size=g.size // 2, replace=False) for g in s.groups}
    compact_state, zeroed = _zero_scattered(m, s, keep)
    compact = build_compact("resnet18", (3, 32, 32), 10, {"width": 0.125}, s, keep)
    compact.load_state_dict({k: torch.from_numpy(v) for k, v in compact_state.items()}, strict=True)
    m.load_state_dict(zeroed, strict=True)
    m.eval()
    compact.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(compact(x), m(x), atol=1e-4)


@pytest.mark.parametrize("name,shape,opts", [("cnn", (1, 28, 28), {}), ("vgg11", (3, 32, 32), {"width": 0.25})])
def test_compact_model_really_is_smaller(name, shape, opts):
    _, s = spec_of(name, shape, opts)
    keep = width_keep(s, 0.5)
    compact = build_compact(name, shape, 10, opts, s, keep)
    cs = model_spec(compact, shape)
    assert cs.forward_flops() < 0.6 * s.forward_flops()
    assert cs.train_flops(cs.layer_names, 1) < 0.6 * s.train_flops(s.layer_names, 1)
    assert cs.num_params() < 0.6 * s.num_params()


def test_build_compact_rejects_mismatched_options():
    _, s = spec_of("cnn", DIGITS)
    with pytest.raises(ValueError):
        build_compact("cnn", DIGITS, 10, {"hidden": [128, 32]}, s, width_keep(s, 0.5))
