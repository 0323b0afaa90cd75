"""Model zoo: ``mlp``, ``cnn``, ``leaf_cnn``, ``vgg11`` and ``resnet18`` (CIFAR variants).

``fedray.models.factory.build_model(name, input_shape, num_classes, options=...)`` returns a
freshly initialised ``nn.Module`` (a zoo name or a user model's import path). Initialisation
uses PyTorch's default initialisers only, so it is fully determined by ``torch.manual_seed``;
nothing is downloaded.

Every model names its weight-carrying modules stably (``layers.0``,
``convs.1``, ``features.4``, ``layer3.1.conv1`` ...) because state-dict keys are
the currency of masks, updates and checkpoints. Every model also answers
``channel_links()``: the list of ``(producer_layer, consumer_layers)`` pairs
whose channels may be pruned (hidden channels only; the stem and the residual
stream of ResNet, and the class outputs, are never prunable).
:mod:`fedray.models.spec` turns these links into structural groups.

Options shared by every model:

``widths``
    ``{layer_name: n}`` explicit output size of prunable layers (a layer named
    by ``channel_links``). The next layer's input size follows automatically.
    This is how physically smaller submodels are built
    (:func:`fedray.models.factory.build_compact`).
``width_ratio``
    HeteroFL slice: every prunable layer keeps ``ceil(ratio x C)`` outputs
    (same rule as :func:`fedray.models.spec.width_keep`). Cannot be combined
    with ``widths``.

Per-model options:

``mlp``       ``hidden`` (list of ints, default ``[128]``). Flatten, then
              ``Linear`` + ReLU per hidden size, then the output ``Linear``.
              Modules ``layers.0 .. layers.{len(hidden)}``.
``cnn``       ``channels`` (default ``[32, 64]``): per entry a block
              conv3x3(pad 1) + ReLU + maxpool(2) (modules ``convs.i``);
              ``hidden`` (int or list, default ``128``): Linear + ReLU layers
              (``fcs.i``), then the output Linear (``fcs.{len(hidden)}``).
              Works for any input whose side survives the pools
              (8x8 digits, 28x28, 32x32x3 ...).
``leaf_cnn``  ``width`` (float multiplier, default 1.0). The LEAF FEMNIST CNN
              (Caldas et al., 2018): conv5x5(pad 2) 32 + ReLU + maxpool(2), conv5x5
              64 + ReLU + maxpool(2), Linear 2048 + ReLU, Linear num_classes; the
              ``cnn`` class with kernel 5 (modules ``convs.0-1``, ``fcs.0-1``), 6.50M
              parameters on 28x28 with 10 classes.
``vgg11``     ``batch_norm`` (default True), ``width`` (float multiplier of
              all conv channels, default 1.0). Features follow the CIFAR
              configuration [64,M,128,M,256,256,M,512,512,M,512,512,M] (each
              conv 3x3 pad 1, then BN if enabled, then ReLU; conv modules at
              ``features.i``). Head: our choice is the single
              ``classifier = Linear(512 x H' x W', num_classes)`` of the common
              CIFAR VGG (H' = W' = 1 for 32x32 inputs), about 9.23M parameters
              at width 1 with batch norm. Inputs under 32x32 (28x28 MNIST / FEMNIST,
              8x8 digits): a max-pool that would leave less than 1x1 is an
              ``nn.Identity`` instead, so for 28x28 the last pool is dropped
              (28 -> 14 -> 7 -> 3 -> 1, then 1x1) and the head is Linear(512, classes),
              as the common MNIST ports of the CIFAR VGG do; the same 8 convs and
              parameters as on 32x32, module names unchanged.
``resnet18``  ``width`` (float multiplier of 64/128/256/512, default 1.0). CIFAR
              variant: 3x3 stride-1 stem conv + BN + ReLU, no max-pool, four
              stages of two BasicBlocks (strides 1,2,2,2), global average
              pool, ``linear``. Convolutions have no bias; each is followed by
              BatchNorm. A block's shortcut (1x1 conv + BN, in the first block
              of stages 2-4) is computed *before* its main path, so module order
              equals execution order. Prunable groups: each block's ``conv1``
              outputs. Residual streams (``stream_links``, widths ``stage1`` ..
              ``stage4``): every stage's stream channels, cut together by width
              slices (HeteroFL), never by channel pruning.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from fedray.errors import ConfigError
from fedray.models.options import _image_shape, _int_list, _positive_float, _scaled, _widths

Links = list[tuple[str, tuple[str, ...]]]

_COMMON_OPTIONS = ("widths", "width_ratio")


# --------------------------------------------------------------------------- option check

def _check_options(name: str, options: Mapping[str, Any]) -> None:
    allowed = OPTIONS[name]
    for key in options:
        if key not in allowed and key not in _COMMON_OPTIONS:
            choices = ", ".join(sorted(set(allowed) | set(_COMMON_OPTIONS)))
            raise ConfigError(f"model.options.{key}", f"unknown option for model '{name}'; choose from: {choices}")


# --------------------------------------------------------------------------- MLP

class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] x len(hidden) -> Linear."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int):
        super().__init__()
        sizes = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def channel_links(self) -> Links:
        n = len(self.layers)
        return [(f"layers.{i}", (f"layers.{i + 1}",)) for i in range(n - 1)]


def _build_mlp(input_shape, num_classes, options) -> nn.Module:
    _check_options("mlp", options)
    hidden = _int_list(options.get("hidden", [128]), "model.options.hidden", allow_empty=True)
    widths = _widths(options, {f"layers.{i}": h for i, h in enumerate(hidden)})
    in_features = math.prod(int(s) for s in input_shape)
    if in_features < 1:
        raise ConfigError("model.name", f"model 'mlp' needs a non-empty input shape; got {tuple(input_shape)}")
    return MLP(in_features, [widths[f"layers.{i}"] for i in range(len(hidden))], num_classes)


# --------------------------------------------------------------------------- CNN

class CNN(nn.Module):
    """[conv kxk (pad k//2) -> ReLU -> maxpool2] per channel entry, flatten, [Linear -> ReLU] per hidden, Linear."""

    def __init__(self, in_shape: tuple[int, int, int], channels: Sequence[int], hidden: Sequence[int],
                 num_classes: int, kernel: int = 3):
        super().__init__()
        c, h, w = in_shape
        convs = []
        for out in channels:
            convs.append(nn.Conv2d(c, out, kernel_size=kernel, padding=kernel // 2))
            c, h, w = out, h // 2, w // 2
        if h < 1 or w < 1:
            raise ConfigError("model.options.channels",
                              f"{len(channels)} pooling blocks are too many for input {tuple(in_shape)}")
        self.convs = nn.ModuleList(convs)
        sizes = [c * h * w, *hidden, num_classes]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = nn.functional.max_pool2d(torch.relu(conv(x)), 2)
        x = x.flatten(1)
        for i, fc in enumerate(self.fcs):
            x = fc(x)
            if i < len(self.fcs) - 1:
                x = torch.relu(x)
        return x

    def channel_links(self) -> Links:
        names = [f"convs.{i}" for i in range(len(self.convs))] + [f"fcs.{i}" for i in range(len(self.fcs))]
        return [(a, (b,)) for a, b in zip(names[:-1], names[1:])]


def _build_cnn(input_shape, num_classes, options) -> nn.Module:
    _check_options("cnn", options)
    shape = _image_shape(input_shape, "cnn")
    channels = _int_list(options.get("channels", [32, 64]), "model.options.channels", allow_empty=True)
    hidden = _int_list(options.get("hidden", 128), "model.options.hidden", allow_empty=True)
    defaults = {f"convs.{i}": c for i, c in enumerate(channels)}
    defaults.update({f"fcs.{i}": h for i, h in enumerate(hidden)})
    widths = _widths(options, defaults)
    return CNN(shape, [widths[f"convs.{i}"] for i in range(len(channels))],
               [widths[f"fcs.{i}"] for i in range(len(hidden))], num_classes)


def _build_leaf_cnn(input_shape, num_classes, options) -> nn.Module:
    _check_options("leaf_cnn", options)
    shape = _image_shape(input_shape, "leaf_cnn")
    if min(shape[1:]) < 4:
        raise ConfigError("model.name", f"leaf_cnn's two pools need inputs of at least 4x4; got {shape}")
    width = _positive_float(options.get("width", 1.0), "model.options.width")
    widths = _widths(options, {"convs.0": _scaled(32, width), "convs.1": _scaled(64, width),
                               "fcs.0": _scaled(2048, width)})
    return CNN(shape, [widths["convs.0"], widths["convs.1"]], [widths["fcs.0"]], num_classes, kernel=5)


# --------------------------------------------------------------------------- VGG-11

VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _vgg_conv_names(batch_norm: bool) -> list[str]:
    """Module names ``features.i`` of the convolutions, in order."""
    names, idx = [], 0
    for v in VGG11_CFG:
        if v == "M":
            idx += 1
        else:
            names.append(f"features.{idx}")
            idx += 3 if batch_norm else 2
    return names


class VGG(nn.Module):
    """CIFAR VGG: conv features then one Linear classifier."""

    def __init__(self, in_shape: tuple[int, int, int], conv_channels: Sequence[int], batch_norm: bool,
                 num_classes: int):
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        it = iter(conv_channels)
        for v in VGG11_CFG:
            if v == "M":  # a pool that would leave less than 1x1 is an Identity (keeps features.i names)
                shrink = h >= 2 and w >= 2
                layers.append(nn.MaxPool2d(2) if shrink else nn.Identity())
                h, w = (h // 2, w // 2) if shrink else (h, w)
            else:
                out = next(it)
                layers.append(nn.Conv2d(c, out, kernel_size=3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU(inplace=True))
                c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * h * w, num_classes)
        self._conv_names = _vgg_conv_names(batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))

    def channel_links(self) -> Links:
        names = [*self._conv_names, "classifier"]
        return [(a, (b,)) for a, b in zip(names[:-1], names[1:])]


def _build_vgg11(input_shape, num_classes, options) -> nn.Module:
    _check_options("vgg11", options)
    shape = _image_shape(input_shape, "vgg11")
    bn = options.get("batch_norm", True)
    if not isinstance(bn, bool):
        raise ConfigError("model.options.batch_norm", f"expected true or false, got {bn!r}")
    width = _positive_float(options.get("width", 1.0), "model.options.width")
    names = _vgg_conv_names(bn)
    base = [_scaled(v, width) for v in VGG11_CFG if v != "M"]
    widths = _widths(options, dict(zip(names, base)))
    return VGG(shape, [widths[n] for n in names], bn, num_classes)


# --------------------------------------------------------------------------- ResNet-18

class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, then ReLU.

    ``mid`` (the output size of ``conv1``) may differ from ``out`` in compact models.
    The shortcut is computed first so that module order equals execution order.
    """

    def __init__(self, cin: int, mid: int, out: int, stride: int, projection: bool | None = None):
        super().__init__()
        if projection if projection is not None else (stride != 1 or cin != out):
            self.shortcut = nn.Sequential(nn.Conv2d(cin, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        else:
            self.shortcut = nn.Sequential()
        self.conv1 = nn.Conv2d(cin, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.shortcut(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + skip)


class ResNet(nn.Module):
    def __init__(self, in_channels: int, stage_channels: Sequence[int], mids: Mapping[str, int],
                 num_classes: int, blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        c = stage_channels[0]
        self.conv1 = nn.Conv2d(in_channels, c, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        for s, (out, n) in enumerate(zip(stage_channels, blocks), start=1):
            stage = []
            for b in range(n):
                stride = 2 if (s > 1 and b == 0) else 1
                # the architecture, not the (possibly sliced) widths, decides where projections are
                stage.append(BasicBlock(c, mids[f"layer{s}.{b}.conv1"], out, stride, projection=s > 1 and b == 0))
                c = out
            setattr(self, f"layer{s}", nn.Sequential(*stage))
        self.num_stages = len(stage_channels)
        self.blocks = tuple(blocks)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)

    def channel_links(self) -> Links:
        return [(f"layer{s}.{b}.conv1", (f"layer{s}.{b}.conv2",))
                for s, n in enumerate(self.blocks, start=1) for b in range(n)]

    def stream_links(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        """The residual stream of each stage: written by the stem (stage 1) or the stage's first
        block's projection, and by every block's ``conv2``; read by the stage's later blocks and
        by the next stage's first block (or the classifier)."""
        out = []
        for s, n in enumerate(self.blocks, start=1):
            producers = ["conv1"] if s == 1 else [f"layer{s}.0.shortcut.0"]
            producers += [f"layer{s}.{b}.conv2" for b in range(n)]
            consumers = [f"layer{s}.{b}.conv1" for b in range(0 if s == 1 else 1, n)]
            if s < self.num_stages:
                consumers += [f"layer{s + 1}.0.conv1", f"layer{s + 1}.0.shortcut.0"]
            else:
                consumers += ["linear"]
            out.append((f"stage{s}", tuple(producers), tuple(consumers)))
        return out


def _build_resnet18(input_shape, num_classes, options) -> nn.Module:
    _check_options("resnet18", options)
    shape = _image_shape(input_shape, "resnet18")
    width = _positive_float(options.get("width", 1.0), "model.options.width")
    stages = [_scaled(c, width) for c in (64, 128, 256, 512)]
    defaults = {f"layer{s}.{b}.conv1": stages[s - 1] for s in range(1, 5) for b in range(2)}
    defaults.update({f"stage{s}": stages[s - 1] for s in range(1, 5)})
    widths = _widths(options, defaults)
    return ResNet(shape[0], [widths[f"stage{s}"] for s in range(1, 5)], widths, num_classes)


# --------------------------------------------------------------------------- registry

Builder = Callable[[tuple[int, ...], int, Mapping[str, Any]], nn.Module]

# each model's own options (besides the common ``widths`` and ``width_ratio``)
OPTIONS: dict[str, tuple[str, ...]] = {"mlp": ("hidden",), "cnn": ("channels", "hidden"), "leaf_cnn": ("width",),
                                       "vgg11": ("batch_norm", "width"), "resnet18": ("width",)}

MODELS: dict[str, Builder] = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "leaf_cnn": _build_leaf_cnn,
    "vgg11": _build_vgg11,
    "resnet18": _build_resnet18,
}


def build_zoo_model(name: str, input_shape: tuple[int, ...], num_classes: int,
                    options: Mapping[str, Any]) -> nn.Module:
    """Build zoo model ``name`` (``options`` without ``width_ratio``, which
    :func:`fedray.models.factory.build_model` resolves)."""
    if name not in MODELS:
        raise ConfigError("model.name", f"unknown model '{name}'; choose from: {', '.join(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError("data.num_classes", f"expected a positive integer, got {num_classes!r}")
    return MODELS[name](tuple(int(s) for s in input_shape), num_classes, dict(options))
