"""What a run knows about its model: state shapes, the optional structure, FLOPs.

:class:`ModelInfo` is built once per process (driver, aggregator, client actor) from the
model the run trains. Every cost question goes through it:

- the :class:`~fedray.models.spec.ModelSpec` (layers, channel groups, FLOPs convention) is
  *optional*: it is traced on first use, and a model it cannot describe (LayerNorm,
  Embedding, LSTM, attention, ...) is an error only for the methods that ask for structure
  (depth, width or channel pruning): a :class:`~fedray.errors.ConfigError` naming the
  model. FedAvg and every method that trains the whole model run on any ``nn.Module``;
- training FLOPs per example: the spec's convention when the model has a spec, else
  counted by :class:`torch.utils.flop_counter.FlopCounterMode` on a forward and backward
  pass of two real training examples (matrix products and convolutions, 2 FLOPs per
  multiply-add; element-wise work is not counted);
- compact (physically smaller) models of the model zoo, for width submodels.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch import nn

from fedray.errors import ConfigError

__all__ = ["ModelInfo", "shape_like"]


def shape_like(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero-memory stand-ins (read-only broadcast views) with the shapes and dtypes of ``state``."""
    return {k: np.broadcast_to(np.zeros((), dtype=np.asarray(v).dtype), np.shape(v)) for k, v in state.items()}


class ModelInfo:
    """The run's model as cost and planning code sees it (see the module docstring).

    ``model``: a built instance (its weights are not used); ``example``: a few real training
    inputs (numpy), used to trace the spec and count FLOPs; ``name`` / ``options``: how the
    model was built (for compact models).
    """

    def __init__(self, model: nn.Module, example: np.ndarray, *, name: str, options: Mapping | None = None,
                 num_outputs: int | None = None):
        self.name, self.options = name, dict(options or {})
        self.input_shape = tuple(int(s) for s in np.shape(example)[1:])
        self.num_outputs = num_outputs
        self._model = model
        self._example = np.asarray(example[:2])
        state = model.state_dict()
        self.like = shape_like({k: v.detach().cpu().numpy() for k, v in state.items()})
        self._param_keys = [n for n, p in model.named_parameters() if p.is_floating_point()]
        self._spec = None
        self._spec_error: str | None = None
        self._flops: dict = {}
        self._compact: dict = {}

    # ------------------------------------------------------------ structure
    def try_spec(self):
        """The model spec, or None when the model cannot be described."""
        if self._spec is None and self._spec_error is None:
            from fedray.models.spec import model_spec

            try:
                self._spec = model_spec(self._model, self.input_shape)
            except (ValueError, RuntimeError, TypeError) as e:
                self._spec_error = str(e).splitlines()[0] if str(e) else type(e).__name__
        return self._spec

    def spec_for(self, who: str):
        """The spec, for ``who`` (a method name) that needs it; a ConfigError naming the model if none."""
        spec = self.try_spec()
        if spec is None:
            raise ConfigError("model.name", f"{who} needs the model's layer structure (layers, widths, channels), "
                                            f"but model {self.name!r} cannot be described: {self._spec_error}")
        return spec

    def param_keys(self) -> list[str]:
        """Names of the model's floating-point parameters (no buffers), in module order."""
        return list(self._param_keys)

    def num_layers(self) -> int:
        spec = self.try_spec()
        return spec.L if spec is not None else 1

    # ------------------------------------------------------------ FLOPs
    def trained_layers(self, trainable, mask) -> frozenset | None:
        """Names of the layers that train (None: all of them)."""
        if trainable is None and mask is None:
            return None
        spec = self.spec_for("a submodel with frozen or masked parts")
        if trainable is not None:
            return frozenset(spec.layer_of_key(k).name for k in trainable)
        return frozenset(spec.layer_of_key(k).name for k, m in mask.items() if k in spec.param_keys and m.any())

    def train_flops_per_example(self, trained: frozenset | None = None) -> int:
        """Training FLOPs per example with ``trained`` layers (None: the whole model); cached."""
        if trained not in self._flops:
            spec = self.try_spec()
            if spec is not None:
                self._flops[trained] = spec.train_flops(spec.layer_names if trained is None else trained, 1)
            elif trained is None:
                self._flops[trained] = self._counted_flops()
            else:
                self.spec_for("a submodel with frozen or masked parts")
        return self._flops[trained]

    def _counted_flops(self) -> int:
        return counted_train_flops(self._model, self._example)

    def sparse_factor(self, mask, sizes: Mapping[str, int] | None = None) -> float:
        """FLOPs a sparse kernel would execute relative to the dense ones: every layer's forward
        FLOPs scaled by the density of its weight under ``mask`` (1 where the mask does not
        cover the weight, e.g. a frozen layer's forward pass). Unstructured masks save no
        work in dense kernels; AutoFLIP's and PR-FL's published FLOPs count the sparse ones.
        With ``sizes`` (a compact model, the mask inside its kept channels) the layers and the
        densities are the compact model's: covered weights / the compact weight's size."""
        if mask is None:
            return 1.0
        spec = self.spec_for("a masked submodel") if sizes is None else self.compact_spec(sizes)
        total = scaled = 0.0
        for layer in spec.layers:
            f = layer.forward_flops
            m = mask.get(layer.weight_key)
            total += f
            density = np.count_nonzero(m) / math.prod(spec.shapes[layer.weight_key]) if m is not None else 1.0
            scaled += f * float(density)
        return scaled / total if total else 1.0

    # ------------------------------------------------------------ compact models
    def compact_spec(self, sizes: Mapping[str, int]):
        """Spec of the zoo's compact model keeping ``sizes[layer]`` channels of each prunable layer."""
        key = tuple(sorted(sizes.items()))
        if key not in self._compact:
            from fedray.models.factory import build_compact
            from fedray.models.spec import model_spec

            spec = self.spec_for("a physically smaller submodel")
            keep = {layer: np.arange(n, dtype=np.int64) for layer, n in sizes.items()}
            with torch.random.fork_rng(devices=[]):  # building a module draws its initial weights
                compact = build_compact(self.name, spec.input_shape, self.num_outputs, self.options, spec, keep)
            self._compact[key] = model_spec(compact, spec.input_shape)
        return self._compact[key]

    def compact_train_flops(self, sizes: Mapping[str, int]) -> int:
        cspec = self.compact_spec(sizes)
        return cspec.train_flops(cspec.layer_names, 1)

    def slice_mask(self, sizes: Mapping[str, int]):
        """The mask of the first ``sizes[layer]`` channels of every prunable layer: any choice of
        channels of the same sizes encodes to the same number of bytes (cached)."""
        key = ("mask", tuple(sorted(sizes.items())))
        if key not in self._compact:
            from fedray.submodel.width import keep_mask

            spec = self.spec_for("a physically smaller submodel")
            self._compact[key] = keep_mask(spec, self.like, {layer: np.arange(n, dtype=np.int64) for layer, n in sizes.items()})
        return self._compact[key]


def counted_train_flops(model: nn.Module, example: np.ndarray) -> int:
    """Training FLOPs per example of ``model`` (forward and backward of one batch ``example``, as
    torch's ``FlopCounterMode`` counts them: matrix products and convolutions). Its parameters'
    gradients are cleared after; its buffers (batch-norm statistics) see the batch."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    x = torch.from_numpy(np.array(example))  # a copy: ``example`` may be a read-only view (the object store)
    try:
        model.train()
        with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().sum().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return int(counter.get_total_flops() // max(len(x), 1))
