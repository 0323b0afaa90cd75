"""Model zoo: names, shapes, parameter counts, options and determinism."""
import pytest
import torch

from fedray.errors import ConfigError
from fedray.models import MODELS, build_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names():
    assert set(MODELS) == {"mlp", "cnn", "leaf_cnn", "vgg11", "resnet18"}


def test_unknown_model_is_config_error_naming_field_and_choices():
    with pytest.raises(ConfigError) as err:
        build_model("lenet", (1, 8, 8), 10)
    assert err.value.field == "model.name"
    assert "unknown model 'lenet'" in str(err.value)
    assert "mlp, cnn, leaf_cnn, vgg11, resnet18" in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_and_bad_options_name_the_option():
    with pytest.raises(ConfigError) as err:
        build_model("mlp", (64,), 10, options={"hiden": [3]})
    assert err.value.field == "model.options.hiden"
    with pytest.raises(ConfigError) as err:
        build_model("mlp", (64,), 10, options={"hidden": [0]})
    assert err.value.field == "model.options.hidden"
    with pytest.raises(ConfigError) as err:
        build_model("vgg11", (3, 32, 32), 10, options={"width": -1})
    assert err.value.field == "model.options.width"
    with pytest.raises(ConfigError) as err:
        build_model("cnn", (1, 8, 8), 10, options={"widths": {"convs.7": 3}})
    assert err.value.field == "model.options.widths"
    with pytest.raises(ConfigError) as err:
        build_model("mlp", (64,), 10, options={"width_ratio": 1.5})
    assert err.value.field == "model.options.width_ratio"


def test_mlp_digits_structure():
    m = build_model("mlp", (1, 8, 8), 10)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"layers.0.weight": (128, 64), "layers.0.bias": (128,),
                      "layers.1.weight": (10, 128), "layers.1.bias": (10,)}
    assert m(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    deep = build_model("mlp", (64,), 3, options={"hidden": [32, 16]})
    assert [k for k in deep.state_dict() if k.endswith("weight")] == \
        ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    linear = build_model("mlp", (64,), 3, options={"hidden": []})
    assert n_params(linear) == 64 * 3 + 3


def test_mlp_relu_between_layers_only():
    torch.manual_seed(0)
    m = build_model("mlp", (2,), 2, options={"hidden": [3]})
    x = torch.randn(4, 2)
    h = torch.relu(m.layers[0](x))
    assert torch.allclose(m(x), m.layers[1](h))


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn_input_sizes(shape):
    m = build_model("cnn", shape, 10)
    assert m(torch.zeros(2, *shape)).shape == (2, 10)
    sd = m.state_dict()
    assert tuple(sd["convs.0.weight"].shape) == (32, shape[0], 3, 3)
    assert tuple(sd["convs.1.weight"].shape) == (64, 32, 3, 3)
    assert tuple(sd["fcs.0.weight"].shape) == (128, 64 * (shape[1] // 4) * (shape[2] // 4))
    assert tuple(sd["fcs.1.weight"].shape) == (10, 128)


def test_cnn_options_and_too_many_pools():
    m = build_model("cnn", (1, 8, 8), 4, options={"channels": [8], "hidden": [16, 12]})
    assert tuple(m.state_dict()["fcs.0.weight"].shape) == (16, 8 * 4 * 4)
    assert tuple(m.state_dict()["fcs.2.weight"].shape) == (4, 12)
    with pytest.raises(ConfigError) as err:
        build_model("cnn", (1, 8, 8), 10, options={"channels": [4, 4, 4, 4]})
    assert err.value.field == "model.options.channels"


def test_vgg11_params_and_forward():
    torch.manual_seed(0)
    m = build_model("vgg11", (3, 32, 32), 10)
    assert 9_150_000 <= n_params(m) <= 9_300_000  # ~9.23M with BN and a Linear(512, 10) head
    assert tuple(m.state_dict()["classifier.weight"].shape) == (10, 512)
    assert sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()) == 8
    no_bn = build_model("vgg11", (3, 32, 32), 10, options={"batch_norm": False})
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in no_bn.modules())
    small = build_model("vgg11", (3, 32, 32), 10, options={"width": 0.125})
    assert small.state_dict()["features.0.weight"].shape[0] == 8
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # under 32x32 the pools that would leave less than 1x1 are skipped (8x8: the last two)
    tiny = build_model("vgg11", (1, 8, 8), 10, options={"width": 0.125})
    assert tuple(tiny.classifier.weight.shape) == (10, 64) and tiny(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_resnet18_forward_and_structure():
    torch.manual_seed(0)
    m = build_model("resnet18", (3, 32, 32), 10)
    assert 11_100_000 <= n_params(m) <= 11_250_000
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    sd = m.state_dict()
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 3, 3)  # 3x3 stem
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    assert "layer2.0.shortcut.0.weight" in sd and "layer1.0.shortcut.0.weight" not in sd
    assert tuple(sd["layer4.1.conv2.weight"].shape) == (512, 512, 3, 3)
    small = build_model("resnet18", (3, 32, 32), 10, options={"width": 0.25})
    assert tuple(small.state_dict()["linear.weight"].shape) == (10, 128)


def test_init_is_deterministic_under_manual_seed():
    for name, shape in [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("resnet18", (3, 32, 32))]:
        opts = {"width": 0.125} if name == "resnet18" else {}
        torch.manual_seed(3)
        a = build_model(name, shape, 10, options=opts).state_dict()
        torch.manual_seed(3)
        b = build_model(name, shape, 10, options=opts).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_width_ratio_builds_heterofl_slice_without_extra_rng_use():
    m = build_model("mlp", (64,), 10, options={"hidden": [10, 7], "width_ratio": 0.6})
    sd = m.state_dict()
    assert tuple(sd["layers.0.weight"].shape) == (6, 64)  # ceil(0.6*10) = 6, not 7 from float error
    assert tuple(sd["layers.1.weight"].shape) == (5, 6)   # ceil(0.6*7) = 5
    assert tuple(sd["layers.2.weight"].shape) == (10, 5)  # class outputs untouched
    torch.manual_seed(1)
    a = build_model("cnn", (1, 8, 8), 10, options={"width_ratio": 0.5}).state_dict()
    after_a = torch.rand(3)
    torch.manual_seed(1)
    b = build_model("cnn", (1, 8, 8), 10, options={"widths": {"convs.0": 16, "convs.1": 32, "fcs.0": 64}})
    after_b = torch.rand(3)
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.state_dict().items()}
    assert all(torch.equal(a[k], b.state_dict()[k]) for k in a)
    assert torch.equal(after_a, after_b)
    r = build_model("resnet18", (3, 32, 32), 10, options={"width_ratio": 0.25})
    rsd = r.state_dict()
    # regression: HeteroFL slices the residual stream of every stage too, not only block-internal channels
    assert tuple(rsd["layer1.0.conv1.weight"].shape) == (16, 16, 3, 3)
    assert tuple(rsd["layer1.0.conv2.weight"].shape) == (16, 16, 3, 3)
    assert tuple(rsd["conv1.weight"].shape) == (16, 3, 3, 3)             # the stem writes stage 1's stream
    assert tuple(rsd["layer2.0.shortcut.0.weight"].shape) == (32, 16, 1, 1)
    assert tuple(rsd["linear.weight"].shape) == (10, 128)                # stage 4's stream: 512 / 4
