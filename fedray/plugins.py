"""User code by import path: ``"pkg.module:Name"`` for methods, models, data sets and tasks.

A name with a colon is imported (``importlib.import_module("pkg.module")``, then the
attribute); any other name is looked up in fedray's own registry for that kind. The
current directory is on the import path, as for ``python -m``, so a plugin file next to
the config works in the driver; Ray starts its workers in the driver's directory (and a
submitted job's workers in its uploaded working directory), so every actor resolves the
same name to the same object. A name that cannot be resolved is a
:class:`~fedray.errors.ConfigError` naming the field, raised before Ray starts.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable, Mapping

from fedray.errors import ConfigError

__all__ = ["is_import_path", "load_object", "call_with"]


def is_import_path(name: str) -> bool:
    return isinstance(name, str) and ":" in name


def _ensure_cwd_on_path() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def load_object(name: str, field: str, *, kind: str) -> Any:
    """The object ``"pkg.module:Attr.sub"`` names; ``field`` and ``kind`` word the error."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(field, f"{kind} import path must look like 'package.module:Name', got {name!r}")
    _ensure_cwd_on_path()
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(field, f"cannot import {module_name!r} for {kind} {name!r}: {e}") from None
    except Exception as e:  # the user's module itself failed while importing
        raise ConfigError(field, f"importing {module_name!r} for {kind} {name!r} failed: "
                                 f"{type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(field, f"module {module_name!r} has no {kind} {attr!r}")
        obj = getattr(obj, part)
    return obj


def call_with(fn: Callable, available: Mapping[str, Any]):
    """Call ``fn`` with the keyword arguments of ``available`` that its signature accepts
    (all of them when it takes ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn(**available)
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fn(**available)
    return fn(**{k: v for k, v in available.items() if k in sig.parameters})
