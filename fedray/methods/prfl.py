"""PR-FL: pruning and recovery with buffered asynchronous aggregation.

Composition of :mod:`fedray.pruning.progressive` (FIFOs, densities, plateau,
importance, nested masks, residual split) and
:func:`fedray.aggregation.rules.masked_mean` / :func:`~fedray.aggregation.rules.mix`.

Schedule ``interval``: ``concurrency`` clients in flight; every
``interval_s`` virtual seconds the aggregator hands the updates that arrived
since the last tick to the server (an interval without arrivals publishes no
version).

Server (its state, :class:`PRFLServerState`, is checkpointed):

* the per-client cache ``B[i] = (W_i, mask_i, n_i, v_i)``: each newly
  arrived update replaces its client's entry (newest wins), so one
  aggregation merges the interval's arrivals into the cache and then averages
  over the *whole* cache;
* MaskFedAvg over the cache: ``s_i = (v - v_i + 1)^-a`` (``v`` = current
  version, :func:`fedray.aggregation.staleness.prfl`), ``p_i = s_i / sum s_j``,
  ``W_new = masked_mean`` with weights ``p_i n_i`` (``acc_w / acc_m`` where
  ``acc_m > 0``, else the old value), then
  ``theta <- (1 - eta_g) theta + eta_g W_new``;
* importance: every update reports its accumulated squared gradients *over its
  own mask* (extra arrays ``sq_grads/<key>``, one value per covered coordinate of
  each prunable key its mask covers; the server sees them at full shape, zeros
  elsewhere). Each upload is divided by its total over the prunable keys and
  summed into one accumulator; every ``I`` aggregations
  :func:`fedray.pruning.progressive.importance_scores` of that single
  accumulated upload is sent to the planner and the accumulator restarts. This
  equals ``importance_scores`` of the individual uploads divided by their
  number -- the same ranking, hence the same masks -- without keeping every
  upload. Before the first recompute the scores are ``|w|`` of the initial
  model (sent before the first dispatch, with the model's dtypes).

Planner (its state, :class:`PRFLPlan`, is checkpointed):

* ``observe``: each client's *communication* time (download + upload, as the
  device reports it; ``time_source: round`` uses the whole round time) goes
  into its FIFO of the last ``I`` times
  (:class:`~fedray.pruning.progressive.RoundTimeFifo`);
* recovery: on the server's ``plateau`` message ``rho_min <- min(1, rho_min + delta_rho)``
  and a replan; with every density at 1, the next plateau ends training;
* replan -- whenever new scores arrive (every ``I`` aggregations) and at
  every recovery step: ``rho_i = max(min_j tbar_j / tbar_i, rho_min)`` for
  the clients with observed times; a client not observed yet keeps
  ``max(densities[i mod len], rho_min)`` (the starting densities). Densities
  and masks change together (our choice), so that a mask always matches the
  density it was cut for. Masks: :func:`~fedray.pruning.progressive.nested_masks`
  over the prunable keys (weights and biases; floor ``layer_floor`` per
  tensor) for the distinct densities; BatchNorm parameters and buffers are in
  every mask, dense;
* distribution, "residual split": the distinct masks sorted by density are
  split with :func:`~fedray.pruning.progressive.residual_split`; a client of
  density rank ``r`` downloads pieces ``0..r`` (its bytes: their sum, a little
  more than its own mask's encoding). The server sends each piece of a model
  version once to every client that needs it, so its egress per version is the
  sum of the distinct pieces, not of every client's submodel
  (``server_egress`` in the summary);
* every dispatch records ``density`` (covered fraction of the prunable
  coordinates).

Recovery (Stage 2), on the server: the plateau monitor sees every evaluation of the global
model (``on_eval``; patience ``patience`` evaluations, as the authors count checks) and keeps
the best model so far. On a plateau the next aggregation starts from that best model (the
authors reload it) instead of the current one, with the cache emptied (our choice: its entries
were trained from the models being discarded; the updates still in flight arrive with their
staleness weights), and tells the planner (``plateau`` message) to raise ``rho_min``.

Clients send their trained model (``send="model"``) under their mask;
coordinates outside it are restored after every optimiser step by the
trainer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from fedray.aggregation import rules, staleness
from fedray.errors import ConfigError
from fedray.methods.base import Aggregation, Assignment, ClientAlgorithm, Method, Planner, Server
from fedray.methods.registry import register
from fedray.params import NONNEG, POS, UNIT, UNIT_POS, _f
from fedray.pruning.magnitude import prunable_keys
from fedray.pruning.progressive import (Plateau, RoundTimeFifo, allocate_densities, importance_scores, nested_masks,
                                        observed_time, plateau_update, recovery_step, residual_split)
from fedray.submodel.masks import density
from fedray.submodel.submodel import Extra, Submodel
from fedray.update import Update

SQ_PREFIX = "sq_grads/"


@dataclass(frozen=True)
class PRFLParams:
    interval_s: float = _f(5.0, check=POS, doc="virtual seconds between aggregations")
    concurrency: int | None = _f(None, check=POS, doc="clients in flight (null: server.clients_per_round)")
    a: float = _f(0.6, check=NONNEG, doc="staleness exponent: s_i = (v - v_i + 1)^-a")
    eta_g: float = _f(1.0, check=UNIT_POS, doc="server mixing: theta <- (1 - eta_g) theta + eta_g W_new")
    densities: tuple[float, ...] = _f((1.0, 1.0, 0.6, 0.6, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1), check=UNIT_POS,
                                      doc="starting density of client i: densities[i mod len]")
    rho_min: float = _f(0.1, check=UNIT, doc="initial density floor")
    delta_rho: float = _f(0.2, check=POS, doc="recovery step of the floor")
    patience: int = _f(10, check=POS, doc="evaluations (checks) without improvement that make a plateau")
    min_delta: float = _f(0.0, check=NONNEG, doc="accuracy gain that counts as an improvement")
    recompute_every: int = _f(50, check=POS, doc="I: aggregations between mask recomputations (and FIFO length)")
    layer_floor: float = _f(0.05, check=UNIT, doc="fraction of every tensor always kept")
    time_source: str = _f("comm", choices=("comm", "round"),
                          doc="times that allocate densities: communication (the paper's) or whole rounds")

    def __post_init__(self):
        if not self.densities:
            raise ConfigError("method.densities", "needs at least one density")


# ================================================================ planner


@dataclass
class PRFLPlan:
    """The planner's state: round-time FIFOs, the density floor, the latest scores, the
    model's dtypes, every client's density and the replan count."""

    fifo: RoundTimeFifo
    rho_min: float
    done: bool = False  # Stage 2 ended: all densities 1 and a last plateau
    scores: dict | None = None
    dtypes: dict | None = None
    rho: dict = field(default_factory=dict)
    replans: int = 0


class PRFLPlanner(Planner):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.keys = list(prunable_keys(ctx.spec))
        self._plans: dict[float, tuple[Submodel, float]] = {}  # density -> (submodel, actual density)
        self._full = Submodel(extras=self._extras(None))

    def init_state(self):
        p = self.params
        return PRFLPlan(fifo=RoundTimeFifo(p.recompute_every), rho_min=float(p.rho_min))

    def concurrency(self) -> int:
        c = self.params.concurrency
        return int(c) if c is not None else self.ctx.cfg.server.clients_per_round

    def interval_s(self) -> float:
        return float(self.params.interval_s)

    def start_density(self, client_id: int) -> float:
        d = self.params.densities
        return max(float(d[client_id % len(d)]), self.state.rho_min)

    def observe(self, header: Update) -> None:
        t = observed_time(header.telemetry, self.params.time_source)
        if t is not None:
            self.state.fifo = self.state.fifo.push(int(header.client_id), t)

    def recover(self) -> None:
        """A plateau (the server's message): raise the floor and replan, or end training."""
        s = self.state
        if s.rho_min < 1.0:
            s.rho_min = recovery_step(s.rho_min, self.params.delta_rho)
            self.replan()
        else:  # every density is 1 and the accuracy plateaued once more: training ends
            s.done = True

    def finished(self) -> bool:
        return self.state.done

    def receive(self, message: Mapping) -> None:
        if "dtypes" in message:
            self.state.dtypes = dict(message["dtypes"])
        if "scores" in message:
            self.state.scores = {k: np.asarray(v, dtype=np.float64) for k, v in message["scores"].items()}
            self.replan()
        if message.get("plateau"):
            self.recover()

    def densities(self) -> dict[int, float]:
        """Current ``rho_i`` of every client (Stage 1 with the floor ``rho_min``)."""
        out = {c: self.start_density(c) for c in range(self.ctx.num_clients)}
        means = self.state.fifo.means()
        if means:
            out.update(allocate_densities(means, self.state.rho_min))
        return out

    def _like(self) -> dict:
        shapes = self.ctx.spec.shapes
        return {k: np.broadcast_to(np.zeros((), dtype=np.dtype(dt)), tuple(shapes[k]))
                for k, dt in self.state.dtypes.items()}

    def _extras(self, mask) -> tuple[Extra, ...]:
        """Squared gradients over the mask, one array per prunable key it covers."""
        like = self.ctx.model.like
        return tuple(Extra(SQ_PREFIX + k, dtype=str(like[k].dtype), over=k) for k in self.keys
                     if mask is None or (k in mask and mask[k].any()))

    def replan(self, count: bool = True) -> None:
        """Recompute densities, nested masks and the residual-split pieces (needs scores and dtypes)."""
        s = self.state
        if s.scores is None or s.dtypes is None:
            return
        if count:
            s.replans += 1
        s.rho = self.densities()
        self._rebuild()

    def _rebuild(self) -> None:
        s, spec = self.state, self.ctx.spec
        levels = sorted(set(s.rho.values()))
        cut = nested_masks(s.scores, levels, layer_floor=self.params.layer_floor, keys=self.keys)
        others = [k for k in spec.shapes if k not in set(self.keys)]
        full = []
        for m in cut:
            m = dict(m)
            for k in others:  # BatchNorm parameters / buffers: never pruned coordinate-wise
                m[k] = np.ones(tuple(spec.shapes[k]), dtype=bool)
            full.append(m)
        piece_bytes = [self.ctx.channel.mask_nbytes(p) for p in residual_split(full)]
        pieces = tuple(((s.replans, j), n) for j, n in enumerate(piece_bytes))
        like = self._like()
        self._plans = {lvl: (Submodel(mask=m, download=m, pieces=pieces[:r + 1], extras=self._extras(m)),
                             float(density(m, like, self.keys)))
                       for r, (lvl, m) in enumerate(zip(levels, full))}

    def plan(self, client_id: int, version: int) -> Assignment:
        c = int(client_id)
        if not self._plans:  # no scores yet (the server sends them before the first dispatch)
            return Assignment(client_id=c, submodel=self._full, info=(("density", 1.0),))
        sub, actual = self._plans[self.state.rho[c]]
        return Assignment(client_id=c, submodel=sub, info=(("density", actual),))

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if self.state.scores is not None and self.state.dtypes is not None and self.state.rho:
            self._rebuild()


# ================================================================ server


@dataclass
class PRFLServerState:
    plateau: Plateau
    cache: dict = field(default_factory=dict)  # client -> (values, mask, n, base version)
    sq_acc: dict = field(default_factory=dict)
    uploads: int = 0
    aggregations: int = 0
    best: dict | None = None  # the best global model so far (by the primary metric)
    reload: bool = False  # a plateau: the next aggregation starts from ``best``


class PRFLServer(Server):
    State = PRFLServerState

    def __init__(self, ctx):
        super().__init__(ctx)
        self.keys = list(prunable_keys(ctx.spec))

    def init_state(self):
        return PRFLServerState(plateau=Plateau(self.params.patience, self.params.min_delta))

    def on_eval(self, params, metric: float) -> None:
        st = self.state
        if not np.isfinite(metric):
            return
        before = st.plateau.best
        st.plateau, plateaued = plateau_update(st.plateau, metric)
        if st.plateau.best > before:  # an improvement: the best model so far
            st.best = {k: np.array(v, copy=True) for k, v in params.items()}
        st.reload = st.reload or plateaued

    def _accumulate(self, extras: Mapping[str, np.ndarray]) -> None:
        st = self.state
        keys = set(self.keys)
        sq = {k[len(SQ_PREFIX):]: np.asarray(v, dtype=np.float64) for k, v in extras.items()
              if k.startswith(SQ_PREFIX) and k[len(SQ_PREFIX):] in keys}
        total = sum(float(v.sum()) for v in sq.values())
        if not (np.isfinite(total) and total > 0):
            return
        for k, v in sq.items():
            acc = st.sq_acc.get(k)
            st.sq_acc[k] = v / total if acc is None else acc + v / total
        st.uploads += 1

    def _scores(self, uploads, params) -> dict[str, np.ndarray]:
        sc = importance_scores(uploads, params, self.keys)
        return {k: v.astype(np.float32) for k, v in sc.items()}

    def start(self, global_params):
        return {"dtypes": {k: str(np.asarray(v).dtype) for k, v in global_params.items()},
                "scores": self._scores([], global_params)}

    def update_weight(self, entry, version: int) -> float:
        return float(staleness.prfl(version, entry.base_version, self.params.a)) * float(entry.contribution.weight)

    def aggregate(self, global_params, entries, record):
        st, version = self.state, record.version
        message = {}
        if st.reload:  # recovery: continue from the best model so far, forget what was trained from later ones
            global_params = st.best if st.best is not None else global_params
            st.cache, st.reload, message["plateau"] = {}, False, True
        for e in entries:
            c = e.contribution
            st.cache[e.client_id] = (c.values, c.mask, float(c.weight), e.base_version)
            self._accumulate(e.extras)
        clients = sorted(st.cache)
        s = np.array([staleness.prfl(version, st.cache[i][3], self.params.a) for i in clients])
        p = s / s.sum()
        contribs = [rules.Contribution(st.cache[i][0], st.cache[i][1], float(pi) * st.cache[i][2])
                    for i, pi in zip(clients, p)]
        new = rules.mix(global_params, rules.masked_mean(global_params, contribs), self.params.eta_g)
        st.aggregations += 1
        if st.aggregations % self.params.recompute_every == 0:
            uploads = [st.sq_acc] if st.uploads else []
            message["scores"] = self._scores(uploads, new)
            st.sq_acc, st.uploads = {}, 0
        return Aggregation(new, message=message or None)


# ================================================================ client


class PRFLClient(ClientAlgorithm):
    """Accumulates squared gradients over the mask and sends them as extra arrays."""

    def prepare(self, run):
        run.scratch["sq"] = {e.over: torch.zeros_like(run.named[e.over]) for e in run.submodel.extras}

    def after_backward(self, run):
        for k, acc in run.scratch["sq"].items():
            g = run.named[k].grad
            if g is not None:
                acc += g.detach() ** 2

    def finalize(self, run):
        mask = run.submodel.mask
        out = {}
        for k, acc in run.scratch["sq"].items():
            v = acc.cpu().numpy()
            out[SQ_PREFIX + k] = v.reshape(-1) if mask is None else v[np.asarray(mask[k])]
        return out


@register
class PRFL(Method):
    """Progressive nested masks from communication times, recovery on plateau, MaskFedAvg
    over a per-client cache, residual-split download."""

    name = "prfl"
    paper = "PR-FL: progressive pruning and recovery for buffered asynchronous FL (as in the authors' code; our choices: this module)"
    schedule = "interval"
    needs_spec = True
    Params = PRFLParams
    Planner = PRFLPlanner
    Server = PRFLServer
    Client = PRFLClient
