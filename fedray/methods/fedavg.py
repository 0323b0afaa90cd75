"""FedAvg (McMahan et al. 2017): sample m clients per round, full model,
E local epochs, mean weighted by example count; wait for every selected client."""
from __future__ import annotations

from fedray.methods.base import Method
from fedray.methods.registry import register


@register
class FedAvg(Method):
    """Sample m clients per round, full model, mean weighted by examples."""

    name = "fedavg"
    paper = "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS 2017"
    schedule = "sync"
    feedback = False
