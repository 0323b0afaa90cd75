"""Checks of model options shared by the zoo builders (:mod:`fedray.models.zoo`): each bad
value is a :class:`~fedray.errors.ConfigError` naming its ``model.options`` field."""
from __future__ import annotations

import math
from typing import Any, Mapping

from fedray.errors import ConfigError


def _int_list(value: Any, field: str, *, allow_empty: bool) -> list[int]:
    if isinstance(value, bool):
        raise ConfigError(field, f"expected a positive integer or a list of them, got {value!r}")
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(field, f"expected a positive integer or a list of them, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(field, f"expected positive integers, got {v!r}")
        out.append(int(v))
    if not out and not allow_empty:
        raise ConfigError(field, "must not be empty")
    return out


def _positive_float(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(field, f"expected a positive number, got {value!r}")
    return float(value)


def _scaled(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _widths(options: Mapping[str, Any], defaults: Mapping[str, int]) -> dict[str, int]:
    """Resolve the ``widths`` option against the model's prunable layers and their defaults."""
    raw = options.get("widths") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError("model.options.widths", f"expected a mapping layer -> size, got {type(raw).__name__}")
    out = dict(defaults)
    for layer, n in raw.items():
        if layer not in defaults:
            raise ConfigError("model.options.widths",
                              f"unknown prunable layer '{layer}'; choose from: {', '.join(defaults)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError("model.options.widths", f"size of '{layer}' must be a positive integer, got {n!r}")
        out[layer] = int(n)
    return out


def _image_shape(input_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(input_shape) == 2:
        input_shape = (1, *input_shape)
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ConfigError("model.name", f"model '{name}' needs image inputs (C, H, W); got shape {tuple(input_shape)}")
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]
