"""Typed, frozen parameter dataclasses: field helpers shared by the config and every method.

A field made with :func:`_f` carries its validation (``check``: a predicate and its
description, ``choices``) and a one-line ``doc``. :func:`fedray.config.build` enforces them
when a YAML mapping becomes a dataclass, so ``method.rho`` is a field path like
``data.partition.alpha``, and :func:`describe` lists a dataclass's fields with their
types, defaults and meaning (``fedray describe METHOD``).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import field

__all__ = ["_f", "POS", "NONNEG", "FRACTION", "UNIT", "UNIT_POS", "describe", "NoParams"]


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


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def describe(cls) -> list[dict]:
    """``[{name, type, default, doc, choices}]`` of a parameter dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append({"name": f.name, "type": _type_name(hints.get(f.name, f.type)), "default": default,
                    "doc": f.metadata.get("doc", ""), "choices": f.metadata.get("choices"),
                    "check": (f.metadata.get("check") or (None, None))[1]})
    return out
