"""What a method is: a planner, a server algorithm and a client algorithm, with typed parameters.

A method class (:class:`Method`) is a composition of three small parts, each with its own
explicit state, configured by the method's frozen ``Params`` dataclass (validated under the
``method:`` config section, so ``method.rho`` is a field path like any other):

- :class:`Planner` -- driver side. Picks clients (``select``), decides what each one trains
  (``plan`` -> :class:`Assignment`: a :class:`~fedray.submodel.submodel.Submodel`, the local
  budget and the client algorithm's per-dispatch settings), reads the telemetry devices
  report (``observe``) and the evaluations (``on_eval``), receives the server's messages
  (``receive``), and answers the schedule's questions (``deadline``, ``concurrency``,
  ``interval_s``, ``finished``). Its mutable state is ``self.state``.
- :class:`Server` -- aggregator side. ``aggregate(global_params, entries, record)`` from its
  own ``self.state``, the global model, the validated contributions (:class:`Entry`) and the
  :class:`RoundRecord` (selected set, drops, deadline, version); returns the new model or an
  :class:`Aggregation` (the model, a message for the planner, per-update layer inclusion).
  ``trigger`` decides when the buffer is aggregated (asynchronous schedules).
- :class:`ClientAlgorithm` -- inside the client actor. Hooks around local training:
  ``choose`` (the concrete submodel, e.g. client-picked channels), ``prepare`` (the local
  model holds the download and the client's own state), ``after_backward`` (each step's
  gradients), ``end_epoch`` (stop early), ``finalize`` (the extra arrays sent and the new
  client state). The trainer and the client worker know no method by name.

State that must survive a checkpoint is ``Planner.state`` and ``Server.state`` (plain,
picklable dataclasses or dicts) plus the per-client store (:mod:`fedray.client.state`);
anything else a part keeps is a cache that ``load_state_dict`` rebuilds. The planner and the
server talk only through messages: :meth:`Server.start` (before the first dispatch) and
``Aggregation.message`` (after an aggregation), handed to :meth:`Planner.receive`.

Schedules (:mod:`fedray.runtime.schedulers`):

- ``sync``: rounds, aggregated when the round ends (its slowest client, or :meth:`Planner.deadline`).
- ``async``: ``concurrency`` clients in flight; each arrival goes to the buffer and
  :meth:`Server.trigger` decides when to aggregate (FedAsync: at once; FedBuff: every K).
- ``interval``: aggregates whatever has arrived every :meth:`Planner.interval_s` virtual s (FedFix, PR-FL).

A user method is a subclass named by import path (``method: {name: "mypkg.algos:MyMethod"}``);
see ``docs/extending.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np

from fedray.aggregation.accumulate import Contribution
from fedray.params import NoParams
from fedray.submodel.masks import Params
from fedray.submodel.submodel import FULL, Submodel
from fedray.update import Update

if TYPE_CHECKING:
    from fedray.channel import Channel
    from fedray.models.info import ModelInfo

__all__ = ["Assignment", "RoundRecord", "Entry", "Aggregation", "PlanContext", "ServerContext", "ClientContext",
           "LocalRun", "Planner", "Server", "ClientAlgorithm", "Method", "NoParams"]


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Assignment:
    """What one client does this time."""

    client_id: int
    submodel: Submodel = FULL  # what it trains, downloads and sends
    send: str = "model"  # "model": trained values; "delta": trained - downloaded
    local_epochs: int | None = None  # None: train.local_epochs
    local_steps: int | None = None  # None: train.local_steps
    client: tuple = ()  # (name, value) pairs for the method's client algorithm
    info: tuple = ()  # (name, value) pairs recorded with the dispatch (depth, density...)

    def setting(self, name: str, default=None):
        """One of the client algorithm's per-dispatch settings."""
        return next((v for k, v in self.client if k == name), default)


@dataclass(frozen=True)
class RoundRecord:
    """The aggregation a server is asked for. ``selected``: the clients chosen for it (a sync
    round's selected set; async: the clients resolved since the last aggregation); ``dropped``:
    those that sent nothing (dropped out, late, lost with their actor); ``deadline_s``: the
    round's deadline after its start (None: none); ``version``: the version being replaced."""

    version: int
    selected: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    deadline_s: float | None = None

    @property
    def num_selected(self) -> int:
        return len(self.selected)


@dataclass(frozen=True)
class Entry:
    """One validated update as a server sees it: the header, the contribution (full-shape
    values and the mask they cover, weight = example count) and the extra arrays."""

    update: Update
    contribution: Contribution
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)
    state: Mapping | None = None  # the client's new state, when the method keeps one

    @property
    def client_id(self) -> int:
        return int(self.update.client_id)

    @property
    def base_version(self) -> int:
        return int(self.update.base_version)

    @property
    def dispatch_id(self) -> int:
        return int(self.update.dispatch_id)


@dataclass
class Aggregation:
    """A server's result: the new model, an optional message for the planner, and per
    dispatch id the share of the update's trained layers that was aggregated (default: 1
    for every entry; CLAMP and MA-CLAMP discard layers)."""

    params: Params
    message: Mapping | None = None
    included: Mapping[int, float] | None = None


# ---------------------------------------------------------------------------- contexts


@dataclass
class PlanContext:
    """What a planner knows about the run."""

    cfg: Any  # the ExperimentConfig
    method: str
    params: Any  # the method's Params
    model: "ModelInfo"
    channel: "Channel"
    profiles: Any  # the run's Population (fedray.devices.columns): pop[c] is client c's profile
    examples: np.ndarray  # training examples per client

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def num_clients(self) -> int:
        return len(self.examples)

    @property
    def spec(self):
        return self.model.spec_for(self.method)


@dataclass
class ServerContext:
    """What a server algorithm knows about the run."""

    cfg: Any
    method: str
    params: Any
    model: "ModelInfo"
    num_clients: int

    @property
    def spec(self):
        return self.model.spec_for(self.method)


@dataclass
class ClientContext:
    """What a client algorithm knows (one per client actor)."""

    cfg: Any
    method: str
    params: Any
    model: "ModelInfo"

    @property
    def spec(self):
        return self.model.spec_for(self.method)


@dataclass
class LocalRun:
    """One local training, as the client algorithm's hooks see it.

    ``download``: the model as received (full index space; uncovered coordinates are zero);
    ``start``: the values the local model starts from (compact tensors for a physically
    smaller model; ``prepare`` may change them, e.g. personal layers from ``state``);
    ``model``: the ``nn.Module`` being trained (the full model until ``choose`` returned) and
    ``named`` its parameters; ``data``: ``(x, y, indices)``, the client's examples are
    ``x[indices]``; ``state``: the client's own state from the store (None the first time);
    set ``new_state`` to replace it.
    """

    assignment: Assignment
    submodel: Submodel
    download: Mapping[str, np.ndarray]
    start: dict
    state: Mapping | None
    seed: int
    lr: float
    model: Any = None
    named: dict = field(default_factory=dict)
    data: tuple = ()  # (x, y, indices): the shared arrays and this client's examples
    device: Any = None
    loss: Any = None  # the task's loss(output, target)
    batch_size: int = 1
    steps: int = 0
    new_state: Mapping | None = None
    handles: list = field(default_factory=list)  # hook handles removed after training, whatever happens
    scratch: dict = field(default_factory=dict)  # the client algorithm's own working values
    broadcast: Mapping = field(default_factory=dict)  # arrays the server sends every client (Server.broadcast)

    def setting(self, name: str, default=None):
        return self.assignment.setting(name, default)

    def trained_values(self, keys=None) -> dict[str, np.ndarray]:
        """Numpy copies of the local model's state (``keys``: some of it) as trained so far."""
        from fedray.client.trainer import get_params

        return get_params(self.model, keys)


# ---------------------------------------------------------------------------- parts


class _Part:
    """What a planner and a server share: the context, the method's params and ``self.state``,
    the part's explicit state (an instance of ``State``, a dataclass; None without one)."""

    State: ClassVar[type | None] = None

    def __init__(self, ctx):
        self.ctx = ctx
        self.params = ctx.params
        self.state = self.init_state()

    def init_state(self):
        return self.State() if self.State is not None else None

    def state_dict(self) -> dict:
        return {"state": self.state}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore ``self.state``; a part with caches derived from it rebuilds them here."""
        self.state = state["state"]


class Planner(_Part):
    """Driver side: uniform selection, the whole model for everyone."""

    def select(self, rng: np.random.Generator, candidates, k: int) -> np.ndarray:
        """``k`` of the available ``candidates``, uniform, sorted (:class:`~fedray.runtime.dispatch.Candidates`)."""
        if hasattr(candidates, "sample"):
            return candidates.sample(rng, k)
        k = min(k, len(candidates))
        return np.sort(rng.choice(candidates, size=k, replace=False)) if k else np.empty(0, dtype=np.int64)

    def plan(self, client_id: int, version: int) -> Assignment:
        return Assignment(client_id=int(client_id))

    def observe(self, header: Update) -> None:
        """Telemetry of a finished update, as the device reported it (``header.telemetry``:
        ``round_s``, ``compute_s``, ``comm_s`` -- measured in ``devices.mode: real`` -- and the
        conditions ``cpu_load``, ``download_bps``, ``upload_bps``, ``battery``, ``speed``)."""

    def on_eval(self, metric: float, loss: float) -> None:
        """The task's primary metric and loss after an evaluated aggregation."""

    def receive(self, message: Mapping) -> None:
        """A message from the server (:meth:`Server.start`, ``Aggregation.message``)."""

    def finished(self) -> bool:
        """The method's own end of training (the run also ends at ``server.rounds`` or
        ``server.max_virtual_s``)."""
        return False

    def deadline(self, predicted_s: np.ndarray) -> float | None:
        """Sync rounds: seconds after the round start after which updates are dropped."""
        return None

    def concurrency(self) -> int:
        """Async schedules: clients in flight."""
        return self.ctx.cfg.server.clients_per_round

    def interval_s(self) -> float:
        """Interval schedule: virtual seconds between aggregations."""
        raise TypeError(f"{self.ctx.method} has no interval schedule")


class Server(_Part):
    """Aggregator side: the mean weighted by example count."""

    def start(self, global_params: Params) -> Mapping | None:
        """A message for the planner before the first dispatch (None: nothing)."""
        return None

    def trigger(self, pending: int) -> bool:
        """Aggregate now, with ``pending`` updates buffered? (async schedules)"""
        return False

    def max_staleness(self) -> int | None:
        """Updates staler than this many versions are rejected (None: no cutoff)."""
        return None

    def aggregate(self, global_params: Params, entries: list[Entry], record: RoundRecord) -> Params | Aggregation:
        from fedray.aggregation import rules

        return rules.weighted_mean(global_params, [e.contribution for e in entries])

    def on_eval(self, params: Params, metric: float) -> None:
        """The global model ``params`` was just evaluated; ``metric``: the task's primary metric."""

    def update_weight(self, entry: Entry, version: int) -> float:
        """The weight this server gives ``entry`` in its mean when it replaces version
        ``version`` (what the robust rules of ``defense:`` weigh by): the example count."""
        return float(entry.contribution.weight)

    def fused_check(self) -> bool:
        """May the merge check the values' finiteness (:mod:`fedray.aggregation.core`)? Only if every
        value reaches the model with a weight > 0 and ``aggregate`` keeps no state (an override says)."""
        return type(self).aggregate is Server.aggregate

    def broadcast(self) -> Mapping[str, np.ndarray] | None:
        """Arrays sent to every client with the model (SCAFFOLD's ``c``, declared in ``receives``)."""
        return None

    def eval_params(self, params: Params, evaluator) -> Params:
        """The parameters the global model is evaluated (and saved) with (HeteroFL: recomputed
        batch-norm statistics). ``evaluator`` gives access to the training data."""
        return params

    def personalize(self, params: Params, client_state: Mapping | None) -> Params:
        """One client's model for its own evaluation (FedPer: the global body and its head)."""
        return params


class ClientAlgorithm:
    """Client side: plain local training. Override only the hooks a method needs; the
    trainer calls ``after_backward`` and ``end_epoch`` only when they are overridden."""

    def __init__(self, ctx: ClientContext):
        self.ctx = ctx
        self.params = ctx.params

    def choose(self, run: LocalRun) -> Submodel:
        """The concrete submodel (default: the planned one). A compact submodel with
        ``widths`` must return one with ``keep`` (the channels this client keeps)."""
        return run.submodel

    def prepare(self, run: LocalRun) -> None:
        """After the download (and the client's state) is known, before the first step:
        change ``run.start``, or register hooks on ``run.model`` (add them to ``run.handles``)."""

    def after_backward(self, run: LocalRun) -> None:
        """After each backward pass, before the optimizer step (``run.named[k].grad``)."""

    def end_epoch(self, run: LocalRun, mean_loss: float) -> bool:
        """After each local epoch (epoch budgets only); True stops training."""
        return False

    def finalize(self, run: LocalRun) -> dict[str, np.ndarray]:
        """After training: the extra arrays sent with the update (as the submodel declared);
        set ``run.new_state`` to keep client state."""
        return {}

    @classmethod
    def overrides(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(ClientAlgorithm, hook)


class Method:
    """A named composition of a planner, a server and a client algorithm."""

    name: ClassVar[str] = "base"
    paper: ClassVar[str] = ""  # where it comes from (fedray describe)
    Params: ClassVar[type] = NoParams
    schedule: ClassVar[str] = "sync"
    # does planning depend on finished rounds (observe / receive / on_eval / finished)? If not,
    # synchronous rounds are planned ahead and run in windows, so such a method must not end
    # itself early through ``finished``.
    feedback: ClassVar[bool] = True
    needs_spec: ClassVar[bool] = False  # asks for the model's layer structure
    client_state: ClassVar[bool] = False  # keeps per-client state in the store
    Planner: ClassVar[type] = Planner
    Server: ClassVar[type] = Server
    Client: ClassVar[type] = ClientAlgorithm

    @classmethod
    def updates_per_aggregation(cls, cfg) -> int | None:
        """Updates one aggregation is built for (synchronous: the round's clients; None: not
        fixed). Krum's and central DP's checks use it."""
        return cfg.server.clients_per_round if cls.schedule == "sync" else None
