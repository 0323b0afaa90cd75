"""``ModelSpec``: the exact layer / group / FLOPs description of a model.

Depth pruning, mask and width pruning and the device cost model all read this
one description, computed by :func:`model_spec` from the module structure plus
a traced forward pass of one dummy example (forward hooks, eval mode, no grad;
the model's training flags are restored afterwards).

Layers
    A *layer* is a weight-carrying ``nn.Linear`` or ``nn.Conv2d``. Its bias and
    the ``BatchNorm`` that directly follows it in execution order belong to it,
    so ``Layer.keys`` lists the weight, bias and the BN's weight, bias,
    running_mean, running_var and num_batches_tracked. Every state-dict key of
    the model belongs to exactly one layer (otherwise :func:`model_spec`
    raises ``ValueError``). ``ModelSpec.layers`` is in forward execution order,
    input to output; ``last_layers(d)`` are the ``d`` layers next to the output.

FLOPs convention (per example; a multiply-add counts 2 FLOPs)
    * Linear: ``(2*in*out + out[if bias]) * positions`` (positions = 1 for
      ``(N, in)`` inputs).
    * Conv2d: ``(2*Cin/groups*kh*kw + 1[if bias]) * Cout*Hout*Wout``.
    * BatchNorm attached to the layer: ``2*C*H*W`` (eval-style scale + shift;
      ``2*C*positions`` for BatchNorm1d).
    * Activations, pooling, residual additions and flattening: 0.
    ``forward(l)`` is the sum of these for layer ``l``.

    Backward (our exact choice): a *trained* layer costs ``forward(l)`` for its
    parameter gradient (the weight gradient has the forward's MACs; the bias and
    BN-parameter gradients mirror their forward terms). A layer's *input*
    gradient costs ``forward(l)`` as well and is needed iff some trained layer
    lies before ``l`` in ``layers`` order. Hence
    ``train_flops(trained, n) = n * (forward_flops() + sum_{l trained}
    forward(l) + sum_{l after the first trained layer} forward(l))``; training
    everything costs ``3*F - forward(first layer)`` per example (about 3x).

Structural groups
    A :class:`Group` is the output channels (conv) or output rows (linear) of a
    prunable hidden layer, as declared by the model's ``channel_links()``
    (see :mod:`fedray.models.zoo`). Only prunable groups are listed: the stem and
    residual-stream channels of ResNet and class outputs never are.
    ``out_slices`` are ``(key, axis)`` of the tensors indexed by the channel
    (weight, bias, BN weight/bias/running_mean/running_var; all axis 0).

    Residual streams (``ModelSpec.streams``) are groups too, declared by the model's
    ``stream_links()`` (``(name, producers, consumers)``): the channels of a ResNet stage's
    residual stream are written by several layers at once (the stem or the previous stage's
    last block, every block's second convolution and its shortcut) and read by several, so
    one channel index cuts all of them together. Streams are kept apart from ``groups``:
    HeteroFL's width slices cut them too (:func:`width_keep` with ``streams=True``), channel
    pruning by score (CA-HFP) and AutoFLIP's structured part prune only ``groups``.
    ``in_slices`` are ``(key, axis, block)`` of consumer weights: channel ``c``
    owns input columns ``c*block .. (c+1)*block-1`` on ``axis`` (``block`` = 1
    for conv->conv or linear->linear, ``H*W`` for conv->flatten->linear).

Submodels
    ``keep = {layer: kept channel indices}``. :meth:`ModelSpec.slice_index` turns
    it into per-key, per-axis index arrays; :func:`extract` cuts compact
    tensors with ``np.ix_``; :func:`scatter` writes them back at their original
    positions and returns the mask (the one mask type of
    :mod:`fedray.submodel.masks`); :func:`build_compact` builds the physically
    smaller ``nn.Module`` whose state dict has exactly the compact shapes;
    :func:`width_keep` is the HeteroFL rule (first ``ceil(ratio*C)``).
    Kept indices are sorted and de-duplicated, so compact tensors keep the
    original channel order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

Index = dict[str, tuple[np.ndarray, ...]]
Keep = Mapping[str, "np.ndarray | Iterable[int]"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
_LAYER_TYPES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Layer:
    """One weight-carrying layer with its bias and BatchNorm.

    ``in_features`` is ``in_features`` of a Linear or ``in_channels`` of a
    Conv2d; ``out`` its ``out_features`` / ``out_channels``. ``params`` counts
    trainable parameters (weight, bias, BN weight/bias), not BN buffers.
    ``in_shape`` / ``out_shape`` are per-example shapes traced at the layer's
    input and at its output (before the BN).
    """

    name: str
    kind: str  # "linear" | "conv"
    keys: tuple[str, ...]
    in_features: int
    out: int
    forward_flops: int
    params: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight_key: str
    bias_key: str | None = None
    bn: str | None = None
    bn_keys: tuple[str, ...] = ()

    @property
    def in_channels(self) -> int:
        return self.in_features


@dataclass(frozen=True)
class Group:
    """Prunable output channels of ``layer`` (``size`` of them); see module docstring."""

    layer: str
    size: int
    out_slices: tuple[tuple[str, int], ...]
    in_slices: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class ModelSpec:
    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    groups: tuple[Group, ...]
    shapes: Mapping[str, tuple[int, ...]] = field(compare=False)
    param_keys: tuple[str, ...] = ()
    buffer_keys: tuple[str, ...] = ()
    streams: tuple[Group, ...] = ()

    # ------------------------------------------------------------------ layers
    @property
    def L(self) -> int:
        return len(self.layers)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every state-dict key, in layer order."""
        return tuple(k for layer in self.layers for k in layer.keys)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named '{name}'; layers: {', '.join(self.layer_names)}")

    def layer_of_key(self, key: str) -> Layer:
        for layer in self.layers:
            if key in layer.keys:
                return layer
        raise KeyError(f"state-dict key '{key}' belongs to no layer")

    def last_layers(self, d: int) -> list[Layer]:
        """The ``d`` layers next to the output (``0 <= d <= L``), in input->output order."""
        if not 0 <= d <= self.L:
            raise ValueError(f"depth must be in 0..{self.L}, got {d}")
        return list(self.layers[self.L - d:])

    def keys_of_last(self, d: int) -> set[str]:
        return {k for layer in self.last_layers(d) for k in layer.keys}

    def keys_of(self, names: Iterable[str]) -> set[str]:
        return {k for n in names for k in self.layer(n).keys}

    def num_params(self, names: Iterable[str] | None = None) -> int:
        """Trainable parameters of the named layers (default: all)."""
        layers = self.layers if names is None else [self.layer(n) for n in names]
        return int(sum(layer.params for layer in layers))

    # ------------------------------------------------------------------ FLOPs
    def layer_flops(self, name: str) -> int:
        """Forward FLOPs per example of one layer (with its bias and BN)."""
        return self.layer(name).forward_flops

    def forward_flops(self) -> int:
        """Forward FLOPs per example of the whole model."""
        return int(sum(layer.forward_flops for layer in self.layers))

    def backward_flops(self, trained: Iterable[str]) -> int:
        """Backward FLOPs per example when the layers named in ``trained`` are trained."""
        trained = set(trained)
        unknown = trained - set(self.layer_names)
        if unknown:
            raise KeyError(f"unknown layers {sorted(unknown)}; layers: {', '.join(self.layer_names)}")
        total, seen_trained = 0, False
        for layer in self.layers:
            if seen_trained:  # input gradient needed: a trained layer lies before this one
                total += layer.forward_flops
            if layer.name in trained:
                total += layer.forward_flops
                seen_trained = True
        return total

    def train_flops(self, trained: Iterable[str], examples: int) -> int:
        """``examples * (forward of the whole model + backward of what is needed)``."""
        if examples < 0:
            raise ValueError(f"examples must be >= 0, got {examples}")
        return int(examples) * (self.forward_flops() + self.backward_flops(trained))

    # ------------------------------------------------------------------ groups / slicing
    def group(self, layer: str) -> Group:
        for g in self.groups + self.streams:
            if g.layer == layer:
                return g
        names = ", ".join(g.layer for g in self.groups + self.streams)
        raise KeyError(f"layer '{layer}' has no prunable group; prunable: {names}")

    def slice_index(self, keep: Keep) -> Index:
        """Per-key tuple of per-axis index arrays of the compact tensors.

        Axes untouched by ``keep`` get all indices. Scalars (num_batches_tracked)
        get the empty tuple.
        """
        index = {k: [np.arange(n, dtype=np.int64) for n in shape] for k, shape in self.shapes.items()}
        for layer, kept in keep.items():
            g = self.group(layer)
            idx = _normalise_kept(kept, g)
            for key, axis in g.out_slices:
                index[key][axis] = idx
            for key, axis, block in g.in_slices:
                index[key][axis] = (idx[:, None] * block + np.arange(block, dtype=np.int64)).ravel()
        return {k: tuple(v) for k, v in index.items()}

    def compact_shapes(self, keep: Keep) -> dict[str, tuple[int, ...]]:
        return {k: tuple(len(a) for a in idx) for k, idx in self.slice_index(keep).items()}


def _normalise_kept(kept: Any, g: Group) -> np.ndarray:
    idx = np.asarray(kept)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"kept channels of '{g.layer}' must be a non-empty 1-D integer array")
    idx = np.unique(idx.astype(np.int64))
    if idx[0] < 0 or idx[-1] >= g.size:
        raise ValueError(f"kept channels of '{g.layer}' must lie in 0..{g.size - 1}")
    return idx


# ---------------------------------------------------------------------- tracing

def _direct_state(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values()) or any(
        b is not None for b in module._buffers.values())


def model_spec(model: nn.Module, input_shape: tuple[int, ...]) -> ModelSpec:
    """Trace ``model`` on one dummy example of ``input_shape`` and describe it.

    Raises ``ValueError`` for structures the spec cannot describe: modules other
    than Linear/Conv2d/BatchNorm holding state, modules with state that do not
    run, modules that run twice, a BatchNorm not directly after its layer, or
    ``channel_links`` that do not match the traced shapes.
    """
    input_shape = tuple(int(s) for s in input_shape)
    named = dict(model.named_modules())
    stateful = {n: m for n, m in named.items() if _direct_state(m)}
    for n, m in stateful.items():
        if not isinstance(m, _LAYER_TYPES + _BN_TYPES):
            raise ValueError(f"module '{n}' ({type(m).__name__}) holds state but is not Linear, Conv2d or BatchNorm")

    records: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    handles = []

    def hook_for(name: str):
        def hook(_m, inputs, output):
            records.append((name, tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))
        return hook

    for n, m in stateful.items():
        handles.append(m.register_forward_hook(hook_for(n)))
    flags = {n: m.training for n, m in named.items()}
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for n, m in named.items():
            m.training = flags[n]

    ran = [r[0] for r in records]
    twice = {n for n in ran if ran.count(n) > 1}
    if twice:
        raise ValueError(f"modules run more than once per forward pass: {sorted(twice)}")
    missing = set(stateful) - set(ran)
    if missing:
        raise ValueError(f"modules with state did not run in the forward pass: {sorted(missing)}")

    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}

    def keys_of(name: str, m: nn.Module) -> list[str]:
        prefix = f"{name}." if name else ""
        ks = [prefix + p for p, v in m._parameters.items() if v is not None]
        ks += [prefix + b for b, v in m._buffers.items() if v is not None and prefix + b in state]
        return ks

    # build layers in execution order, attaching each BN to the layer right before it
    building: list[dict[str, Any]] = []
    last_was_layer = False
    for name, in_shape, out_shape in records:
        m = stateful[name]
        if isinstance(m, _LAYER_TYPES):
            building.append(_layer_record(name, m, in_shape, out_shape, keys_of(name, m)))
            last_was_layer = True
            continue
        prev = building[-1] if building else None
        if prev is None or not last_was_layer or prev["out"] != m.num_features:
            raise ValueError(f"BatchNorm '{name}' does not directly follow a Linear/Conv2d with "
                             f"{m.num_features} outputs")
        positions = math.prod(out_shape[1:]) if len(out_shape) > 1 else 1
        prev["bn"] = name
        prev["bn_keys"] = tuple(keys_of(name, m))
        prev["flops"] += 2 * m.num_features * positions
        prev["params"] += sum(p.numel() for p in m.parameters(recurse=False))
        last_was_layer = False
    layers = tuple(
        Layer(name=b["name"], kind=b["kind"], keys=tuple(b["keys"]) + b["bn_keys"], in_features=b["in"],
              out=b["out"], forward_flops=int(b["flops"]), params=int(b["params"]), in_shape=b["in_shape"],
              out_shape=b["out_shape"], weight_key=b["weight_key"], bias_key=b["bias_key"], bn=b["bn"],
              bn_keys=b["bn_keys"])
        for b in building)

    covered = [k for layer in layers for k in layer.keys]
    if sorted(covered) != sorted(state):
        raise ValueError("state-dict keys not covered exactly once by layers: "
                         f"{sorted(set(state) ^ set(covered))}")

    links = model.channel_links() if hasattr(model, "channel_links") else []
    groups = _groups(layers, links, named)
    streams = _streams(layers, model.stream_links() if hasattr(model, "stream_links") else [])
    param_keys = tuple(n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point())
    param_names = {n for n, _ in model.named_parameters()}
    buffer_keys = tuple(k for k in state if k not in param_names)
    return ModelSpec(input_shape=input_shape, layers=layers, groups=groups, shapes=shapes,
                     param_keys=param_keys, buffer_keys=buffer_keys, streams=streams)


def _layer_record(name: str, m: nn.Module, in_shape, out_shape, keys: list[str]) -> dict[str, Any]:
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        positions = math.prod(out_shape[:-1]) if len(out_shape) > 1 else 1
        flops = (2 * m.in_features * m.out_features + (m.out_features if bias else 0)) * positions
        kind, cin, cout = "linear", m.in_features, m.out_features
    else:
        kh, kw = m.kernel_size
        cin, cout = m.in_channels, m.out_channels
        flops = (2 * (cin // m.groups) * kh * kw + (1 if bias else 0)) * cout * math.prod(out_shape[1:])
        kind = "conv"
    prefix = f"{name}." if name else ""
    return {"name": name, "kind": kind, "keys": keys, "in": cin, "out": cout, "flops": flops,
            "params": sum(p.numel() for p in m.parameters(recurse=False)), "in_shape": in_shape,
            "out_shape": out_shape, "weight_key": prefix + "weight", "bias_key": prefix + "bias" if bias else None,
            "bn": None, "bn_keys": ()}


def _groups(layers: tuple[Layer, ...], links, modules: Mapping[str, nn.Module]) -> tuple[Group, ...]:
    by_name = {layer.name: layer for layer in layers}
    groups, producers, consumed = [], set(), set()
    for producer, consumers in links:
        if producer not in by_name:
            raise ValueError(f"channel link names unknown layer '{producer}'")
        if producer in producers:
            raise ValueError(f"layer '{producer}' is linked twice")
        producers.add(producer)
        p = by_name[producer]
        out_slices = [(p.weight_key, 0)]
        if p.bias_key:
            out_slices.append((p.bias_key, 0))
        out_slices += [(k, 0) for k in p.bn_keys if not k.endswith("num_batches_tracked")]
        in_slices = []
        for consumer in consumers:
            if consumer not in by_name:
                raise ValueError(f"channel link names unknown layer '{consumer}'")
            if consumer in consumed:
                raise ValueError(f"layer '{consumer}' consumes more than one prunable group")
            consumed.add(consumer)
            c = by_name[consumer]
            if c.in_features % p.out:
                raise ValueError(f"'{consumer}' has {c.in_features} inputs, not a multiple of "
                                 f"the {p.out} outputs of '{producer}'")
            block = c.in_features // p.out
            if c.kind == "conv" and (block != 1 or modules[consumer].groups != 1):
                raise ValueError(f"conv '{consumer}' must take the {p.out} channels of '{producer}' as input")
            in_slices.append((c.weight_key, 1, block))
        groups.append(Group(layer=producer, size=p.out, out_slices=tuple(out_slices), in_slices=tuple(in_slices)))
    return tuple(groups)


def _out_slices(p: Layer) -> list[tuple[str, int]]:
    out = [(p.weight_key, 0)]
    if p.bias_key:
        out.append((p.bias_key, 0))
    return out + [(k, 0) for k in p.bn_keys if not k.endswith("num_batches_tracked")]


def _streams(layers: tuple[Layer, ...], links) -> tuple[Group, ...]:
    """Residual streams: ``(name, producers, consumers)`` with one channel count shared by all."""
    by_name = {layer.name: layer for layer in layers}
    out, seen = [], set()
    for name, producers, consumers in links:
        for n in (*producers, *consumers):
            if n not in by_name:
                raise ValueError(f"stream '{name}' names unknown layer '{n}'")
        sizes = {by_name[p].out for p in producers} | {by_name[c].in_features for c in consumers}
        if len(sizes) != 1:
            raise ValueError(f"stream '{name}': producers and consumers disagree on its width {sorted(sizes)}")
        if set(producers) & seen:
            raise ValueError(f"stream '{name}' shares a producer with another stream")
        seen |= set(producers)
        out_slices = [sl for p in producers for sl in _out_slices(by_name[p])]
        in_slices = [(by_name[c].weight_key, 1, 1) for c in consumers]
        out.append(Group(layer=name, size=sizes.pop(), out_slices=tuple(out_slices), in_slices=tuple(in_slices)))
    return tuple(out)


# ---------------------------------------------------------------------- compact tensors

def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def extract(state: Mapping[str, Any], index: Index) -> dict[str, np.ndarray]:
    """Compact tensors ``state[k][np.ix_(*index[k])]`` for every key of ``index`` (numpy copies)."""
    out = {}
    for k, idx in index.items():
        if k not in state:
            raise KeyError(f"state has no tensor '{k}'")
        arr = _np(state[k])
        out[k] = arr[np.ix_(*idx)] if idx else np.array(arr, copy=True)
    return out


def scatter(compact: Mapping[str, Any], index: Index, like: Mapping[str, Any]) -> tuple[dict[str, np.ndarray],
                                                                                        dict[str, np.ndarray]]:
    """Put compact tensors back at their original indices.

    Returns ``(full, mask)`` for every key of ``compact``: ``full[k]`` is a copy of
    ``like[k]`` with the compact values written at ``np.ix_(*index[k])``, and
    ``mask[k]`` is the boolean array that is True exactly there.
    """
    full, mask = {}, {}
    for k, values in compact.items():
        idx = index[k]
        values = _np(values)
        base = np.array(_np(like[k]), copy=True)
        expected = tuple(len(a) for a in idx)
        if values.shape != expected:
            raise ValueError(f"compact tensor '{k}' has shape {values.shape}, expected {expected}")
        m = np.zeros(base.shape, dtype=bool)
        if idx:
            sel = np.ix_(*idx)
            base[sel] = values
            m[sel] = True
        else:
            base[...] = values
            m[...] = True
        full[k], mask[k] = base, m
    return full, mask


def width_keep(spec: ModelSpec, ratio: float, *, streams: bool = False) -> dict[str, np.ndarray]:
    """HeteroFL slice: the first ``ceil(ratio * C)`` channels of every prunable layer (at least 1),
    and with ``streams`` of every residual stream too."""
    if not 0 < ratio <= 1:
        raise ValueError(f"width ratio must be in (0, 1], got {ratio}")
    # round() first so that e.g. 0.6 * 10 = 6.000000000000001 keeps 6, not 7
    groups = spec.groups + (spec.streams if streams else ())
    return {g.layer: np.arange(max(1, math.ceil(round(ratio * g.size, 9))), dtype=np.int64) for g in groups}
