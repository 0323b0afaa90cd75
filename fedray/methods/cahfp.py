"""CA-HFP: curvature-aware structured pruning with reconstruction (our reading of the abstract, below).

Each client ``k`` has a keep ratio ``r_k``:

* ``tier_ratios`` given: ``{tier name: ratio}`` from the client's device tier
  (every tier of the population needs a ratio);
* otherwise ``ratios`` by speed rank (default ``1.0/0.8/0.6/0.4``):
  :func:`fedray.methods.heterofl.speed_ratios` (clients sorted by device
  speed, fastest first, ties by id, split into ``len(ratios)`` near-equal
  groups; the fastest group gets the largest ratio).

The device profiles are the run's (the planner's context).

Client side (:class:`CAHFPClient`): empirical-Fisher scores per structural
group on ``score_batches`` local mini-batches of the downloaded full model
(:func:`fedray.pruning.curvature.fisher_and_grad`), keep the top
``ceil(r C_l)`` channels of every prunable layer, train the physically smaller
model, scatter it back at the original indices and send it with its mask and
the kept channel indices (extra arrays ``kept/<layer>``, int32). A client with
``r = 1`` trains the full model (no scoring).

How often (``score_every: T``, default 1): a client scores at its first dispatch
and then at its first dispatch at least ``T`` rounds (model versions) after its
last scoring (the planner's state: the version each client last scored at). In
between it trains the channel set it chose last, kept in the per-client store
(:mod:`fedray.client.state`), so the set is stable between rescoring; such a
dispatch has no scoring pass and sends no ``kept/`` indices (the payload's
slices still carry them). A client told to reuse its set that has none (its
scoring update was lost or rejected) scores again.

Where (``scoring``): ``client`` (default) as above; ``server``: a scoring
client sends, instead of choosing alone, its per-group curvature terms at the
downloaded model (:func:`fedray.pruning.curvature.group_terms`, extra arrays
``terms/<layer>``, float32 ``(2, C)``). The server keeps the example-weighted
mean of the terms that arrived in its latest round with any -- exactly the
terms of the clients' aggregated gradient and Fisher at that global model, the
terms being linear in both -- and sends the scores ``|sum of terms|``
(``scores/<layer>``, float32 ``(C,)``, counted in the download) to the
scoring clients, which keep the top ``ceil(r C_l)`` of them (the server's pick
by each client's keep ratio). Before any terms arrived the scores are zeros and
a client keeps its own top channels.

The client reads all of this from its assignment (``keep_ratio``, ``score``, ``scoring``,
``keep_set``: whether the chosen set is kept in the store), not from CA-HFP's parameters, so
another method's planner (:mod:`fedray.methods.adaptive_masked_buff`) drives the same client.

Costs (the submodel's): the compact model's training FLOPs per example come from
the spec of the compact model of ``width_keep`` sizes (the sizes -- hence FLOPs
and bytes -- are the same whichever channels the client keeps); the scoring pass
costs a forward and backward pass of the full model on every scored example
(``extra_flops``, on scoring dispatches); the upload is the slice encoding of such a
mask plus, when it scored, the kept indices (and the curvature terms with server
scoring); a scoring dispatch downloads the full model (the client scores its channels on it)
and, with server scoring, the server's scores; a dispatch that reuses the stored set downloads
only that compact model (its channels are the client's; the bytes depend only on the sizes).

Server: per-coordinate masked mean weighted by example count
(:func:`fedray.aggregation.rules.masked_mean`). Every dispatch records
``keep_ratio``, ``scored`` (whether it scored its channels) and its compact
model's size: ``compact_flops`` (forward FLOPs per example) and
``compact_params`` (trainable parameters); the summary lists them per client
(``compact_by_client``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fedray import seeding
from fedray.aggregation import rules
from fedray.errors import ConfigError
from fedray.methods.base import Assignment, ClientAlgorithm, Method, Planner, Server
from fedray.methods.heterofl import speed_ratios, tier_ratios
from fedray.methods.registry import register
from fedray.models.spec import width_keep
from fedray.params import POS, UNIT_POS, _f
from fedray.pruning.curvature import fisher_and_grad, group_terms, keep_top
from fedray.submodel.submodel import Extra, Submodel

KEPT = "kept/"
TERMS = "terms/"  # a scoring client's per-group curvature terms (server scoring, up)
SCORES = "scores/"  # the server's aggregated group scores (server scoring, down)


@dataclass(frozen=True)
class CAHFPParams:
    ratios: tuple[float, ...] = _f((1.0, 0.8, 0.6, 0.4), check=UNIT_POS,
                                   doc="keep ratios by speed rank, fastest group first")
    tier_ratios: dict | None = _f(None, doc="keep ratio per device tier name (overrides ratios)")
    score_batches: int = _f(4, check=POS, doc="local mini-batches used for the curvature scores")
    score_every: int = _f(1, check=POS, doc="T: a client rescores its channels once T rounds passed since its last "
                                            "scoring and keeps its channel set in between")
    scoring: str = _f("client", choices=("client", "server"),
                      doc="who picks the channels: the client from its own curvature, or the server from the "
                          "clients' aggregated curvature")

    def __post_init__(self):
        if not self.ratios:
            raise ConfigError("method.ratios", "needs at least one keep ratio")


def scored_examples(n: int, batch_size: int, score_batches: int) -> int:
    """Examples the scoring pass runs: ``max(1, min(score_batches, ceil(n / batch_size)))`` batches."""
    batches = max(1, min(score_batches, math.ceil(n / batch_size)))
    return min(n, batches * batch_size)


def kept_extras(spec, widths: dict) -> tuple[Extra, ...]:
    """The kept channel indices a scoring client sends: one int32 array ``kept/<layer>`` per
    compact layer, bounded by the layer's full width."""
    bounds = {g.layer: g.size for g in spec.groups}
    return tuple(Extra(KEPT + layer, dtype="int32", shape=(n,), bound=bounds[layer]) for layer, n in widths.items())


def scoring_flops(ctx, client_id: int, score_batches: int) -> int:
    """The scoring pass of a client: forward and backward of the full model on
    :func:`scored_examples` of its examples. ``ctx``: the planner's context."""
    n = int(ctx.examples[int(client_id)])
    return scored_examples(n, ctx.cfg.train.batch_size, score_batches) * ctx.model.train_flops_per_example()


def compact_widths(spec, ratio: float) -> dict[str, int]:
    """The compact widths ``ceil(ratio C_l)`` of every prunable layer (:func:`fedray.models.spec.width_keep`)."""
    return {layer: len(v) for layer, v in width_keep(spec, ratio).items()}


def scored_submodel(ctx, client_id: int, ratio: float, score_batches: int) -> Submodel:
    """The submodel of a client that scores its channels on this dispatch and keeps ``ratio`` < 1
    of every prunable layer's (:class:`CAHFPClient`, client scoring): the compact widths, the kept
    indices as extra arrays and the scoring pass as ``extra_flops``."""
    widths = compact_widths(ctx.spec, ratio)
    return Submodel(widths=widths, extras=kept_extras(ctx.spec, widths),
                    extra_flops=scoring_flops(ctx, client_id, score_batches))


def reused_submodel(ctx, widths: dict[str, int]) -> Submodel:
    """The submodel of a client that trains its stored channel set: no scoring pass, no indices,
    and only its compact model downloaded (a slice of the same sizes: the bytes depend only on them)."""
    return Submodel(widths=widths, download=ctx.model.slice_mask(widths))


@dataclass
class ScoredAt:
    """The planner's state: the model version at which each client last scored its channels."""

    scored: dict = field(default_factory=dict)


class CAHFPPlanner(Planner):
    State = ScoredAt

    def __init__(self, ctx):
        super().__init__(ctx)
        p = self.params
        if p.tier_ratios is not None:
            self.ratio = tier_ratios(ctx.profiles, p.tier_ratios).tolist()
        else:
            self.ratio = speed_ratios(ctx.profiles.column("speed"), p.ratios).tolist()
        spec = ctx.spec
        self._widths = {r: compact_widths(spec, r) for r in sorted(set(self.ratio)) if r < 1.0}
        self._subs: dict = {}
        self._sizes = {r: compact_size(spec if r >= 1.0 else ctx.model.compact_spec(self._widths[r]))
                       for r in set(self.ratio)}

    def _submodel(self, r: float, score: bool, scoring_flops: int) -> Submodel:
        """One submodel object per (ratio, scoring, cost) so the dispatcher costs it once."""
        key = (r, score, scoring_flops)
        if key not in self._subs:
            spec, widths = self.ctx.spec, self._widths[r]
            if not score:
                self._subs[key] = reused_submodel(self.ctx, widths)
                return self._subs[key]
            extras, receives = kept_extras(spec, widths), ()
            if self.params.scoring == "server":
                extras += tuple(Extra(TERMS + g.layer, shape=(2, g.size)) for g in spec.groups)
                receives = tuple(Extra(SCORES + g.layer, shape=(g.size,)) for g in spec.groups)
            self._subs[key] = Submodel(widths=widths, extras=extras, receives=receives, extra_flops=scoring_flops)
        return self._subs[key]

    def plan(self, client_id: int, version: int) -> Assignment:
        c = int(client_id)
        r = self.ratio[c]
        flops, params = self._sizes[r]
        info = (("keep_ratio", r), ("compact_flops", flops), ("compact_params", params))
        if r >= 1.0:
            return Assignment(client_id=c, info=info + (("scored", False),))
        last = self.state.scored.get(c)
        score = last is None or version - last >= self.params.score_every
        if score:
            self.state.scored[c] = int(version)
        scoring = scoring_flops(self.ctx, c, self.params.score_batches)
        p = self.params
        client = (("keep_ratio", r), ("score", score), ("scoring", p.scoring),
                  ("keep_set", p.score_every > 1 or p.scoring == "server"))
        return Assignment(client_id=c, submodel=self._submodel(r, score, scoring), client=client,
                          info=info + (("scored", score),))


def compact_size(spec) -> tuple[int, int]:
    """``(forward FLOPs per example, trainable parameters)`` of a (compact) model's spec."""
    return int(spec.forward_flops()), int(spec.num_params())


@dataclass
class ServerScores:
    """Server scoring: the aggregated per-group scores the scoring clients pick by (zeros: none yet)."""

    scores: dict = field(default_factory=dict)


class CAHFPServer(Server):
    State = ServerScores

    def start(self, global_params):
        if self.params.scoring == "server":
            self.state.scores = {g.layer: np.zeros(g.size, np.float32) for g in self.ctx.spec.groups}
        return None

    def broadcast(self):
        if self.params.scoring != "server":
            return None
        return {SCORES + layer: v for layer, v in self.state.scores.items()}

    def aggregate(self, global_params, entries, record):
        scored = [e for e in entries if any(k.startswith(TERMS) for k in e.extras)]
        if scored and self.params.scoring == "server":
            total = sum(float(e.contribution.weight) for e in scored)
            for layer in self.state.scores:
                terms = sum(float(e.contribution.weight) * np.asarray(e.extras[TERMS + layer], np.float64)
                            for e in scored) / total
                self.state.scores[layer] = np.abs(terms.sum(axis=0)).astype(np.float32)
        return rules.masked_mean(global_params, [e.contribution for e in entries])


class CAHFPClient(ClientAlgorithm):
    """Scores channels by local empirical Fisher on the downloaded model and keeps the best (or
    reuses its stored channel set between rescoring; or picks by the server's scores)."""

    def choose(self, run):
        sub = run.submodel
        if sub.widths is None:
            return sub
        server_scoring = run.setting("scoring", "client") == "server"
        stored = run.state or {}
        keep = None
        if not run.setting("score", True) and all(KEPT + layer in stored for layer in sub.widths):
            keep = {layer: np.asarray(stored[KEPT + layer], dtype=np.int64) for layer in sub.widths}
        if keep is None:
            terms = self._terms(run)
            own = {layer: np.abs(t.sum(axis=0)) for layer, t in terms.items()}
            server = {k[len(SCORES):]: v for k, v in run.broadcast.items() if k.startswith(SCORES)}
            if server_scoring:
                run.scratch["terms"] = terms
            use = server if server_scoring and any(np.any(v) for v in server.values()) else own
            keep = keep_top(self.ctx.spec, use, run.setting("keep_ratio"))
            if run.setting("keep_set", False):  # the channel set lives on the device until rescoring
                run.new_state = {KEPT + k: v.astype(np.int32) for k, v in keep.items()}
        run.scratch["keep"] = keep
        return Submodel(keep=keep, extras=sub.extras, receives=sub.receives, extra_flops=sub.extra_flops)

    def _terms(self, run) -> dict:
        """The curvature terms of every prunable group on ``score_batches`` local mini-batches."""
        from fedray.client.trainer import load_params, to_device

        model = run.model
        load_params(model, run.download)
        x, y, idx = run.data
        rng = seeding.rng(run.seed, "mask")
        order = idx[rng.permutation(len(idx))]
        bs = run.batch_size
        n_batches = max(1, min(self.params.score_batches, -(-len(order) // bs)))
        batches = [(torch.from_numpy(x[order[i * bs:(i + 1) * bs]]).to(run.device),
                    torch.from_numpy(y[order[i * bs:(i + 1) * bs]]).to(run.device)) for i in range(n_batches)]
        to_device(model, run.device)
        grad, fisher = fisher_and_grad(model, batches, run.loss)
        return group_terms(self.ctx.spec, run.download, grad, fisher)

    def finalize(self, run):
        names = {e.name for e in run.submodel.extras}
        out = {KEPT + k: v.astype(np.int32) for k, v in run.scratch["keep"].items() if KEPT + k in names} \
            if "keep" in run.scratch else {}
        for layer, t in run.scratch.get("terms", {}).items():
            if TERMS + layer in names:
                out[TERMS + layer] = t.astype(np.float32)
        return out


@register
class CAHFP(Method):
    """Curvature-scored structured pruning, physically smaller client models, reconstruction."""

    name = "cahfp"
    paper = "CA-HFP: curvature-aware heterogeneous federated pruning (only the abstract is public; our reading: this module)"
    schedule = "sync"
    feedback = False
    needs_spec = True
    client_state = True  # the channel set between rescoring (score_every > 1, server scoring)
    Params = CAHFPParams
    Planner = CAHFPPlanner
    Server = CAHFPServer
    Client = CAHFPClient
