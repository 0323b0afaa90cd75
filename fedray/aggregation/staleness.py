"""Staleness weight functions.

Staleness ``s`` (``tau``) of an update is the number of global versions
published between the version the client started from and the version it is
applied to (``s = v - v_i >= 0``). Every function maps staleness to a weight
in (0, 1], is vectorised (numpy arrays in, array out; a scalar in gives a
Python float) and rejects negative staleness with ``ValueError``.

- ``constant(s) = 1``
- ``polynomial(s, a=0.5) = (1 + s)^-a``                 (FedAsync)
- ``hinge(s, a=10, b=4) = 1 if s <= b else 1 / (a (s - b) + 1)``  (FedAsync)
- ``inv_sqrt(s) = 1 / sqrt(1 + s)``                      (FedBuff)
- ``prfl(v, v_i, a=0.6) = (v - v_i + 1)^-a``            (PR-FL)

:data:`STALENESS` maps config names to functions *of the staleness alone*;
its ``"prfl"`` entry is ``(s + 1)^-a`` with PR-FL's default ``a = 0.6`` (the
same number as :func:`prfl` with ``s = v - v_i``). :func:`get` binds the
parameters from the config and raises ``ConfigError("aggregation.staleness",
...)`` for an unknown name, an unknown parameter or a bad value.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Callable

import numpy as np

from fedray.errors import ConfigError

__all__ = ["constant", "polynomial", "hinge", "inv_sqrt", "prfl", "STALENESS", "get"]

StalenessFn = Callable[..., "float | np.ndarray"]


def _staleness(s) -> np.ndarray:
    arr = np.asarray(s, dtype=np.float64)
    if np.any(np.isnan(arr)) or np.any(arr < 0):
        raise ValueError(f"staleness must be >= 0, got {s!r}")
    return arr


def _out(arr: np.ndarray):
    return float(arr) if arr.ndim == 0 else arr


def constant(s):
    """Weight 1 whatever the staleness."""
    return _out(np.ones_like(_staleness(s)))


def polynomial(s, a: float = 0.5):
    """``(1 + s)^-a``."""
    return _out(np.power(1.0 + _staleness(s), -float(a)))


def hinge(s, a: float = 10.0, b: float = 4.0):
    """``1`` for ``s <= b``, else ``1 / (a (s - b) + 1)``."""
    arr = _staleness(s)
    return _out(np.where(arr <= b, 1.0, 1.0 / (float(a) * np.maximum(arr - b, 0.0) + 1.0)))


def inv_sqrt(s):
    """``1 / sqrt(1 + s)`` (FedBuff)."""
    return _out(1.0 / np.sqrt(1.0 + _staleness(s)))


def prfl(v, v_i, a: float = 0.6):
    """PR-FL: ``(v - v_i + 1)^-a`` for current version ``v`` and start version ``v_i``."""
    return _out(np.power(1.0 + _staleness(np.subtract(v, v_i)), -float(a)))


def _prfl_staleness(s, a: float = 0.6):
    """PR-FL weight as a function of the staleness ``s = v - v_i``."""
    return polynomial(s, a)


STALENESS: dict[str, StalenessFn] = {
    "constant": constant,
    "polynomial": polynomial,
    "hinge": hinge,
    "inv_sqrt": inv_sqrt,
    "prfl": _prfl_staleness,
}


def get(name: str, **params) -> Callable[..., "float | np.ndarray"]:
    """The staleness function ``name`` with ``params`` bound: ``f(s) -> weight``.

    Parameters must be finite and >= 0 (``a`` and ``b``).
    """
    field = "aggregation.staleness"
    fn = STALENESS.get(name)
    if fn is None:
        raise ConfigError(field, f"unknown staleness function {name!r}; "
                                 f"choose one of {', '.join(sorted(STALENESS))}")
    allowed = [p for p in inspect.signature(fn).parameters if p != "s"]
    for key, value in params.items():
        if key not in allowed:
            expected = ", ".join(allowed) if allowed else "no parameters"
            raise ConfigError(field, f"unknown parameter {key!r} for {name!r} (expected {expected})")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value) or value < 0:
            raise ConfigError(field, f"parameter {key!r} of {name!r} must be a number >= 0, "
                                     f"got {value!r}")
    return functools.partial(fn, **params) if params else fn
