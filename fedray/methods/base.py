"""What a method is: a composition of selection, submodel policy, local
training, aggregation rule and server schedule.

A method class declares its frozen ``Params`` dataclass (validated under the
``method:`` config section), a ``schedule`` for the driver loop, and three
small hooks. The driver loop calls :meth:`Method.select` and
:meth:`Method.plan`; the aggregator actor calls :meth:`Method.aggregate` with
the validated contributions. The math itself lives in
:mod:`fedray.aggregation.rules`, :mod:`fedray.submodel` and :mod:`fedray.pruning`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from fedray.aggregation import rules
from fedray.submodel.masks import Mask, Params


@dataclass(frozen=True)
class Assignment:
    """What one client trains this time."""

    client_id: int
    trainable: frozenset[str] | None = None  # parameter keys that train (None: all)
    mask: Mask | None = None  # coordinates trained and sent (None: trainable keys, dense)
    send: str = "model"  # "model" or "delta"
    local_epochs: int | None = None  # None: train.local_epochs
    local_steps: int | None = None  # None: train.local_steps


@dataclass(frozen=True)
class NoParams:
    """Methods without parameters of their own."""


class Method:
    """Base class: uniform sampling, full model, weighted mean."""

    name: ClassVar[str] = "base"
    Params: ClassVar[type] = NoParams
    schedule: ClassVar[str] = "sync"

    def __init__(self, cfg, spec=None):
        self.cfg = cfg
        self.params = cfg.method.params if cfg.method.params is not None else self.Params()
        self.spec = spec

    # ---- driver side
    def select(self, rng: np.random.Generator, candidates: np.ndarray, k: int) -> np.ndarray:
        """Pick ``k`` of the available ``candidates`` (uniform, without replacement)."""
        k = min(k, len(candidates))
        return np.sort(rng.choice(candidates, size=k, replace=False)) if k else np.empty(0, dtype=np.int64)

    def plan(self, client_id: int, version: int) -> Assignment:
        return Assignment(client_id=int(client_id))

    # ---- server side
    def aggregate(self, global_params: Params, contribs: list[rules.Contribution], version: int) -> Params:
        return rules.weighted_mean(global_params, contribs)

    def state_dict(self) -> Mapping:
        """Method state that must survive a checkpoint (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass
