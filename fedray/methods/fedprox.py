"""FedProx (Li et al. 2020): FedAvg with a proximal term in the local objective.

Each client minimises ``F_i(w) + (mu / 2) ||w - w_global||^2`` over the coordinates it
trains: the client algorithm adds ``mu (w - w_global)`` to every trained parameter's
gradient after each backward pass (the gradient of the proximal term; masked coordinates
are restored after each step anyway). ``mu = 0`` is FedAvg. The server is FedAvg's mean
weighted by example count. (The paper's tolerance to partial local work -- "inexact"
solutions of heterogeneous devices -- is what fedray's device model already simulates with
each client's own budget.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedray.methods.base import ClientAlgorithm, Method
from fedray.methods.registry import register
from fedray.params import NONNEG, _f


class ProximalClient(ClientAlgorithm):
    def prepare(self, run):
        if float(self.params.mu):  # w_global: the values the local model starts from
            run.scratch["anchor"] = {k: torch.from_numpy(np.array(run.start[k])).to(run.device)
                                     for k in run.named if k in run.start}

    def after_backward(self, run):
        anchor = run.scratch.get("anchor")
        if not anchor:
            return
        mu = float(self.params.mu)
        with torch.no_grad():
            for k, w0 in anchor.items():
                p = run.named[k]
                if p.grad is not None:
                    p.grad.add_(p.detach() - w0, alpha=mu)


@register
class FedProx(Method):
    """FedAvg with the proximal term (mu/2)||w - w_global||^2 in every local objective."""

    name = "fedprox"
    paper = "Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020"
    schedule = "sync"
    feedback = False
    Client = ProximalClient

    @dataclass(frozen=True)
    class Params:
        mu: float = _f(0.01, check=NONNEG, doc="weight of the proximal term (mu/2)||w - w_global||^2")
