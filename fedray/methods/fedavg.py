"""FedAvg (McMahan et al. 2017): sample m clients per round, full model,
E local epochs, mean weighted by example count; wait for every selected client.

Optional server momentum (``server_momentum = beta > 0``, FedAvgM, Hsu et al. 2019): with
``T`` the weighted mean, :func:`fedray.aggregation.rules.momentum_step` (``lr = 1``) on the
trainable parameters gives ``v <- beta v + (theta - T)``, ``theta <- theta - v``; buffers
(BatchNorm statistics) take ``T``. ``beta = 0`` is plain FedAvg. The same step as AutoFLIP's
server (its FedAvg baseline with the same momentum: ``label: fedavg_momentum`` in
``configs/experiments/autoflip.yaml``). The velocity is the server's state (checkpointed).
"""
from __future__ import annotations

from dataclasses import dataclass

from fedray.aggregation import rules
from fedray.methods.base import Method, Server
from fedray.methods.fedbuff import MOMENTUM, Velocity
from fedray.methods.registry import register
from fedray.params import _f


class FedAvgServer(Server):
    State = Velocity

    def fused_check(self) -> bool:  # plain FedAvg is the default mean; momentum keeps state
        return self.params.server_momentum == 0.0

    def aggregate(self, global_params, entries, record):
        target = super().aggregate(global_params, entries, record)
        beta = self.params.server_momentum
        if beta == 0.0:
            return target
        keys = self.ctx.model.param_keys()
        new, self.state.velocity = rules.momentum_step(global_params, {k: target[k] for k in keys},
                                                       self.state.velocity, 1.0, beta)
        new.update({k: target[k] for k in global_params if k not in keys})
        return new


@register
class FedAvg(Method):
    """Sample m clients per round, full model, mean weighted by examples (optional server momentum)."""

    name = "fedavg"
    paper = "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS 2017"
    schedule = "sync"
    feedback = False
    Server = FedAvgServer

    @dataclass(frozen=True)
    class Params:
        server_momentum: float = _f(0.0, check=MOMENTUM, doc="server momentum beta (0: none, FedAvgM otherwise)")
