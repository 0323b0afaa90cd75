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
the kept channel indices (extra arrays ``kept/<layer>``, int32). Scores are
recomputed at every dispatch. A client with ``r = 1`` trains the full model (no
scoring).

Costs (the submodel's): the compact model's training FLOPs per example come from
the spec of the compact model of ``width_keep`` sizes (the sizes -- hence FLOPs
and bytes -- are the same whichever channels the client keeps); the scoring pass
costs a forward and backward pass of the full model on every scored example
(``extra_flops``); the upload is the slice encoding of such a mask plus the kept
indices; the client downloads the full model (it scores its channels on it).

Server: per-coordinate masked mean weighted by example count
(:func:`fedray.aggregation.rules.masked_mean`). Every dispatch records
``keep_ratio``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
from fedray.pruning.curvature import fisher_and_grad, group_scores, keep_top
from fedray.submodel.submodel import Extra, Submodel

KEPT = "kept/"


@dataclass(frozen=True)
class CAHFPParams:
    ratios: tuple[float, ...] = _f((1.0, 0.8, 0.6, 0.4), check=UNIT_POS,
                                   doc="keep ratios by speed rank, fastest group first")
    tier_ratios: dict | None = _f(None, doc="keep ratio per device tier name (overrides ratios)")
    score_batches: int = _f(4, check=POS, doc="local mini-batches used for the curvature scores")

    def __post_init__(self):
        if not self.ratios:
            raise ConfigError("method.ratios", "needs at least one keep ratio")


def scored_examples(n: int, batch_size: int, score_batches: int) -> int:
    """Examples the scoring pass runs: ``max(1, min(score_batches, ceil(n / batch_size)))`` batches."""
    batches = max(1, min(score_batches, math.ceil(n / batch_size)))
    return min(n, batches * batch_size)


def scored_submodel(ctx, client_id: int, ratio: float, score_batches: int) -> Submodel:
    """The submodel of a client that keeps ``ratio`` < 1 of every prunable layer's channels,
    chosen by its curvature scores (:class:`CAHFPClient`): the compact widths
    ``ceil(ratio C_l)`` (:func:`fedray.models.spec.width_keep`), the kept indices as extra
    arrays and the scoring pass (forward and backward of the full model on
    :func:`scored_examples`) as ``extra_flops``. ``ctx``: the planner's context."""
    spec = ctx.spec
    widths = {layer: len(v) for layer, v in width_keep(spec, ratio).items()}
    bounds = {g.layer: g.size for g in spec.groups}
    extras = tuple(Extra(KEPT + layer, dtype="int32", shape=(n,), bound=bounds[layer]) for layer, n in widths.items())
    n = int(ctx.examples[int(client_id)])
    scoring = scored_examples(n, ctx.cfg.train.batch_size, score_batches) * ctx.model.train_flops_per_example()
    return Submodel(widths=widths, extras=extras, extra_flops=scoring)


class CAHFPPlanner(Planner):
    def __init__(self, ctx):
        super().__init__(ctx)
        p = self.params
        if p.tier_ratios is not None:
            self.ratio = tier_ratios(ctx.profiles, p.tier_ratios).tolist()
        else:
            self.ratio = speed_ratios(ctx.profiles.column("speed"), p.ratios).tolist()

    def plan(self, client_id: int, version: int) -> Assignment:
        c = int(client_id)
        r = self.ratio[c]
        if r >= 1.0:
            return Assignment(client_id=c, info=(("keep_ratio", 1.0),))
        return Assignment(client_id=c, submodel=scored_submodel(self.ctx, c, r, self.params.score_batches),
                          client=(("keep_ratio", r),), info=(("keep_ratio", r),))


class CAHFPServer(Server):
    def aggregate(self, global_params, entries, record):
        return rules.masked_mean(global_params, [e.contribution for e in entries])


class CAHFPClient(ClientAlgorithm):
    """Scores channels by local empirical Fisher on the downloaded model and keeps the best."""

    def choose(self, run):
        sub = run.submodel
        if sub.widths is None:
            return sub
        from fedray.client.trainer import load_params, to_device

        spec = self.ctx.spec
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
        keep = keep_top(spec, group_scores(spec, run.download, grad, fisher), run.setting("keep_ratio"))
        run.scratch["keep"] = keep
        return Submodel(keep=keep, extras=sub.extras, extra_flops=sub.extra_flops)

    def finalize(self, run):
        keep = run.scratch.get("keep")
        return {} if keep is None else {KEPT + k: v.astype(np.int32) for k, v in keep.items()}


@register
class CAHFP(Method):
    """Curvature-scored structured pruning, physically smaller client models, reconstruction."""

    name = "cahfp"
    paper = "CA-HFP: curvature-aware heterogeneous federated pruning (only the abstract is public; our reading: this module)"
    schedule = "sync"
    feedback = False
    needs_spec = True
    Params = CAHFPParams
    Planner = CAHFPPlanner
    Server = CAHFPServer
    Client = CAHFPClient
