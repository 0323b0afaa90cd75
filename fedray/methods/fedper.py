"""FedPer (Arivazhagan et al. 2019): a shared body and personal head layers.

The last ``personal_layers`` weight-carrying layers (with their bias and batch norm) are
the client's own: they live in the per-client store (:mod:`fedray.client.state`), are
trained locally and never sent. Everything else (the body) is FedAvg's: clients send the
trained body and the server averages it weighted by example count.

A client's first participation downloads the whole model (its head starts from the global
model's initial head); later ones download the body only and put their own head back
before training. The global model's head stays at its initial values, so the global test
accuracy is not FedPer's measure: per-client evaluation (``server.client_eval_every``)
evaluates every client's personal model -- the global body with its own head -- on its own
data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedray.aggregation import rules
from fedray.errors import ConfigError
from fedray.methods.base import Assignment, ClientAlgorithm, Method, Planner, Server
from fedray.methods.registry import register
from fedray.params import POS, _f
from fedray.submodel.submodel import Submodel


def head_keys(spec, n: int) -> set[str]:
    if n >= spec.L:
        raise ConfigError("method.personal_layers", f"must be < the model's {spec.L} layers, got {n}")
    return {k for layer in spec.last_layers(n) for k in layer.keys}


@dataclass
class Seen:
    """The planner's state: clients that hold a head already."""

    clients: set = field(default_factory=set)


class FedPerPlanner(Planner):
    State = Seen

    def __init__(self, ctx):
        super().__init__(ctx)
        like = ctx.model.like
        head = head_keys(ctx.spec, self.params.personal_layers)
        body = {k: np.ones(np.shape(v), dtype=bool) for k, v in like.items() if k not in head}
        self._first = Submodel(mask=body)  # downloads everything, sends the body
        self._again = Submodel(mask=body, download=body)

    def plan(self, client_id: int, version: int) -> Assignment:
        c = int(client_id)
        first = c not in self.state.clients
        return Assignment(client_id=c, submodel=self._first if first else self._again, info=(("first", first),))

    def observe(self, header):
        self.state.clients.add(int(header.client_id))


class FedPerServer(Server):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.head = head_keys(ctx.spec, self.params.personal_layers)

    def aggregate(self, global_params, entries, record):
        return rules.masked_mean(global_params, [e.contribution for e in entries])

    def personalize(self, params, client_state):
        if not client_state:
            return params
        return {k: (np.asarray(client_state[k]) if k in client_state else v) for k, v in params.items()}


class FedPerClient(ClientAlgorithm):
    def prepare(self, run):
        head = head_keys(self.ctx.spec, self.params.personal_layers)
        run.scratch["head"] = head
        if run.state:  # the client's own head replaces what was (not) downloaded
            for k in head:
                run.start[k] = np.array(run.state[k])

    def finalize(self, run):
        run.new_state = run.trained_values(sorted(run.scratch["head"]))
        return {}


@register
class FedPer(Method):
    """Personal head layers kept on every client, a FedAvg body."""

    name = "fedper"
    paper = "Arivazhagan et al., Federated Learning with Personalization Layers, 2019 (arXiv:1912.00818)"
    schedule = "sync"
    needs_spec = True
    client_state = True
    Planner = FedPerPlanner
    Server = FedPerServer
    Client = FedPerClient

    @dataclass(frozen=True)
    class Params:
        personal_layers: int = _f(1, check=POS, doc="the last layers that stay on the client (its head)")
