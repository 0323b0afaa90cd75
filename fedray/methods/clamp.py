"""Depth family: CLAMP, MA-CLAMP, FedPMT and FedDrop.

A client trains only its last ``d`` layers (:mod:`fedray.submodel.depth`): the
submodel's ``trainable`` holds their parameters and its ``mask`` their state-dict
keys, so the training FLOPs are those of those layers only (forward of the whole
model, backward down to the first trained layer, see
:meth:`fedray.models.spec.ModelSpec.train_flops`) and the upload is what the mask
covers. Every dispatch records ``depth`` in the metrics table.

CLAMP / MA-CLAMP planner, per client (its state, :class:`DepthControl`):

* a :class:`fedray.pruning.depth.DepthState`, starting at
  ``min(initial_depth, L)``;
* personal thresholds from :func:`fedray.pruning.depth.personal_thresholds`
  with the pruning module's documented choice: the client's first
  ``calibration_rounds`` observed round times set its band width, and the
  target is the federation reference -- the median of the first observed
  round time of every client observed so far (all at their initial depth)
  -- or, with ``threshold_reference: own``, the client's own first times.
  Thresholds are recomputed at each of the client's observations from those
  (fixed) first times and the (growing) federation pool;
* the 3-step hysteresis :func:`fedray.pruning.depth.depth_step` fed only by
  the telemetry of finished updates (:meth:`Planner.observe`):
  ``telemetry["round_s"]`` -- the round time the device reported, measured in
  ``devices.mode: real`` -- is the predicted round time of the next round at
  the current depth (our choice: the last reported round time -- the depth
  it was measured at is the current one unless a change was just applied),
  ``telemetry["battery"]`` below ``low_battery`` suggests a smaller depth.
  A client with fewer than ``calibration_rounds`` observations is not
  stepped.

Server side:

* CLAMP: :func:`fedray.aggregation.rules.common_depth` -- only the layers
  every arrived client trained; BatchNorm statistics follow their layer.
* MA-CLAMP: :func:`fedray.aggregation.rules.layerwise_threshold` with
  ``rho`` and ``|S|`` = the round's selected set (the round record: dropped and
  late clients count in ``|S|``, as the rule requires). Batch-norm running
  statistics are averaged over all of S: MA-CLAMP masks also cover every
  BatchNorm buffer (frozen layers update their running statistics in train
  mode), so every arrived client sends them and they are averaged over all
  arrivals.
* Both report per update the share of its trained layers that was aggregated
  (:func:`fedray.aggregation.rules.layer_inclusion`; ``sdir_layers``).
* FedPMT (fixed ``depth``) and FedDrop (depth uniform in ``1..L`` per
  dispatch, drawn from ``seeding.rng(seed, "mask", version, client)``):
  per-coordinate masked mean (:func:`fedray.aggregation.rules.masked_mean`),
  i.e. each layer averaged over the clients that trained it.

Local optimiser (Adam, lr 1e-3 in the published setting) is the ``train``
section's choice, not fixed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedray import seeding
from fedray.aggregation import rules
from fedray.errors import ConfigError
from fedray.methods.base import Aggregation, Assignment, Method, Planner, Server
from fedray.methods.registry import register
from fedray.params import POS, UNIT, _f
from fedray.pruning.depth import DepthState, depth_step, feddrop_depth, fedpmt_depth, personal_thresholds
from fedray.submodel.depth import depth_mask, depth_trainable
from fedray.submodel.masks import Mask
from fedray.submodel.submodel import Submodel
from fedray.update import Update

__all__ = ["DepthPlanner", "DepthControl", "DepthServer", "Clamp", "MaClamp", "FedPMT", "FedDrop"]


def _bn_stats(spec) -> list[str]:
    buffers = set(spec.buffer_keys)
    return [k for layer in spec.layers for k in layer.bn_keys if k in buffers]


class DepthPlanner(Planner):
    """Plans the depth-``d`` submodel; subclasses say which ``d``."""

    with_bn_stats = False  # masks also cover every BatchNorm buffer (MA-CLAMP)

    def __init__(self, ctx):
        super().__init__(ctx)
        spec = ctx.spec
        self.L = spec.L
        self._like = {k: np.broadcast_to(np.zeros((), dtype=bool), tuple(s)) for k, s in spec.shapes.items()}
        self._submodels: dict[int, Submodel] = {}

    def mask_for(self, d: int) -> Mask:
        return self.submodel(d).mask

    def submodel(self, d: int) -> Submodel:
        """The depth-``d`` submodel (cached per depth)."""
        if d not in self._submodels:
            spec = self.ctx.spec
            m = dict(depth_mask(spec, self._like, d))
            if self.with_bn_stats:  # every client reports the running statistics of all its BN layers
                for k in _bn_stats(spec):
                    m.setdefault(k, np.ones(np.shape(self._like[k]), dtype=bool))
            self._submodels[d] = Submodel(trainable=depth_trainable(spec, d), mask=m)
        return self._submodels[d]

    def depth_of(self, client_id: int, version: int) -> int:
        raise NotImplementedError

    def plan(self, client_id: int, version: int) -> Assignment:
        d = self.depth_of(int(client_id), int(version))
        return Assignment(client_id=int(client_id), submodel=self.submodel(d), info=(("depth", d),))


class DepthServer(Server):
    """Per-coordinate masked mean: each layer averaged over the clients that trained it."""

    def aggregate(self, global_params, entries, record):
        return rules.masked_mean(global_params, [e.contribution for e in entries])


# ------------------------------------------------------------------ CLAMP / MA-CLAMP


@dataclass(frozen=True)
class ClampParams:
    initial_depth: int = _f(3, check=POS, doc="starting depth d (capped at the number of layers L)")
    low_battery: float = _f(0.2, check=UNIT, doc="battery level below which a smaller depth is suggested")
    patience: int = _f(3, check=POS, doc="consecutive equal suggestions before the depth changes")
    margin: float = _f(0.25, check=(lambda v: 0 < v < 1, "in (0, 1)"),
                       doc="half-width of the personal threshold band (fraction of the target)")
    calibration_rounds: int = _f(1, check=POS, doc="first observed round times that set the personal thresholds")
    threshold_reference: str = _f("federation", choices=("federation", "own"),
                                  doc="threshold target: median first round time of the federation, or the client's own")


@dataclass
class DepthControl:
    """The CLAMP planner's state: each client's controller, its first observed round times
    and the federation pool of first round times (one per client)."""

    states: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)
    pool: dict = field(default_factory=dict)


class ClampPlanner(DepthPlanner):
    """Per-client CLAMP depth controller, fed only by update telemetry."""

    State = DepthControl

    def __init__(self, ctx):
        super().__init__(ctx)
        self.d0 = min(self.params.initial_depth, self.L)

    def depth(self, client_id: int) -> int:
        return self.state.states.get(client_id, DepthState(self.d0)).depth

    def depth_of(self, client_id: int, version: int) -> int:
        return self.depth(client_id)

    def thresholds(self, client_id: int) -> tuple[float, float]:
        s = self.state
        ref = None if self.params.threshold_reference == "own" else float(np.median(list(s.pool.values())))
        return personal_thresholds(s.first[client_id], ref, margin=self.params.margin)

    def observe(self, header: Update) -> None:
        c, telemetry, p, s = int(header.client_id), header.telemetry or {}, self.params, self.state
        t = telemetry.get("round_s")
        state = s.states.get(c, DepthState(self.d0))
        if t is None or not np.isfinite(t) or t <= 0:
            return
        first = s.first.setdefault(c, [])
        if len(first) < p.calibration_rounds:
            first.append(float(t))
            s.pool.setdefault(c, float(t))
            if len(first) < p.calibration_rounds:
                return
        t_low, t_high = self.thresholds(c)
        s.states[c] = depth_step(state, float(t), t_low, t_high, self.L, battery_level=telemetry.get("battery"),
                                 low_battery=p.low_battery, patience=p.patience)


class _LayerServer(Server):
    """CLAMP / MA-CLAMP: a layer rule and each update's layer inclusion."""

    with_bn_stats = False

    def __init__(self, ctx):
        super().__init__(ctx)
        spec = ctx.spec
        self.layers = [list(layer.keys) for layer in spec.layers]
        self.bn_stats = _bn_stats(spec) if self.with_bn_stats else []

    def threshold(self, record, n: int) -> int:
        raise NotImplementedError

    def rule(self, global_params, contribs, record):
        raise NotImplementedError

    def aggregate(self, global_params, entries, record):
        contribs = [e.contribution for e in entries]
        new = self.rule(global_params, contribs, record)
        share = rules.layer_inclusion(global_params, contribs, self.layers, self.threshold(record, len(contribs)),
                                      self.bn_stats)
        return Aggregation(new, included={e.dispatch_id: x for e, x in zip(entries, share)})


class ClampServer(_LayerServer):
    def threshold(self, record, n):
        return n

    def rule(self, global_params, contribs, record):
        return rules.common_depth(global_params, contribs, self.layers)


def selected_count(record, arrived: int) -> int:
    """``|S|`` of a round: its selected set (the arrivals when the record has none)."""
    return record.num_selected if record.num_selected else arrived


class MaClampServer(_LayerServer):
    with_bn_stats = True

    def threshold(self, record, n):
        return rules.participation_threshold(self.params.rho, selected_count(record, n))

    def rule(self, global_params, contribs, record):
        return rules.layerwise_threshold(global_params, contribs, self.layers, self.params.rho,
                                         num_selected=selected_count(record, len(contribs)), bn_keys=self.bn_stats)


class MaClampPlanner(ClampPlanner):
    with_bn_stats = True


@register
class Clamp(Method):
    """CLAMP: adaptive depth per client; the server averages only the common depth."""

    name = "clamp"
    paper = "CLAMP: depth pruning for stragglers"
    schedule = "sync"
    needs_spec = True
    Params = ClampParams
    Planner = ClampPlanner
    Server = ClampServer


@register
class MaClamp(Clamp):
    """MA-CLAMP: adaptive depth per client; each layer is averaged over the clients that
    trained it when they are at least ``max(1, floor(rho |S|))``; BN statistics over all of S."""

    name = "ma_clamp"
    paper = "MA-CLAMP: participation-threshold aggregation for depth-pruned stragglers"
    Planner = MaClampPlanner
    Server = MaClampServer

    @dataclass(frozen=True)
    class Params(ClampParams):
        rho: float = _f(0.5, check=UNIT, doc="participation threshold: a layer needs max(1, floor(rho |S|)) trainers")


# ------------------------------------------------------------------ FedPMT / FedDrop


class FedPMTPlanner(DepthPlanner):
    def __init__(self, ctx):
        super().__init__(ctx)
        if self.params.depth > self.L:
            raise ConfigError("method.depth", f"must be <= the model's {self.L} layers, got {self.params.depth}")

    def depth_of(self, client_id: int, version: int) -> int:
        return fedpmt_depth(self.L, self.params.depth)


class FedDropPlanner(DepthPlanner):
    def depth_of(self, client_id: int, version: int) -> int:
        return feddrop_depth(seeding.rng(self.ctx.seed, "mask", version, client_id), self.L)


@register
class FedPMT(Method):
    """FedPMT: every client trains the same fixed number of last layers."""

    name = "fedpmt"
    paper = "FedPMT: static-depth partial model training"
    schedule = "sync"
    feedback = False
    needs_spec = True
    Planner = FedPMTPlanner
    Server = DepthServer

    @dataclass(frozen=True)
    class Params:
        depth: int = _f(1, check=POS, doc="number of last layers every client trains")


@register
class FedDrop(Method):
    """FedDrop: a depth drawn uniformly from ``1..L`` for every dispatch."""

    name = "feddrop"
    paper = "FedDrop: random-depth partial model training"
    schedule = "sync"
    feedback = False
    needs_spec = True
    Planner = FedDropPlanner
    Server = DepthServer
