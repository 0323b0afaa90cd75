"""FedAsync (Xie et al. 2019): every arriving update is mixed in at once.

``theta <- (1 - a_s) theta + a_s theta_i`` with ``a_s = alpha * s(tau)``,
``tau = v - v_i`` the staleness of the update and ``s`` one of the staleness
functions of :mod:`fedray.aggregation.staleness` (default: polynomial
``(1 + tau)^-a`` with ``a = 0.5``; ``hinge`` takes ``a`` and ``b``).

Conventions (ours):

- Clients send their trained model (``send="model"``). For a partial update
  (a mask) only covered coordinates are mixed; the others keep their value.
- The trigger fires at every arrival, so an aggregation normally holds one
  update. If the aggregator is forced with several buffered updates they are
  mixed one after another in arrival order, each with its staleness against
  the version being built (``version`` does not advance inside one call).
- Integer/bool tensors follow :func:`fedray.aggregation.rules.mix` (max).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedray.aggregation import rules
from fedray.methods.async_common import AsyncParams, AsyncPlanner, AsyncServer
from fedray.methods.base import Method
from fedray.methods.registry import register
from fedray.params import UNIT_POS, _f


def masked_target(global_params, contribution: rules.Contribution) -> dict[str, np.ndarray]:
    """Full-shape client values on covered coordinates, the global value elsewhere."""
    out = {}
    for k, m in contribution.mask.items():
        v = contribution.values[k]
        out[k] = v if m.all() else np.where(m, v, global_params[k]).astype(global_params[k].dtype, copy=False)
    return out


class FedAsyncServer(AsyncServer):
    def trigger(self, pending: int) -> bool:
        return pending >= 1

    def mixing_rate(self, version: int, base_version: int) -> float:
        return self.params.alpha * self.staleness_weight(version, base_version)

    def aggregate(self, global_params, entries, record):
        theta = global_params
        for e in entries:
            theta = rules.mix(theta, masked_target(theta, e.contribution),
                              self.mixing_rate(record.version, e.base_version))
        return theta


@register
class FedAsync(Method):
    """Mix every arrival at once, alpha x s(staleness)."""

    name = "fedasync"
    paper = "Xie, Koyejo, Gupta, Asynchronous Federated Optimization, 2019 (arXiv:1903.03934)"
    schedule = "async"
    Planner = AsyncPlanner
    Server = FedAsyncServer

    @classmethod
    def updates_per_aggregation(cls, cfg) -> int:
        return 1

    @dataclass(frozen=True)
    class Params(AsyncParams):
        alpha: float = _f(0.6, check=UNIT_POS, doc="mixing rate; a_s = alpha * s(staleness)")
