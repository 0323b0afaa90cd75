"""AutoFLIP (loss-exploration guided hybrid pruning) and the random-pruning baseline.

Both run the ``sync`` schedule in two phases, through the normal dispatch
machinery:

Phase 0 -- exploration, the first round only (it counts as one of
``server.rounds``). The round's selected clients are the exploring clients:
each trains a copy of ``theta_base`` (the initial global model) for
``explore_epochs`` local epochs and sends its whole model. The round's
aggregation does not average: it computes the guidance
(:func:`fedray.pruning.exploration.guidance`, base ``theta_base``, over the
arrived copies), the hybrid mask ``M``
(:func:`fedray.pruning.exploration.hybrid_mask`, quantile ``q``, optional
structured part) and publishes ``theta <- theta_base * M`` (pruned
coordinates exactly zero). ``M`` reaches the planner as the server's message. A round in
which no exploring client arrived leaves the run in Phase 0.
Each exploring copy trains up to ``explore_epochs`` epochs and stops early at
the first epoch whose mean training loss does not improve on the best earlier
one (the client algorithm's ``end_epoch`` hook); its cost is predicted at
dispatch for the full ``explore_epochs`` (the device's budget), since where it
stops is only known afterwards.

Phase 1 -- FL on the masked model. Sampled clients train the submodel with
``mask = M`` (the trainer restores every uncovered coordinate,
i.e. zero, after every optimiser step) and send their delta. With the
structured part (``structured: true``, a zoo model) the removed filters /
neurons are gone physically: the submodel is the width keep set of the
channels ``M`` still covers (:func:`fedray.submodel.width.mask_keep`) plus
``M`` inside them, so the client trains the compact model (the same machinery
as HeteroFL / CA-HFP) and the executed training FLOPs (``train_flops``) are the
compact model's dense FLOPs; ``sparse_train_flops`` (only the unmasked
weights of the compact layers) is reported beside them. The server keeps
``M`` within those channels (a channel no coordinate of which survives is cut
with its consumers' input columns). Server:
``target = theta + masked mean of the deltas`` (weights ``n_i``); server
momentum on the trainable parameters
(:func:`fedray.aggregation.rules.momentum_step`, ``server_lr``,
``momentum`` 0.9); buffers (BatchNorm statistics) take the plain mean; then
``theta <- theta * M``. With ``refresh: true`` the mask is recomputed each
round from the sampled clients' deltas
(:func:`fedray.pruning.exploration.refresh_guidance` over the weight
tensors, same ``q``), intersected with the current mask: a refresh keeps
or prunes further, never regrows (pruned coordinates have zero deltas
anyway).

``random_prune`` ("random pruning at equal density"): it runs the same
exploration round (same training budget), computes AutoFLIP's hybrid mask
only to read its density over the Linear/Conv2d weights, and prunes the
weights uniformly at random to that density
(:func:`fedray.pruning.exploration.random_mask`,
``seeding.rng(seed, "mask", 0)``); biases and BatchNorm entries stay.
Phase 1 is AutoFLIP's (no refresh).

Every dispatch records ``phase`` (0 exploration, 1 FL) and ``density``
(kept fraction of the trainable parameters).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fedray import plugins, seeding
from fedray.aggregation import rules
from fedray.methods.base import Aggregation, Assignment, ClientAlgorithm, Method, Planner, Server
from fedray.methods.registry import register
from fedray.params import POS, UNIT, _f
from fedray.pruning.exploration import guidance, hybrid_mask, random_mask, refresh_guidance
from fedray.submodel import masks as M
from fedray.submodel.submodel import Submodel
from fedray.submodel.width import keep_mask, mask_keep


@dataclass(frozen=True)
class PruneParams:
    q: float = _f(0.3, check=UNIT, doc="quantile of the guidance below which weights are pruned")
    structured: bool = _f(True, doc="also remove whole filters / neurons whose mean guidance is below tau")
    explore_epochs: int = _f(3, check=POS, doc="E_x: local epochs of every exploring copy")
    momentum: float = _f(0.9, check=(lambda v: 0 <= v < 1, "in [0, 1)"), doc="server momentum")
    server_lr: float = _f(1.0, check=POS, doc="server learning rate of the momentum step")


@dataclass(frozen=True)
class FlipParams(PruneParams):
    refresh: bool = _f(False, doc="recompute the mask every round from the sampled clients' deltas")


@dataclass
class MaskState:
    """The planner's state: the mask (None: Phase 0, exploration)."""

    mask: dict | None = None


@dataclass
class PrunedServerState:
    mask: dict | None = None  # None: Phase 0
    velocity: dict | None = None


class PrunedPlanner(Planner):
    State = MaskState

    def __init__(self, ctx):
        super().__init__(ctx)
        self.param_keys = list(ctx.spec.param_keys)
        self._sub: Submodel | None = None

    def density(self) -> float:
        mask = self.state.mask
        if mask is None:
            return 1.0
        kept = sum(int(mask[k].sum()) for k in self.param_keys)
        return kept / sum(int(np.prod(self.ctx.spec.shapes[k])) for k in self.param_keys)

    def plan(self, client_id: int, version: int) -> Assignment:
        c = int(client_id)
        if self.state.mask is None:
            return Assignment(client_id=c, local_epochs=self.params.explore_epochs, client=(("explore", True),),
                              info=(("phase", 0), ("density", 1.0)))
        if self._sub is None:
            self._sub = self._submodel(self.state.mask)
        return Assignment(client_id=c, submodel=self._sub, send="delta",
                          info=(("phase", 1), ("density", self.density())))

    def _submodel(self, mask) -> Submodel:
        """The compact model of the channels ``mask`` covers plus ``mask`` inside them, when a
        channel is gone (structured part, zoo model); otherwise the masked full model."""
        spec = self.ctx.spec
        if self.params.structured and not plugins.is_import_path(self.ctx.cfg.model.name):
            keep = mask_keep(spec, mask)
            if any(len(keep[g.layer]) < g.size for g in spec.groups):
                return Submodel(keep=keep, mask=mask, download=mask)
        return Submodel(mask=mask, download=mask)

    def receive(self, message: Mapping) -> None:
        if "mask" in message:
            self.state.mask = {k: np.asarray(v, dtype=bool) for k, v in message["mask"].items()}
            self._sub = None


class PrunedServer(Server):
    """Shared two-phase machinery (exploration round, then masked FL with server momentum)."""

    State = PrunedServerState

    def __init__(self, ctx):
        super().__init__(ctx)
        spec = ctx.spec
        self.weight_keys = [layer.weight_key for layer in spec.layers]
        self.param_keys = list(spec.param_keys)

    def make_mask(self, base, explored) -> M.Mask:
        raise NotImplementedError

    def within_channels(self, mask: M.Mask) -> M.Mask:
        """``mask`` cut to the channels it covers (what the compact client model trains), with
        the structured part; without it ``mask`` as it is."""
        if not self.params.structured:
            return mask
        spec = self.ctx.spec
        return M.intersect(mask, keep_mask(spec, mask, mask_keep(spec, mask)))

    def aggregate(self, global_params, entries, record):
        st, p = self.state, self.params
        if st.mask is None:
            st.mask = self.within_channels(self.make_mask(global_params, [e.contribution.values for e in entries]))
            return Aggregation(M.apply(global_params, st.mask), message={"mask": st.mask})
        contribs = [e.contribution for e in entries]
        zero = {k: np.zeros_like(v) for k, v in global_params.items()}
        mean_delta = rules.masked_mean(zero, contribs)
        target = {k: (global_params[k] + mean_delta[k]).astype(global_params[k].dtype, copy=False)
                  for k in global_params}
        trained = {k: target[k] for k in self.param_keys}
        new, st.velocity = rules.momentum_step(global_params, trained, st.velocity, p.server_lr, p.momentum)
        for k in global_params:
            if k not in trained:
                new[k] = target[k]
        message = None
        if getattr(p, "refresh", False):
            g = refresh_guidance([c.values for c in contribs], keys=self.weight_keys)
            st.mask = self.within_channels(M.intersect(st.mask, hybrid_mask(self.ctx.spec, g, p.q, p.structured)))
            message = {"mask": st.mask}
        return Aggregation(M.apply(new, st.mask), message=message)


class ExplorationClient(ClientAlgorithm):
    """Exploring copies stop at the first epoch whose mean training loss does not improve."""

    def prepare(self, run):
        run.scratch["best"] = np.inf

    def end_epoch(self, run, mean_loss):
        if not run.setting("explore", False):
            return False
        if mean_loss >= run.scratch["best"]:
            return True
        run.scratch["best"] = mean_loss
        return False


class AutoFLIPServer(PrunedServer):
    def make_mask(self, base, explored) -> M.Mask:
        g = guidance(base, explored, keys=self.weight_keys)
        return hybrid_mask(self.ctx.spec, g, self.params.q, self.params.structured)


class RandomPruneServer(PrunedServer):
    def make_mask(self, base, explored) -> M.Mask:
        spec, p = self.ctx.spec, self.params
        g = guidance(base, explored, keys=self.weight_keys)
        matched = M.density(hybrid_mask(spec, g, p.q, p.structured), base, self.weight_keys)
        mask = {k: np.ones(np.shape(v), dtype=bool) for k, v in base.items()}
        mask.update(random_mask(base, matched, seeding.rng(self.ctx.cfg.seed, "mask", 0), self.weight_keys))
        return mask


@register
class AutoFLIP(Method):
    """Loss-exploration guided hybrid mask, FedAvg of deltas with server momentum."""

    name = "autoflip"
    paper = "AutoFLIP: loss-exploration guided hybrid pruning for federated learning"
    schedule = "sync"
    needs_spec = True
    Params = FlipParams
    Planner = PrunedPlanner
    Server = AutoFLIPServer
    Client = ExplorationClient


@register
class RandomPrune(AutoFLIP):
    """Random mask at AutoFLIP's density (its baseline), same exploration round."""

    name = "random_prune"
    paper = "the random-pruning-at-equal-density baseline of AutoFLIP"
    Params = PruneParams
    Server = RandomPruneServer
