"""What a method is: a composition of selection, submodel policy, local
training, aggregation rule and server schedule.

A method class declares its frozen ``Params`` dataclass (validated under the
``method:`` config section), a ``schedule`` for the driver loop, and small
hooks. The driver loop calls :meth:`Method.select`, :meth:`Method.plan` and
:meth:`Method.observe` (telemetry, as a device reports it); the aggregator
actor calls :meth:`Method.trigger` and :meth:`Method.aggregate` with the
validated, buffered contributions. The math lives in
:mod:`fedray.aggregation.rules`, :mod:`fedray.submodel` and :mod:`fedray.pruning`.

Schedules (see :mod:`fedray.runtime.loop`):

- ``sync``: rounds; the round's updates are aggregated together when the
  round ends (its slowest client, or :meth:`Method.deadline`).
- ``async``: ``concurrency`` clients in flight; each arrival goes to the
  buffer and :meth:`Method.trigger` decides when to aggregate (FedAsync: at
  once; FedBuff: every K).
- ``interval``: like ``async`` but the server aggregates whatever has
  arrived every :meth:`Method.interval_s` virtual seconds (FedFix, PR-FL).

The driver-side and the aggregator-side instances are separate objects built
from the same config. Information flows between them only through two
explicit channels: the aggregator publishes :meth:`Method.public_state`
(after each aggregation) and the loop passes it to the driver's
:meth:`Method.sync_from_server`; the loop reports every evaluation to the
driver's :meth:`Method.on_eval`. Entries given to :meth:`Method.aggregate`
carry the update's ``payload.aux`` arrays (e.g. ``sq_grads/<key>``) on
``header.payload.aux`` (a payload with aux only; the trained values are in the
contribution).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from fedray.aggregation import rules
from fedray.submodel.masks import Mask
from fedray.submodel.masks import Params as State  # the class attribute ``Params`` is the method's config
from fedray.update import Update

Entry = tuple[Update, rules.Contribution]


@dataclass(frozen=True)
class Assignment:
    """What one client trains this time."""

    client_id: int
    trainable: frozenset[str] | None = None  # parameter keys that train (None: all)
    mask: Mask | None = None  # coordinates trained and sent (None: everything, dense)
    send: str = "model"  # "model" or "delta"
    local_epochs: int | None = None  # None: train.local_epochs
    local_steps: int | None = None  # None: train.local_steps
    download_mask: Mask | None = None  # what the client downloads (None: the whole model)
    keep: dict | None = None  # structured submodel {layer: kept channels}: trained as a physically smaller model
    keep_policy: str | None = None  # "curvature": the client picks its channels from local curvature (CA-HFP)
    keep_ratio: float = 1.0  # with keep_policy: fraction of channels of every prunable layer
    score_batches: int = 4  # with keep_policy: local mini-batches used to score channels
    hidden_scale: float | None = None  # HeteroFL scaler (outputs of hidden layers / beta while training)
    collect_sq_grads: bool = False  # report accumulated squared gradients (PR-FL importance)
    early_stop: bool = False  # stop local epochs once the training loss stops falling (costed as the full epochs)
    train_flops_per_example: int | None = None  # a physically smaller model's own cost (None: from the spec)
    bytes_down: int | None = None  # predicted download bytes when not one encoding of download_mask (PR-FL residual split)
    bytes_up: int | None = None  # predicted upload bytes when the mask is chosen by the client (CA-HFP)
    info: tuple = ()  # (name, value) pairs recorded with the dispatch (depth, density...)


@dataclass(frozen=True)
class NoParams:
    """Methods without parameters of their own."""


class Method:
    """Base class: uniform sampling, full model, mean weighted by example count."""

    name: ClassVar[str] = "base"
    Params: ClassVar[type] = NoParams
    schedule: ClassVar[str] = "sync"
    # does planning depend on finished rounds (observe / sync_from_server / on_eval / finished)?
    # If not, synchronous rounds are planned ahead and run in windows (up to twice
    # cluster.rounds_per_call rounds before the first of them is read), so such a method must
    # not end itself early through ``finished``.
    feedback: ClassVar[bool] = True

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

    def observe(self, header: Update) -> None:
        """Telemetry of a finished update, as the device reports it (adaptive methods)."""

    def on_eval(self, accuracy: float, loss: float) -> None:
        """Global test accuracy and loss after an evaluated aggregation (PR-FL's plateau monitor)."""

    def sync_from_server(self, state: Mapping) -> None:
        """Receive what the aggregator-side instance published with :meth:`public_state`."""

    def finished(self) -> bool:
        """The method's own end of training (PR-FL: fully recovered and plateaued); the run
        also ends at ``server.rounds`` or ``server.max_virtual_s``."""
        return False

    def deadline(self, predicted_s: np.ndarray) -> float | None:
        """Sync rounds: seconds after the round start after which updates are dropped."""
        return None

    def concurrency(self) -> int:
        """Async schedules: clients in flight."""
        return self.cfg.server.clients_per_round

    def interval_s(self) -> float:
        """Interval schedule: virtual seconds between aggregations."""
        raise NotImplementedError(f"{self.name} has no interval schedule")

    def max_staleness(self) -> int | None:
        """Updates staler than this many versions are rejected (None: no cutoff)."""
        return None

    # ---- server side
    def trigger(self, pending: int) -> bool:
        """Aggregate now, with ``pending`` updates buffered? (async schedules)"""
        return False

    def aggregate(self, global_params: State, entries: list[Entry], version: int) -> State:
        return rules.weighted_mean(global_params, [c for _, c in entries])

    def public_state(self, global_params: State, version: int) -> Mapping | None:
        """Server side: small state the driver-side instance needs for planning (PR-FL's
        importance scores, AutoFLIP's mask), or None when nothing changed. The aggregator
        calls it once before the first dispatch and after every aggregation; the loop hands
        a non-None result to the driver-side instance's :meth:`sync_from_server`."""
        return None

    def state_dict(self) -> Mapping:
        """Server-side method state that must survive a checkpoint (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass
