"""Name -> method class: fedray's methods (registered on import) and user methods by import path."""
from __future__ import annotations

import importlib

from fedray import plugins
from fedray.errors import ConfigError

METHODS: dict[str, type] = {}

# modules imported on first lookup (one small module per method)
_MODULES = ("fedray.methods.fedavg", "fedray.methods.deadline", "fedray.methods.fedasync",
            "fedray.methods.fedbuff", "fedray.methods.fedfix", "fedray.methods.heterofl",
            "fedray.methods.clamp", "fedray.methods.prfl", "fedray.methods.cahfp", "fedray.methods.autoflip",
            "fedray.methods.fedprox", "fedray.methods.scaffold", "fedray.methods.fedper",
            "fedray.methods.adaptive_masked_buff")


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
    """The method class ``name``: a registered name or an import path ``"pkg.module:Class"``."""
    from fedray.methods.base import Method

    if plugins.is_import_path(name):
        cls = plugins.load_object(name, "method.name", kind="method")
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError("method.name", f"{name!r} is not a subclass of fedray.methods.base.Method")
        if cls.schedule not in ("sync", "async", "interval"):
            raise ConfigError("method.name", f"{name!r}: schedule must be sync, async or interval, got {cls.schedule!r}")
        return cls
    _load_all()
    if name not in METHODS:
        raise ConfigError("method.name", f"unknown method {name!r}; choose from: {', '.join(sorted(METHODS))} "
                                         "or an import path 'package.module:Method'")
    return METHODS[name]
