"""Typed, frozen parameter dataclasses: field helpers shared by the config and every method.

A field made with :func:`_f` carries its validation (``check``: a predicate and its
description, ``choices``) and a one-line ``doc``. :func:`build` enforces them when a YAML
mapping becomes a dataclass, so ``method.rho`` is a field path like
``data.partition.alpha``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any, Mapping

from fedray.errors import ConfigError

__all__ = ["_f", "POS", "NONNEG", "FRACTION", "UNIT", "UNIT_POS", "NoParams", "build", "seed_list"]


def _f(default=dataclasses.MISSING, *, check=None, choices=None, factory=None, doc: str = ""):
    """A dataclass field with validation metadata.

    ``check`` is ``(predicate, description)``, e.g. ``(lambda v: v > 0, "> 0")``.
    """
    meta = {"check": check, "choices": choices, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


POS = (lambda v: v > 0, "> 0")
NONNEG = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 < v < 1, "in (0, 1)")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
UNIT_POS = (lambda v: 0 < v <= 1, "in (0, 1]")


@dataclasses.dataclass(frozen=True)
class NoParams:
    """Methods without parameters of their own."""


# ---------------------------------------------------------------- building dataclasses from mappings


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, path: str):
    """Check ``value`` against the annotation ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, "must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is Any:
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(path, f"must be one of {', '.join(map(str, typing.get_args(tp)))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(path, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {value!r}")
        if math.isnan(value):
            raise ConfigError(path, f"must be a number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"must be a mapping, got {value!r}")
        return dict(value)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    raise ConfigError(path, f"unsupported type {_type_name(tp)}")


def build(cls, data: Mapping | None, path: str = ""):
    """Build frozen dataclass ``cls`` from a mapping, validating every field."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(path or "<root>", f"must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            known = f"known: {', '.join(sorted(fields))}" if fields else f"'{path or '<root>'}' takes no keys"
            raise ConfigError(where, f"unknown key ({known})")
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name not in data:
            continue
        value = _coerce(data[name], hints[name], where)
        meta = f.metadata
        if value is not None and meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(where, f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        check = meta.get("check")
        if value is not None and check is not None:
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if not check[0](v):
                    raise ConfigError(where, f"must be {check[1]}, got {v!r}")
        kwargs[name] = value
    return cls(**kwargs)


def seed_list(raw, field: str) -> tuple[int, ...]:
    """A config's list of seeds (``compare.seeds``, ``tune.final_seeds``): non-empty, integers
    >= 0, none repeated; otherwise a :class:`ConfigError` on ``field`` (``field[j]`` for one bad seed)."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ConfigError(field, f"must be a non-empty list of seeds, got {raw!r}")
    for j, s in enumerate(raw):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{field}[{j}]", f"must be an integer >= 0, got {s!r}")
    if len(set(raw)) != len(raw):
        raise ConfigError(field, f"must not repeat a seed, got {list(raw)}")
    return tuple(int(s) for s in raw)
