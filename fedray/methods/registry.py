"""Name -> method class. Method modules register themselves on import."""
from __future__ import annotations

import importlib

from fedray.errors import ConfigError

METHODS: dict[str, type] = {}

# modules imported on first lookup (one small module per method)
_MODULES = ("fedray.methods.fedavg", "fedray.methods.deadline", "fedray.methods.fedasync",
            "fedray.methods.fedbuff", "fedray.methods.fedfix", "fedray.methods.heterofl",
            "fedray.methods.clamp", "fedray.methods.prfl", "fedray.methods.cahfp", "fedray.methods.autoflip")


def register(cls):
    METHODS[cls.name] = cls
    return cls


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(mod)


def names() -> list[str]:
    _load_all()
    return sorted(METHODS)


def get(name: str):
    _load_all()
    if name not in METHODS:
        raise ConfigError("method.name", f"unknown method {name!r}; choose from: {', '.join(sorted(METHODS))}")
    return METHODS[name]
