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
coordinates exactly zero). ``M`` reaches the driver-side instance through
:meth:`Method.public_state` / :meth:`Method.sync_from_server`. A round in
which no exploring client arrived leaves the run in Phase 0.
Each exploring copy trains up to ``explore_epochs`` epochs and stops early at
the first epoch whose mean training loss does not improve on the best earlier
one (``Assignment.early_stop``); its cost is predicted at dispatch for the
full ``explore_epochs`` (the device's budget), since where it stops is only
known afterwards.

Phase 1 -- FL on the masked model. Sampled clients train with
``Assignment.mask = M`` (the trainer restores every uncovered coordinate,
i.e. zero, after every optimiser step) and send their delta. Server:
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

from fedray import seeding
from fedray.aggregation import rules
from fedray.config import POS, UNIT, _f
from fedray.methods.base import Assignment, Method
from fedray.methods.registry import register
from fedray.pruning.exploration import guidance, hybrid_mask, random_mask, refresh_guidance
from fedray.submodel import masks as M


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


class _Pruned(Method):
    """Shared two-phase machinery (exploration round, then masked FL with server momentum)."""

    schedule = "sync"

    def __init__(self, cfg, spec=None):
        super().__init__(cfg, spec)
        if spec is None:
            raise ValueError(f"{self.name} needs the model spec")
        self.weight_keys = [layer.weight_key for layer in spec.layers]
        self.param_keys = list(spec.param_keys)
        self.mask: M.Mask | None = None  # both sides: None = Phase 0
        self.velocity: dict | None = None
        self._publish = False

    # ---------------------------------------------------------------- driver side
    def density(self) -> float:
        if self.mask is None:
            return 1.0
        kept = sum(int(self.mask[k].sum()) for k in self.param_keys)
        return kept / sum(int(np.prod(self.spec.shapes[k])) for k in self.param_keys)

    def plan(self, client_id: int, version: int) -> Assignment:
        c = int(client_id)
        if self.mask is None:
            return Assignment(client_id=c, local_epochs=self.params.explore_epochs, early_stop=True,
                              info=(("phase", 0), ("density", 1.0)))
        return Assignment(client_id=c, mask=self.mask, download_mask=self.mask, send="delta",
                          info=(("phase", 1), ("density", self.density())))

    def sync_from_server(self, state: Mapping) -> None:
        if "mask" in state:
            self.mask = {k: np.asarray(v, dtype=bool) for k, v in state["mask"].items()}

    # ---------------------------------------------------------------- server side
    def make_mask(self, base, explored) -> M.Mask:
        raise NotImplementedError

    def aggregate(self, global_params, entries, version):
        if self.mask is None:
            self.mask = self.make_mask(global_params, [c.values for _, c in entries])
            self._publish = True
            return M.apply(global_params, self.mask)
        contribs = [c for _, c in entries]
        zero = {k: np.zeros_like(v) for k, v in global_params.items()}
        mean_delta = rules.masked_mean(zero, contribs)
        target = {k: (global_params[k] + mean_delta[k]).astype(global_params[k].dtype, copy=False)
                  for k in global_params}
        p = self.params
        trained = {k: target[k] for k in self.param_keys}
        new, self.velocity = rules.momentum_step(global_params, trained, self.velocity, p.server_lr, p.momentum)
        for k in global_params:
            if k not in trained:
                new[k] = target[k]
        if getattr(p, "refresh", False):
            g = refresh_guidance([c.values for c in contribs], keys=self.weight_keys)
            self.mask = M.intersect(self.mask, hybrid_mask(self.spec, g, p.q, p.structured))
            self._publish = True
        return M.apply(new, self.mask)

    def public_state(self, global_params, version):
        if not self._publish:
            return None
        self._publish = False
        return {"mask": self.mask}

    def state_dict(self):
        return {"mask": self.mask, "velocity": self.velocity, "publish": self._publish}

    def load_state_dict(self, state):
        self.mask, self.velocity, self._publish = state["mask"], state["velocity"], bool(state["publish"])


@register
class AutoFLIP(_Pruned):
    name = "autoflip"
    Params = FlipParams

    def make_mask(self, base, explored) -> M.Mask:
        g = guidance(base, explored, keys=self.weight_keys)
        return hybrid_mask(self.spec, g, self.params.q, self.params.structured)


@register
class RandomPrune(_Pruned):
    name = "random_prune"
    Params = PruneParams

    def make_mask(self, base, explored) -> M.Mask:
        g = guidance(base, explored, keys=self.weight_keys)
        matched = M.density(hybrid_mask(self.spec, g, self.params.q, self.params.structured), base, self.weight_keys)
        mask = {k: np.ones(np.shape(v), dtype=bool) for k, v in base.items()}
        mask.update(random_mask(base, matched, seeding.rng(self.cfg.seed, "mask", 0), self.weight_keys))
        return mask
