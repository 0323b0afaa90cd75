"""FedFix: asynchronous training, aggregation at a fixed virtual-time interval.

Clients train concurrently (``concurrency`` in flight, as FedAsync); every
``interval_s`` virtual seconds the server aggregates whatever updates have
arrived since the last aggregation (an empty interval changes nothing and
publishes no version). Our reading of "stale ones weighted by staleness":

- ``W = masked mean`` of the buffered models with weight ``n_i * s(tau_i)``
  per client (:func:`fedray.aggregation.rules.masked_mean`; a coordinate is
  averaged over the updates that cover it, uncovered ones keep their value),
  ``tau_i = v - v_i`` and ``s`` configurable (default polynomial, a = 0.5);
- server mixing ``theta <- (1 - eta) theta + eta W``
  (:func:`fedray.aggregation.rules.mix`, ``eta = server_mix``, default 1).

Clients send their trained model (``send="model"``).
"""
from __future__ import annotations

from dataclasses import dataclass

from fedray.aggregation import rules
from fedray.methods.async_common import AsyncParams, AsyncPlanner, AsyncServer
from fedray.methods.base import Method
from fedray.methods.registry import register
from fedray.params import POS, UNIT_POS, _f


class FedFixPlanner(AsyncPlanner):
    def interval_s(self) -> float:
        return float(self.params.interval_s)


class FedFixServer(AsyncServer):
    def fused_check(self) -> bool:  # a masked mean with positive staleness weights, mixed in with eta > 0
        return True

    def aggregate(self, global_params, entries, record):
        weighted = [rules.Contribution(e.contribution.values, e.contribution.mask, self.update_weight(e, record.version))
                    for e in entries]
        target = rules.masked_mean(global_params, weighted)
        return rules.mix(global_params, target, self.params.server_mix)


@register
class FedFix(Method):
    """Aggregate whatever arrived every interval_s virtual seconds."""

    name = "fedfix"
    paper = "the fixed-interval asynchronous baseline PR-FL is compared with"
    schedule = "interval"
    Planner = FedFixPlanner
    Server = FedFixServer

    @dataclass(frozen=True)
    class Params(AsyncParams):
        interval_s: float = _f(60.0, check=POS, doc="virtual seconds between aggregations")
        server_mix: float = _f(1.0, check=UNIT_POS, doc="eta: theta <- (1 - eta) theta + eta W")
