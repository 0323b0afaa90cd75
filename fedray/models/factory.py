"""Building models: zoo names, user models by import path, and compact (width-sliced) models.

``build_model(name, input_shape, num_outputs, options=...)``:

- a zoo name (:data:`fedray.models.zoo.MODELS`): the zoo builder with ``options``; the
  common option ``width_ratio`` builds the HeteroFL slice directly (the full-size model it
  is derived from is built under :func:`torch.random.fork_rng`, so the global RNG advances
  exactly as when building the narrower model itself);
- an import path ``"pkg.module:Net"``: ``Net(input_shape, num_outputs, **options)`` must
  return an ``nn.Module`` (a class or any callable).

``build_compact`` builds the physically smaller zoo model of a ``keep`` (kept channels of
each prunable layer), whose state-dict shapes equal ``spec.compact_shapes(keep)``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from fedray import plugins
from fedray.errors import ConfigError
from fedray.models.spec import Keep, ModelSpec, model_spec, width_keep
from fedray.models.zoo import MODELS, _positive_float, build_zoo_model

__all__ = ["build_model", "build_compact", "model_names"]


def model_names() -> list[str]:
    return sorted(MODELS)


def _user_model(name: str, input_shape, num_outputs: int, options: Mapping[str, Any]) -> nn.Module:
    builder = plugins.load_object(name, "model.name", kind="model")
    try:
        model = builder(tuple(input_shape), num_outputs, **dict(options))
    except TypeError as e:
        raise ConfigError("model.options", f"model {name!r} was called as {name.split(':')[-1]}(input_shape, "
                                           f"num_outputs, **model.options) and failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError("model.name", f"{name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *,
                options: Mapping[str, Any] | None = None) -> nn.Module:
    """Build model ``name`` for per-example ``input_shape`` (e.g. ``(1, 8, 8)``) and ``num_classes``
    outputs. Unknown names or options raise :class:`ConfigError` naming ``model.name`` /
    ``model.options.<key>``."""
    opts = dict(options or {})
    input_shape = tuple(int(s) for s in input_shape)
    if plugins.is_import_path(name):
        return _user_model(name, input_shape, num_classes, opts)
    ratio = opts.pop("width_ratio", None)
    if ratio is None:
        return build_zoo_model(name, input_shape, num_classes, opts)
    ratio = _positive_float(ratio, "model.options.width_ratio")
    if ratio > 1:
        raise ConfigError("model.options.width_ratio", f"must be in (0, 1], got {ratio}")
    if opts.get("widths"):
        raise ConfigError("model.options.width_ratio", "cannot be combined with model.options.widths")
    with torch.random.fork_rng(devices=[]):
        full = build_zoo_model(name, input_shape, num_classes, opts)
        spec = model_spec(full, input_shape)
    return build_compact(name, input_shape, num_classes, opts, spec, width_keep(spec, ratio, streams=True))


def build_compact(name: str, input_shape: tuple[int, ...], num_classes: int, options: Mapping[str, Any] | None,
                  spec: ModelSpec, keep: Keep) -> nn.Module:
    """A physically smaller model whose state-dict shapes equal ``spec.compact_shapes(keep)``.

    ``name``, ``options`` are those the full model (described by ``spec``) was
    built with. Weights are freshly initialised; load ``extract(...)`` into it.
    """
    if plugins.is_import_path(name):
        raise ConfigError("model.name", f"physically smaller submodels need a zoo model that takes 'widths'; "
                                        f"{name!r} is a user model")
    opts = dict(options or {})
    if "width_ratio" in opts:
        raise ValueError("build_compact takes the options of the full model; drop 'width_ratio'")
    widths = dict(opts.get("widths") or {})
    widths.update({layer: int(np.unique(np.asarray(kept)).size) for layer, kept in keep.items()})
    opts["widths"] = widths
    expected = spec.compact_shapes(keep)
    model = build_zoo_model(name, input_shape, num_classes, opts)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if got != expected:
        raise ValueError(f"compact '{name}' does not match the spec (was it built with other options?)")
    return model
