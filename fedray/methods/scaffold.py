"""SCAFFOLD (Karimireddy et al. 2020): stochastic controlled averaging, option II.

State: the server's control variate ``c`` (server state) and each client's ``c_i`` (the
per-client store, :mod:`fedray.client.state`; zero the first time), both over the trainable
parameters. A dispatch sends the model and ``c`` (extra arrays the client receives, counted
in the download); the client takes ``K`` local steps with the corrected gradient
``g - c_i + c`` (added after every backward pass), then

    c_i+ = c_i - c + (w_global - w) / (K lr)

and sends its model delta and ``delta c_i = c_i+ - c_i`` (extra arrays ``delta_c/<key>``,
counted in the upload); ``c_i+`` stays on the client. The server applies

    w <- w + eta_g * mean_i(delta w_i),     c <- c + (1 / N) sum_i delta c_i

over the round's arrived clients (N = all registered clients), unweighted as in the
paper. ``lr`` is ``train.lr``; the correction assumes plain SGD local steps (with momentum
or Adam it is the common approximation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedray.aggregation import rules
from fedray.methods.base import Aggregation, Assignment, ClientAlgorithm, Method, Planner, Server
from fedray.methods.registry import register
from fedray.params import POS, _f
from fedray.submodel.submodel import Extra, Submodel

C_PREFIX = "c/"
DELTA_PREFIX = "delta_c/"


class ScaffoldPlanner(Planner):
    def __init__(self, ctx):
        super().__init__(ctx)
        like = ctx.model.like
        keys = ctx.model.param_keys()
        self._sub = Submodel(receives=tuple(Extra(C_PREFIX + k, dtype=str(like[k].dtype), shape=tuple(like[k].shape))
                                            for k in keys),
                             extras=tuple(Extra(DELTA_PREFIX + k, dtype=str(like[k].dtype), shape=tuple(like[k].shape))
                                          for k in keys))

    def plan(self, client_id: int, version: int) -> Assignment:
        return Assignment(client_id=int(client_id), submodel=self._sub, send="delta")


@dataclass
class ControlVariate:
    c: dict = field(default_factory=dict)  # key -> server control variate


class ScaffoldServer(Server):
    State = ControlVariate

    def start(self, global_params):
        keys = self.ctx.model.param_keys()
        self.state.c = {k: np.zeros_like(np.asarray(global_params[k])) for k in keys}
        return None

    def broadcast(self):
        return {C_PREFIX + k: v for k, v in self.state.c.items()}

    def aggregate(self, global_params, entries, record):
        deltas = [rules.Contribution(e.contribution.values, e.contribution.mask, 1.0) for e in entries]
        new = rules.apply_delta_mean(global_params, deltas, self.params.server_lr)
        n = self.ctx.num_clients
        for k, c in self.state.c.items():
            total = np.zeros(c.shape, np.float64)
            for e in entries:
                total += e.extras[DELTA_PREFIX + k]
            self.state.c[k] = (c + total / n).astype(c.dtype)
        return Aggregation(new)


class ScaffoldClient(ClientAlgorithm):
    def prepare(self, run):
        c = {k[len(C_PREFIX):]: v for k, v in run.broadcast.items() if k.startswith(C_PREFIX)}
        ci = dict(run.state or {})
        dev = run.device
        run.scratch["c"] = c
        run.scratch["ci"] = {k: np.asarray(ci.get(k, np.zeros_like(v))) for k, v in c.items()}
        run.scratch["corr"] = {k: torch.from_numpy(np.asarray(v, dtype=np.float32) - run.scratch["ci"][k]).to(dev)
                               for k, v in c.items()}

    def after_backward(self, run):
        with torch.no_grad():
            for k, corr in run.scratch["corr"].items():
                g = run.named[k].grad
                if g is not None:
                    g.add_(corr)

    def finalize(self, run):
        steps = max(run.steps, 1)
        out, new_ci = {}, {}
        trained = {k: p.detach().cpu().numpy() for k, p in run.named.items()}
        for k, c in run.scratch["c"].items():
            ci = run.scratch["ci"][k]
            nxt = (ci - c + (np.asarray(run.start[k], np.float64) - trained[k]) / (steps * run.lr)).astype(c.dtype)
            out[DELTA_PREFIX + k] = (nxt - ci).astype(c.dtype)
            new_ci[k] = nxt
        run.new_state = new_ci
        return out


@register
class Scaffold(Method):
    """Control variates c_i (client store) and c (server) correct client drift."""

    name = "scaffold"
    paper = "Karimireddy et al., SCAFFOLD: Stochastic Controlled Averaging for Federated Learning, ICML 2020"
    schedule = "sync"
    feedback = False
    client_state = True
    Planner = ScaffoldPlanner
    Server = ScaffoldServer
    Client = ScaffoldClient

    @dataclass(frozen=True)
    class Params:
        server_lr: float = _f(1.0, check=POS, doc="eta_g: global step size on the mean model delta")
