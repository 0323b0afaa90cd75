"""Adaptive masked buffering: telemetry-sized, curvature-scored width submodels, buffered asynchronously.

A composition of existing pieces (nothing here is new math):

* **Width from telemetry** (PR-FL's Stage 1, :mod:`fedray.pruning.progressive`, applied to
  width instead of an unstructured mask): every finished update pushes the device's reported
  time (:func:`~fedray.pruning.progressive.observed_time`; ``time_source: round`` -- the
  default, the whole round, since a width changes compute as well as bytes -- or ``comm``,
  PR-FL's communication time) into the client's FIFO of its last ``history`` times
  (:class:`~fedray.pruning.progressive.RoundTimeFifo`). A client's keep ratio is
  ``r_i = max(min_j tbar_j / tbar_i, rho_min)``
  (:func:`~fedray.pruning.progressive.allocate_densities` over the clients observed so far),
  rounded *up* to a multiple of ``ratio_step`` (so at most ``1 / ratio_step`` distinct
  compact models exist; ``ratio_step: 0`` keeps the exact value). A client not observed yet
  starts from CA-HFP's speed-rank ratio ``max(ratios[rank group], rho_min)``
  (:func:`fedray.methods.heterofl.speed_ratios`, the fastest group first).
* **Curvature-scored, physically small submodels** (CA-HFP, :mod:`fedray.methods.cahfp`):
  a client with ``r_i < 1`` scores every channel by the empirical Fisher of its own
  ``score_batches`` mini-batches on the downloaded full model, keeps the top ``ceil(r_i C_l)``
  channels of every prunable layer, trains that compact model and sends it with its mask and
  the kept indices (:class:`~fedray.methods.cahfp.CAHFPClient`,
  :func:`~fedray.methods.cahfp.scored_submodel`). A client with ``r_i = 1`` trains the full
  model (no scoring). ``score_every: T`` (default 1: every dispatch scores) keeps a client's
  channel set on the device between scorings, as CA-HFP's ``score_every``: it scores again at its
  first dispatch ``T`` or more model versions after its last scoring, or when its keep ratio
  changed (the stored set has the old sizes); in between it trains the stored set, downloads
  only that compact model and sends no indices.
* **Buffered asynchronous masked aggregation** (FedBuff's buffer of deltas with MaskFedAvg's
  rule): ``concurrency`` clients in flight, each sending ``delta_i = theta_i - theta_{v_i}`` on
  its mask (``send="delta"``, as FedBuff: a stale client's update is applied to the current
  model instead of pulling it back to the version it started from); every ``buffer_size``
  arrivals ``theta <- theta + eta_g D`` with ``D`` the masked mean of the buffered deltas
  weighted by ``n_i s(v - v_i)`` (:func:`fedray.aggregation.rules.masked_delta_mean`: per
  coordinate over the clients whose mask covers it, 0 where none does; ``s`` from
  ``staleness`` / ``a`` / ``b``, default PR-FL's ``(v - v_i + 1)^-0.6``,
  :mod:`fedray.aggregation.staleness`).
* **Recovery to the full model** (PR-FL's Stage 2): after every evaluation the plateau
  monitor (patience ``patience`` evaluations, gain ``min_delta``) may raise the floor
  ``rho_min <- min(1, rho_min + delta_rho)``
  (:func:`~fedray.pruning.progressive.recover_on_plateau`); once ``rho_min = 1`` every client
  trains the full model and the method is FedBuff with a masked (then plain) mean. Training
  does not end on a later plateau (the run ends at ``server.rounds`` / ``server.max_virtual_s``).

Costs come from the submodel (one cost model): the compact model's training FLOPs and bytes,
the scoring pass as extra FLOPs, the full model downloaded when the client scores (it scores on
it), else only the compact model.
Every dispatch records ``keep_ratio`` and ``scored``. The planner's state (:class:`AdaptivePlan`: FIFOs, floor,
plateau monitor, recoveries) is checkpointed; the server keeps none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedray.aggregation import rules
from fedray.aggregation.staleness import STALENESS
from fedray.errors import ConfigError
from fedray.methods.async_common import AsyncParams, AsyncPlanner, AsyncServer
from fedray.methods.base import Assignment, Method
from fedray.methods.cahfp import CAHFPClient, compact_widths, reused_submodel, scored_submodel
from fedray.methods.heterofl import speed_ratios
from fedray.methods.registry import register
from fedray.params import NONNEG, POS, UNIT, UNIT_POS, _f
from fedray.pruning.progressive import Plateau, RoundTimeFifo, allocate_densities, observed_time, recover_on_plateau
from fedray.update import Update

__all__ = ["AdaptiveMaskedBuff", "AdaptivePlan", "quantize_up"]


def quantize_up(ratio: float, step: float) -> float:
    """``ratio`` rounded up to a multiple of ``step`` (at most 1; ``step = 0``: unchanged).
    The quotient is rounded to 9 decimals first, so 0.3 / 0.1 stays 3, not 4."""
    if step <= 0:
        return min(1.0, float(ratio))
    return min(1.0, round(math.ceil(round(float(ratio) / step, 9)) * step, 12))


@dataclass
class AdaptivePlan:
    """The planner's state: every client's FIFO of observed times, the floor ``rho_min``,
    the plateau monitor, the number of recovery steps taken and, per client, the model version
    and keep ratio of its last scoring (``score_every > 1``)."""

    fifo: RoundTimeFifo
    rho_min: float
    plateau: Plateau
    recoveries: int = 0
    scored: dict = field(default_factory=dict)


class AdaptivePlanner(AsyncPlanner):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.start_ratio = speed_ratios(ctx.profiles.column("speed"), self.params.ratios)
        self._subs: dict = {}  # (client, ratio, scores) -> its submodel: one object, costed once by the dispatcher

    def init_state(self):
        p = self.params
        return AdaptivePlan(fifo=RoundTimeFifo(p.history), rho_min=float(p.rho_min),
                            plateau=Plateau(p.patience, p.min_delta))

    def observe(self, header: Update) -> None:
        t = observed_time(header.telemetry, self.params.time_source)
        if t is not None:
            self.state.fifo = self.state.fifo.push(int(header.client_id), t)

    def on_eval(self, metric: float, loss: float) -> None:
        if not np.isfinite(metric):
            return
        s = self.state
        before = s.rho_min
        s.plateau, s.rho_min, _ = recover_on_plateau(s.plateau, before, float(metric), self.params.delta_rho)
        s.recoveries += int(s.rho_min > before)

    def ratio(self, client_id: int) -> float:
        """``r_i`` now: from the observed times, else the starting ratio; never below the floor."""
        c, s = int(client_id), self.state
        means = s.fifo.means()
        if c in means:
            r = allocate_densities(means, s.rho_min)[c]
        else:
            r = max(float(self.start_ratio[c]), s.rho_min)
        return quantize_up(r, self.params.ratio_step)

    def plan(self, client_id: int, version: int) -> Assignment:
        c = int(client_id)
        r = self.ratio(c)
        if r >= 1.0:
            return Assignment(client_id=c, send="delta", info=(("keep_ratio", 1.0), ("scored", False)))
        every, client = self.params.score_every, (("keep_ratio", r),)
        score = True
        if every > 1:
            last = self.state.scored.get(c)
            score = last is None or last[1] != r or version - last[0] >= every
            if score:
                self.state.scored[c] = (int(version), r)
            client += (("score", score), ("keep_set", True))
        sub = self._subs.get((c, r, score))
        if sub is None:
            sub = self._subs[(c, r, score)] = (scored_submodel(self.ctx, c, r, self.params.score_batches) if score
                                               else reused_submodel(self.ctx, compact_widths(self.ctx.spec, r)))
        return Assignment(client_id=c, submodel=sub, send="delta", client=client, info=(("keep_ratio", r), ("scored", score)))


class AdaptiveServer(AsyncServer):
    def trigger(self, pending: int) -> bool:
        return pending >= self.params.buffer_size

    def aggregate(self, global_params, entries, record):
        contribs = [rules.Contribution(e.contribution.values, e.contribution.mask, self.update_weight(e, record.version))
                    for e in entries]
        return rules.masked_delta_mean(global_params, contribs, self.params.eta_g)


@register
class AdaptiveMaskedBuff(Method):
    """Telemetry-sized curvature-scored width submodels, FedBuff-style buffered masked mean with
    staleness weights, recovery of the width floor on a plateau."""

    name = "adaptive_masked_buff"
    paper = ("composed here from PR-FL (time-driven allocation, recovery), CA-HFP (curvature-scored compact "
             "submodels) and FedBuff (buffered asynchronous aggregation) with MaskFedAvg's masked mean")
    schedule = "async"
    needs_spec = True
    Planner = AdaptivePlanner
    Server = AdaptiveServer
    Client = CAHFPClient
    client_state = True  # the channel set between scorings (score_every > 1)

    @classmethod
    def updates_per_aggregation(cls, cfg) -> int:
        return cfg.method.params.buffer_size

    @dataclass(frozen=True)
    class Params(AsyncParams):
        staleness: str = _f("prfl", choices=tuple(STALENESS), doc="staleness weight s(tau) (default (tau + 1)^-0.6)")
        buffer_size: int = _f(5, check=POS, doc="K: updates per aggregation")
        eta_g: float = _f(1.0, check=POS, doc="server learning rate: theta <- theta + eta_g * masked mean of deltas")
        ratios: tuple[float, ...] = _f((1.0, 0.8, 0.6, 0.4), check=UNIT_POS,
                                       doc="starting keep ratios by speed rank (fastest group first), until observed")
        rho_min: float = _f(0.25, check=UNIT, doc="initial floor of the keep ratio")
        delta_rho: float = _f(0.25, check=POS, doc="recovery step of the floor on a plateau")
        patience: int = _f(5, check=POS, doc="evaluations without improvement that make a plateau")
        min_delta: float = _f(0.0, check=NONNEG, doc="accuracy gain that counts as an improvement")
        history: int = _f(10, check=POS, doc="observed times kept per client (FIFO length)")
        time_source: str = _f("round", choices=("round", "comm"),
                              doc="times that size the widths: whole rounds or communication (PR-FL's)")
        ratio_step: float = _f(0.1, check=UNIT, doc="keep ratios rounded up to a multiple of this (0: exact)")
        score_batches: int = _f(4, check=POS, doc="local mini-batches used for the curvature scores")
        score_every: int = _f(1, check=POS, doc="T: a client rescores its channels once T versions passed since its "
                                                "last scoring (or its keep ratio changed) and keeps its set in between")

        def __post_init__(self):
            super().__post_init__()
            if not self.ratios:
                raise ConfigError("method.ratios", "needs at least one keep ratio")
