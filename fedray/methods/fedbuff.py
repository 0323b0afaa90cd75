"""FedBuff (Nguyen et al. 2022): buffered asynchronous aggregation of deltas.

Clients send ``delta_i = theta_i - theta_{v_i}`` against the version they
started from (``send="delta"``). The server buffers ``K = buffer_size``
deltas; when the buffer is full
``theta <- theta + eta_g * (1/K) * sum_i s(tau_i) delta_i``
(:func:`fedray.aggregation.rules.apply_delta_mean`; the sum is divided by
``K``, not by the sum of weights, as in the paper's Algorithm 1, so stale
deltas shrink the step), then the buffer clears. ``s`` defaults to
``1/sqrt(1 + tau)`` (``inv_sqrt``) and is configurable like FedAsync's.

Conventions (ours):

- Deltas are NOT weighted by example counts (the paper weights only by
  staleness); with equal example counts, ``K`` = the number of selected
  clients, no staleness and ``eta_g = 1`` this is synchronous FedAvg.
- ``tau_i`` is measured at aggregation time (``v`` = version being replaced).
- A masked delta contributes zero outside its mask (coordinates stay put).
- Optional server momentum (``server_momentum = beta > 0``): with ``T`` the
  FedBuff target above, :func:`fedray.aggregation.rules.momentum_step` with
  ``lr = 1`` gives ``v <- beta v + (theta - T)``, ``theta <- theta - v``
  (so ``beta = 0`` is plain FedBuff). The velocity is the server's state
  (checkpointed with it).
"""
from __future__ import annotations

from dataclasses import dataclass


from fedray.aggregation import rules
from fedray.aggregation.staleness import STALENESS
from fedray.methods.async_common import AsyncParams, AsyncPlanner, AsyncServer
from fedray.methods.base import Assignment, Method
from fedray.methods.registry import register
from fedray.params import POS, _f

MOMENTUM = (lambda v: 0 <= v < 1, "in [0, 1)")


@dataclass
class Velocity:
    """Server momentum buffer (None before the first step)."""

    velocity: dict | None = None


class FedBuffPlanner(AsyncPlanner):
    def plan(self, client_id: int, version: int) -> Assignment:
        return Assignment(client_id=int(client_id), send="delta")


class FedBuffServer(AsyncServer):
    State = Velocity

    def trigger(self, pending: int) -> bool:
        return pending >= self.params.buffer_size

    def update_weight(self, entry, version: int) -> float:
        return self.staleness_weight(version, entry.base_version)  # deltas are not weighted by examples

    def fused_check(self) -> bool:  # the delta mean with positive staleness weights; momentum keeps state
        return self.params.server_momentum == 0.0

    def aggregate(self, global_params, entries, record):
        deltas = [rules.Contribution(e.contribution.values, e.contribution.mask, self.update_weight(e, record.version))
                  for e in entries]
        target = rules.apply_delta_mean(global_params, deltas, self.params.server_lr)
        beta = self.params.server_momentum
        if beta == 0.0:
            return target
        new, self.state.velocity = rules.momentum_step(global_params, target, self.state.velocity, 1.0, beta)
        return new


@register
class FedBuff(Method):
    """Buffer K deltas weighted by 1/sqrt(1+staleness), then theta += eta_g * mean."""

    name = "fedbuff"
    paper = "Nguyen et al., Federated Learning with Buffered Asynchronous Aggregation, AISTATS 2022"
    schedule = "async"
    Planner = FedBuffPlanner
    Server = FedBuffServer

    @classmethod
    def updates_per_aggregation(cls, cfg) -> int:
        return cfg.method.params.buffer_size

    @dataclass(frozen=True)
    class Params(AsyncParams):
        staleness: str = _f("inv_sqrt", choices=tuple(STALENESS), doc="staleness weight s(tau) (default 1/sqrt(1+tau))")
        buffer_size: int = _f(10, check=POS, doc="K: deltas per aggregation")
        server_lr: float = _f(1.0, check=POS, doc="eta_g: server learning rate")
        server_momentum: float = _f(0.0, check=MOMENTUM, doc="server momentum beta (0: none)")


__all__ = ["FedBuff", "FedBuffPlanner", "FedBuffServer", "Velocity"]
