"""Depth family: CLAMP, MA-CLAMP, FedPMT and FedDrop.

A client trains only its last ``d`` layers (:mod:`fedray.submodel.depth`):
``Assignment.trainable`` holds their parameters and ``Assignment.mask`` their
state-dict keys, so the loop counts the training FLOPs of those layers only
(forward of the whole model, backward down to the first trained layer, see
:meth:`fedray.models.spec.ModelSpec.train_flops`) and upload bytes of what the
mask covers. Every dispatch records ``depth`` in the metrics table.

CLAMP / MA-CLAMP driver side (:class:`DepthPlanner`), per client:

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
  the telemetry of finished updates (:meth:`Method.observe`):
  ``telemetry["round_s"]`` is the predicted round time of the next round at
  the current depth (our choice: the last reported round time -- the depth
  it was measured at is the current one unless a change was just applied),
  ``telemetry["battery"]`` below ``low_battery`` suggests a smaller depth.
  A client with fewer than ``calibration_rounds`` observations is not
  stepped.

Server side:

* CLAMP: :func:`fedray.aggregation.rules.common_depth` -- only the layers
  every arrived client trained; BatchNorm statistics follow their layer.
* MA-CLAMP: :func:`fedray.aggregation.rules.layerwise_threshold` with
  ``rho`` and ``num_selected = |S|``; ``|S|`` is ``server.clients_per_round``
  (the loop selects that many each round when enough clients are available;
  at least the number of arrived updates), so dropped and late clients count
  in ``|S|`` as the rule requires. Batch-norm running statistics are averaged
  over all of S: MA-CLAMP masks also cover every BatchNorm buffer (frozen
  layers update their running statistics in train mode), so every arrived
  client sends them and they are averaged over all arrivals.
* FedPMT (fixed ``depth``) and FedDrop (depth uniform in ``1..L`` per
  dispatch, drawn from ``seeding.rng(seed, "mask", version, client)``):
  per-coordinate masked mean (:func:`fedray.aggregation.rules.masked_mean`),
  i.e. each layer averaged over the clients that trained it.

Local optimiser (Adam, lr 1e-3 in the published setting) is the ``train``
section's choice, not fixed here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedray import seeding
from fedray.aggregation import rules
from fedray.config import POS, UNIT, _f
from fedray.errors import ConfigError
from fedray.methods.base import Assignment, Method
from fedray.methods.registry import register
from fedray.pruning.depth import DepthState, depth_step, feddrop_depth, fedpmt_depth, personal_thresholds
from fedray.submodel.depth import depth_mask, depth_trainable
from fedray.submodel.masks import Mask
from fedray.update import Update

__all__ = ["shape_like", "DepthMethod", "DepthPlanner", "Clamp", "MaClamp", "FedPMT", "FedDrop"]


def shape_like(spec) -> dict[str, np.ndarray]:
    """Zero-memory stand-ins (read-only broadcast views) with the shapes of every
    state-dict key of ``spec``: enough to build masks without the parameters."""
    return {k: np.broadcast_to(np.zeros((), dtype=bool), tuple(shape)) for k, shape in spec.shapes.items()}


class DepthMethod(Method):
    """Base of the depth family: plans ``Assignment``s for a depth ``d``."""

    schedule = "sync"

    def __init__(self, cfg, spec=None):
        super().__init__(cfg, spec)
        if spec is None:
            raise ValueError(f"{self.name} needs the model spec")
        self.L = spec.L
        self.like = shape_like(spec)
        self.layers = [list(layer.keys) for layer in spec.layers]
        buffers = set(spec.buffer_keys)
        self.bn_stats = [k for layer in spec.layers for k in layer.bn_keys if k in buffers]
        self._masks: dict[int, Mask] = {}

    def mask_for(self, d: int) -> Mask:
        """The depth-``d`` mask (cached per depth)."""
        if d not in self._masks:
            self._masks[d] = depth_mask(self.spec, self.like, d)
        return self._masks[d]

    def depth_of(self, client_id: int, version: int) -> int:
        raise NotImplementedError

    def plan(self, client_id: int, version: int) -> Assignment:
        d = self.depth_of(int(client_id), int(version))
        return Assignment(client_id=int(client_id), trainable=depth_trainable(self.spec, d), mask=self.mask_for(d),
                          info=(("depth", d),))

    def aggregate(self, global_params, entries, version):
        return rules.masked_mean(global_params, [c for _, c in entries])


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


class DepthPlanner:
    """Per-client CLAMP depth controller, fed only by update telemetry."""

    def __init__(self, L: int, p: ClampParams):
        self.L, self.p = L, p
        self.d0 = min(p.initial_depth, L)
        self.states: dict[int, DepthState] = {}
        self.first: dict[int, list[float]] = {}  # each client's first observed round times
        self.pool: dict[int, float] = {}  # each client's first observed round time (federation reference)

    def depth(self, client_id: int) -> int:
        return self.states.get(client_id, DepthState(self.d0)).depth

    def thresholds(self, client_id: int) -> tuple[float, float]:
        ref = None if self.p.threshold_reference == "own" else float(np.median(list(self.pool.values())))
        return personal_thresholds(self.first[client_id], ref, margin=self.p.margin)

    def observe(self, client_id: int, telemetry: dict) -> DepthState:
        t = telemetry.get("round_s")
        state = self.states.get(client_id, DepthState(self.d0))
        if t is None or not np.isfinite(t) or t <= 0:
            return state
        first = self.first.setdefault(client_id, [])
        if len(first) < self.p.calibration_rounds:
            first.append(float(t))
            self.pool.setdefault(client_id, float(t))
            if len(first) < self.p.calibration_rounds:
                return state
        t_low, t_high = self.thresholds(client_id)
        state = depth_step(state, float(t), t_low, t_high, self.L, battery_level=telemetry.get("battery"),
                           low_battery=self.p.low_battery, patience=self.p.patience)
        self.states[client_id] = state
        return state


class _ClampBase(DepthMethod):
    Params = ClampParams

    def __init__(self, cfg, spec=None):
        super().__init__(cfg, spec)
        self.planner = DepthPlanner(self.L, self.params)

    def depth_of(self, client_id: int, version: int) -> int:
        return self.planner.depth(client_id)

    def observe(self, header: Update) -> None:
        self.planner.observe(int(header.client_id), header.telemetry or {})


@register
class Clamp(_ClampBase):
    """CLAMP: adaptive depth per client; the server averages only the common depth."""

    name = "clamp"

    def aggregate(self, global_params, entries, version):
        return rules.common_depth(global_params, [c for _, c in entries], self.layers)


@register
class MaClamp(_ClampBase):
    """MA-CLAMP: adaptive depth per client; each layer is averaged over the clients that
    trained it when they are at least ``max(1, floor(rho |S|))``; BN statistics over all of S."""

    name = "ma_clamp"

    @dataclass(frozen=True)
    class Params(ClampParams):
        rho: float = _f(0.5, check=UNIT, doc="participation threshold: a layer needs max(1, floor(rho |S|)) trainers")

    def mask_for(self, d: int) -> Mask:
        if d not in self._masks:
            m = dict(depth_mask(self.spec, self.like, d))
            for k in self.bn_stats:  # every client reports the running statistics of all its BN layers
                m.setdefault(k, np.ones(np.shape(self.like[k]), dtype=bool))
            self._masks[d] = m
        return self._masks[d]

    def aggregate(self, global_params, entries, version):
        contribs = [c for _, c in entries]
        selected = max(len(contribs), self.cfg.server.clients_per_round)
        return rules.layerwise_threshold(global_params, contribs, self.layers, self.params.rho,
                                         num_selected=selected, bn_keys=self.bn_stats)


# ------------------------------------------------------------------ FedPMT / FedDrop


@register
class FedPMT(DepthMethod):
    """FedPMT: every client trains the same fixed number of last layers."""

    name = "fedpmt"
    feedback = False

    @dataclass(frozen=True)
    class Params:
        depth: int = _f(1, check=POS, doc="number of last layers every client trains")

    def __init__(self, cfg, spec=None):
        super().__init__(cfg, spec)
        if self.params.depth > self.L:
            raise ConfigError("method.depth", f"must be <= the model's {self.L} layers, got {self.params.depth}")

    def depth_of(self, client_id: int, version: int) -> int:
        return fedpmt_depth(self.L, self.params.depth)


@register
class FedDrop(DepthMethod):
    """FedDrop: a depth drawn uniformly from ``1..L`` for every dispatch."""

    name = "feddrop"
    feedback = False

    def depth_of(self, client_id: int, version: int) -> int:
        return feddrop_depth(seeding.rng(self.cfg.seed, "mask", version, client_id), self.L)

