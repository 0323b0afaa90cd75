"""Deadline FedAvg ("exclude stragglers"): synchronous FedAvg whose rounds end
at a deadline; updates that would arrive later are dropped.

Our reading of the baseline: the deadline of a round is ``deadline_factor x``
the median of the *predicted* round times (download + compute + upload, from
the one cost model) of the clients dispatched in that round, measured from the
round start. The loop marks the later clients ``late`` at dispatch: their
energy, FLOPs and bytes are counted up to the deadline (a client cut during its
upload has sent part of it; one cut earlier has sent nothing), and the round
lasts until the deadline when anyone is late. With ``deadline_factor >= 1`` at
least half of the dispatched clients meet the deadline, so no round is empty by
construction (values below 1 are refused for that reason). Aggregation is
FedAvg's mean weighted by example count over the updates that made it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedray.methods.base import Planner
from fedray.methods.fedavg import FedAvg
from fedray.methods.registry import register
from fedray.params import _f

AT_LEAST_ONE = (lambda v: v >= 1, ">= 1")


def deadline_seconds(predicted_s: np.ndarray, factor: float) -> float | None:
    """``factor x median(predicted_s)``; None for an empty round."""
    t = np.asarray(predicted_s, dtype=np.float64)
    if t.size == 0:
        return None
    return float(factor * np.median(t))


class DeadlinePlanner(Planner):
    def deadline(self, predicted_s: np.ndarray) -> float | None:
        return deadline_seconds(predicted_s, self.params.deadline_factor)


@register
class FedAvgDeadline(FedAvg):
    """FedAvg that drops updates later than 1.5 x the round's median predicted time."""

    name = "fedavg_deadline"
    paper = "the 'exclude stragglers' baseline of McMahan et al. 2017 and Bonawitz et al. 2019"
    Planner = DeadlinePlanner

    @dataclass(frozen=True)
    class Params(FedAvg.Params):
        deadline_factor: float = _f(1.5, check=AT_LEAST_ONE,
                                    doc="round deadline = factor x median predicted round time")
