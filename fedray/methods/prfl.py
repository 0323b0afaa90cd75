"""PR-FL: pruning and recovery with buffered asynchronous aggregation.

Composition of :mod:`fedray.pruning.progressive` (FIFOs, densities, plateau,
importance, nested masks, residual split) and
:func:`fedray.aggregation.rules.masked_mean` / :func:`~fedray.aggregation.rules.mix`.

Schedule ``interval``: ``concurrency`` clients in flight; every
``interval_s`` virtual seconds the aggregator hands the updates that arrived
since the last tick to :meth:`PRFL.aggregate` (an interval without arrivals
publishes no version).

Server side (the aggregator's instance), state kept in the method and
checkpointed with it (:meth:`PRFL.state_dict`):

* the per-client cache ``B[i] = (W_i, mask_i, n_i, v_i)``: each newly
  arrived update replaces its client's entry (newest wins), so one
  aggregation merges the interval's arrivals into the cache and then averages
  over the *whole* cache;
* MaskFedAvg over the cache: ``s_i = (v - v_i + 1)^-a`` (``v`` = current
  version, :func:`fedray.aggregation.staleness.prfl`), ``p_i = s_i / sum s_j``,
  ``W_new = masked_mean`` with weights ``p_i n_i`` (``acc_w / acc_m`` where
  ``acc_m > 0``, else the old value), then
  ``theta <- (1 - eta_g) theta + eta_g W_new``;
* importance: every update reports its accumulated squared gradients
  (``Assignment.collect_sq_grads``; ``payload.aux["sq_grads/<key>"]``, dense
  over the tensors its mask touches). Each upload is divided by its total
  over the prunable keys and summed into one accumulator; every ``I``
  aggregations :func:`fedray.pruning.progressive.importance_scores` of that
  single accumulated upload is published and the accumulator restarts. This
  equals ``importance_scores`` of the individual uploads divided by their
  number -- the same ranking, hence the same masks -- without keeping every
  upload. Before the first recompute the scores are ``|w|`` of the initial
  model (published before the first dispatch, with the model's dtypes).

Driver side (the loop's instance):

* ``observe``: each client's round time goes into its FIFO of the last ``I``
  times (:class:`~fedray.pruning.progressive.RoundTimeFifo`);
* ``on_eval``: the plateau monitor (patience ``patience`` evaluations); on a
  plateau ``rho_min <- min(1, rho_min + delta_rho)`` and a replan;
* replan -- whenever new scores arrive (every ``I`` aggregations) and at
  every recovery step: ``rho_i = max(min_j tbar_j / tbar_i, rho_min)`` for
  the clients with observed round times; a client not observed yet keeps
  ``max(densities[i mod len], rho_min)`` (the starting densities). Densities
  and masks change together (our choice), so that a mask always matches the
  density it was cut for. Masks: :func:`~fedray.pruning.progressive.nested_masks`
  over the prunable keys (weights and biases; floor ``layer_floor`` per
  tensor) for the distinct densities; BatchNorm parameters and buffers are in
  every mask, dense;
* distribution, "residual split": the distinct masks sorted by density are
  split with :func:`~fedray.pruning.progressive.residual_split`; a client of
  density rank ``r`` downloads pieces ``0..r``, counted by
  :func:`~fedray.pruning.progressive.residual_bytes` (``Assignment.bytes_down``);
  the upload is the masked model plus the dense squared gradients (counted by
  the loop);
* every dispatch records ``density`` (covered fraction of the prunable
  coordinates).

Clients send their trained model (``send="model"``) under their mask;
coordinates outside it are restored after every optimiser step by the
trainer.

Not modelled: the published rule ends training once every ``rho_i = 1`` and
a last plateau follows; fedray runs stop at ``server.rounds`` or
``server.max_virtual_s``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fedray.aggregation import rules, staleness
from fedray.config import NONNEG, POS, UNIT, UNIT_POS, _f
from fedray.errors import ConfigError
from fedray.methods.base import Assignment, Method
from fedray.methods.registry import register
from fedray.pruning.magnitude import prunable_keys
from fedray.pruning.progressive import (Plateau, RoundTimeFifo, allocate_densities, importance_scores, nested_masks,
                                        plateau_update, recovery_step, residual_bytes, residual_split)
from fedray.submodel.masks import Mask, density
from fedray.update import Update

SQ_PREFIX = "sq_grads/"


@register
class PRFL(Method):
    name = "prfl"
    schedule = "interval"

    @dataclass(frozen=True)
    class Params:
        interval_s: float = _f(5.0, check=POS, doc="virtual seconds between aggregations")
        concurrency: int | None = _f(None, check=POS, doc="clients in flight (null: server.clients_per_round)")
        a: float = _f(0.6, check=NONNEG, doc="staleness exponent: s_i = (v - v_i + 1)^-a")
        eta_g: float = _f(1.0, check=UNIT_POS, doc="server mixing: theta <- (1 - eta_g) theta + eta_g W_new")
        densities: tuple[float, ...] = _f((1.0, 1.0, 0.6, 0.6, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1), check=UNIT_POS,
                                          doc="starting density of client i: densities[i mod len]")
        rho_min: float = _f(0.1, check=UNIT, doc="initial density floor")
        delta_rho: float = _f(0.2, check=POS, doc="recovery step of the floor")
        patience: int = _f(5, check=POS, doc="evaluations without improvement that make a plateau")
        min_delta: float = _f(0.0, check=NONNEG, doc="accuracy gain that counts as an improvement")
        recompute_every: int = _f(50, check=POS, doc="I: aggregations between mask recomputations (and FIFO length)")
        layer_floor: float = _f(0.05, check=UNIT, doc="fraction of every tensor always kept")

    def __init__(self, cfg, spec=None):
        super().__init__(cfg, spec)
        if spec is None:
            raise ValueError("prfl needs the model spec")
        if not self.params.densities:
            raise ConfigError("method.densities", "needs at least one density")
        self.keys = list(prunable_keys(spec))
        # ---- server side
        self.cache: dict[int, tuple[dict, Mask, float, int]] = {}
        self.sq_acc: dict[str, np.ndarray] = {}
        self.uploads = 0
        self.aggregations = 0
        self.initial_published = False
        self._fresh: dict | None = None
        # ---- driver side
        p = self.params
        self.fifo = RoundTimeFifo(p.recompute_every)
        self.rho_min = float(p.rho_min)
        self.done = False  # Stage 2 ended: all densities 1 and a last plateau
        self.plateau = Plateau(p.patience, p.min_delta)
        self.scores: dict[str, np.ndarray] | None = None
        self.like: dict[str, np.ndarray] | None = None
        self.rho: dict[int, float] = {}
        self.plans: dict[float, tuple[Mask, int, float]] = {}  # density -> (mask, download bytes, actual density)

    # ================================================================ driver side
    def concurrency(self) -> int:
        c = self.params.concurrency
        return int(c) if c is not None else self.cfg.server.clients_per_round

    def interval_s(self) -> float:
        return float(self.params.interval_s)

    def start_density(self, client_id: int) -> float:
        d = self.params.densities
        return max(float(d[client_id % len(d)]), self.rho_min)

    def observe(self, header: Update) -> None:
        t = (header.telemetry or {}).get("round_s")
        if t is not None and np.isfinite(t) and t > 0:
            self.fifo = self.fifo.push(int(header.client_id), float(t))

    def on_eval(self, accuracy: float, loss: float) -> None:
        if not np.isfinite(accuracy):
            return
        self.plateau, plateaued = plateau_update(self.plateau, float(accuracy))
        if plateaued and self.rho_min < 1.0:
            self.rho_min = recovery_step(self.rho_min, self.params.delta_rho)
            self.replan()
        elif plateaued:  # every density is 1 and the accuracy plateaued once more: training ends
            self.done = True

    def finished(self) -> bool:
        return self.done

    def sync_from_server(self, state: Mapping) -> None:
        if "dtypes" in state:
            self.like = {k: np.broadcast_to(np.zeros((), dtype=np.dtype(dt)), tuple(self.spec.shapes[k]))
                         for k, dt in state["dtypes"].items()}
        if "scores" in state:
            self.scores = {k: np.asarray(v, dtype=np.float64) for k, v in state["scores"].items()}
            self.replan()

    def densities(self) -> dict[int, float]:
        """Current ``rho_i`` of every client (Stage 1 with the floor ``rho_min``)."""
        out = {c: self.start_density(c) for c in range(self.cfg.data.num_clients)}
        means = self.fifo.means()
        if means:
            out.update(allocate_densities(means, self.rho_min))
        return out

    def replan(self) -> None:
        """Recompute densities, nested masks and residual-split bytes (needs scores and dtypes)."""
        if self.scores is None or self.like is None:
            return
        self.rho = self.densities()
        levels = sorted(set(self.rho.values()))
        cut = nested_masks(self.scores, levels, layer_floor=self.params.layer_floor, keys=self.keys)
        others = [k for k in self.spec.shapes if k not in set(self.keys)]
        full = []
        for m in cut:
            m = dict(m)
            for k in others:  # BatchNorm parameters / buffers: never pruned coordinate-wise
                m[k] = np.ones(tuple(self.spec.shapes[k]), dtype=bool)
            full.append(m)
        down = residual_bytes(self.like, residual_split(full))
        self.plans = {lvl: (m, int(b), float(density(m, self.like, self.keys)))
                      for lvl, m, b in zip(levels, full, down)}

    def plan(self, client_id: int, version: int) -> Assignment:
        c = int(client_id)
        if not self.plans:  # no scores yet (the loop publishes them before the first dispatch)
            return Assignment(client_id=c, collect_sq_grads=True, info=(("density", 1.0),))
        mask, down, actual = self.plans[self.rho[c]]
        return Assignment(client_id=c, mask=mask, download_mask=mask, bytes_down=down, collect_sq_grads=True,
                          info=(("density", actual),))

    # ================================================================ server side
    def trigger(self, pending: int) -> bool:
        return False  # only the interval tick aggregates

    def _accumulate(self, header: Update) -> None:
        aux = header.payload.aux if header.payload is not None else {}
        sq = {k[len(SQ_PREFIX):]: np.asarray(v, dtype=np.float64) for k, v in aux.items() if k.startswith(SQ_PREFIX)}
        sq = {k: v for k, v in sq.items() if k in set(self.keys)}
        total = sum(float(v.sum()) for v in sq.values())
        if not (np.isfinite(total) and total > 0):
            return
        for k, v in sq.items():
            acc = self.sq_acc.get(k)
            self.sq_acc[k] = v / total if acc is None else acc + v / total
        self.uploads += 1

    def aggregate(self, global_params, entries, version):
        for h, c in entries:
            self.cache[int(h.client_id)] = (c.values, c.mask, float(c.weight), int(h.base_version))
            self._accumulate(h)
        clients = sorted(self.cache)
        s = np.array([staleness.prfl(version, self.cache[i][3], self.params.a) for i in clients])
        p = s / s.sum()
        contribs = [rules.Contribution(self.cache[i][0], self.cache[i][1], float(pi) * self.cache[i][2])
                    for i, pi in zip(clients, p)]
        new = rules.mix(global_params, rules.masked_mean(global_params, contribs), self.params.eta_g)
        self.aggregations += 1
        if self.aggregations % self.params.recompute_every == 0:
            uploads = [self.sq_acc] if self.uploads else []
            self._fresh = {"scores": self._scores(uploads, new)}
            self.sq_acc, self.uploads = {}, 0
        return new

    def _scores(self, uploads, params) -> dict[str, np.ndarray]:
        sc = importance_scores(uploads, params, self.keys)
        return {k: v.astype(np.float32) for k, v in sc.items()}

    def public_state(self, global_params, version):
        if not self.initial_published:
            self.initial_published = True
            return {"dtypes": {k: str(np.asarray(v).dtype) for k, v in global_params.items()},
                    "scores": self._scores([], global_params)}
        fresh, self._fresh = self._fresh, None
        return fresh

    def state_dict(self):
        return {"cache": self.cache, "sq_acc": self.sq_acc, "uploads": self.uploads,
                "aggregations": self.aggregations, "initial_published": self.initial_published}

    def load_state_dict(self, state):
        self.cache = dict(state["cache"])
        self.sq_acc = dict(state["sq_acc"])
        self.uploads = int(state["uploads"])
        self.aggregations = int(state["aggregations"])
        self.initial_published = bool(state["initial_published"])
