"""Pieces shared by the asynchronous methods (FedAsync, FedBuff, FedFix).

:class:`AsyncParams` holds the ``method:`` fields every asynchronous method
has: the staleness function (a name of
:data:`fedray.aggregation.staleness.STALENESS` plus its parameters ``a`` and
``b``), the number of clients in flight and the maximum-staleness cutoff.
:func:`staleness_fn` binds them through :func:`fedray.aggregation.staleness.get`
(the one way to pick a staleness function) and reports a bad combination as a
``ConfigError`` naming the ``method.*`` field. :class:`AsyncPlanner` answers the
schedule's ``concurrency()`` and :class:`AsyncServer` ``max_staleness()`` and the
staleness weight from those fields.

Staleness of an update is ``tau = v - v_i``: the server version at
aggregation minus the version the client started from.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

from fedray.aggregation import staleness
from fedray.errors import ConfigError
from fedray.methods.base import Planner, Server
from fedray.params import NONNEG, POS, _f

__all__ = ["AsyncParams", "AsyncPlanner", "AsyncServer", "staleness_fn"]


def staleness_fn(params) -> Callable:
    """``s(tau)`` for ``params.staleness`` with ``params.a`` / ``params.b`` bound
    (``None``: the function's own default). Raises ``ConfigError`` naming the field."""
    name = params.staleness
    fn = staleness.STALENESS.get(name)
    if fn is None:
        raise ConfigError("method.staleness", f"must be one of {', '.join(staleness.STALENESS)}, got {name!r}")
    allowed = [p for p in inspect.signature(fn).parameters if p != "s"]
    bound = {}
    for key in ("a", "b"):
        value = getattr(params, key)
        if value is None:
            continue
        if key not in allowed:
            takes = ", ".join(allowed) if allowed else "no parameters"
            raise ConfigError(f"method.{key}", f"staleness {name!r} has no parameter {key!r} (it takes {takes})")
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"method.{key}", f"must be a finite number >= 0, got {value!r}")
        bound[key] = float(value)
    try:
        return staleness.get(name, **bound)
    except ConfigError as e:  # re-anchor the field path under method:
        raise ConfigError("method.staleness", e.message) from None


@dataclass(frozen=True)
class AsyncParams:
    staleness: str = _f("polynomial", choices=tuple(staleness.STALENESS),
                        doc="staleness weight s(tau): constant, polynomial, hinge, inv_sqrt, prfl")
    a: float | None = _f(None, check=NONNEG,
                         doc="staleness parameter a (polynomial/prfl exponent, hinge slope); null: default")
    b: float | None = _f(None, check=NONNEG, doc="hinge: staleness up to which the weight is 1; null: default")
    concurrency: int | None = _f(None, check=POS, doc="clients in flight (null: server.clients_per_round)")
    max_staleness: int | None = _f(None, check=NONNEG, doc="reject updates staler than this (null: no cutoff)")

    def __post_init__(self):
        staleness_fn(self)  # validates the name / parameter combination


class AsyncPlanner(Planner):
    """Clients in flight: ``method.concurrency`` (null: ``server.clients_per_round``)."""

    def concurrency(self) -> int:
        c = self.params.concurrency
        return int(c) if c is not None else self.ctx.cfg.server.clients_per_round


class AsyncServer(Server):
    """``self.weight_of(tau)`` is the bound staleness function; ``max_staleness`` the cutoff."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.weight_of = staleness_fn(self.params)

    def max_staleness(self) -> int | None:
        return self.params.max_staleness

    def staleness_weight(self, version: int, base_version: int) -> float:
        """``s(v - v_i)``."""
        return float(self.weight_of(version - base_version))

    def update_weight(self, entry, version: int) -> float:
        return float(entry.contribution.weight) * self.staleness_weight(version, entry.base_version)
