"""CA-HFP: curvature-aware structured pruning with reconstruction (our reading, see ALGORITHMS.md).

Each client ``k`` has a keep ratio ``r_k``:

* ``tier_ratios`` given: ``{tier name: ratio}`` from the client's device tier
  (every tier of the population needs a ratio);
* otherwise ``ratios`` by speed rank (default ``1.0/0.8/0.6/0.4``):
  :func:`fedray.methods.heterofl.speed_ratios` (clients sorted by device
  speed, fastest first, ties by id, split into ``len(ratios)`` near-equal
  groups; the fastest group gets the largest ratio).

The device profiles are those of the run: the method draws them exactly as
:func:`fedray.runtime.loop.prepare` does (``build_population`` from the
``devices`` section and ``seeding.derive(seed, "devices")``), a pure function
of the config.

Client side (:meth:`fedray.client.actor.ClientWorker._curvature_keep` and the
keep path): empirical-Fisher scores per structural group on
``score_batches`` local mini-batches, keep the top ``ceil(r C_l)`` channels
of every prunable layer, train the physically smaller model, scatter it back
at the original indices and send it with its mask. Scores are recomputed at
every dispatch. A client with ``r = 1`` trains the full model (no scoring).

Costs: the compact model's training FLOPs per example come from the spec of
the compact model built with :func:`fedray.models.spec.width_keep` sizes (the
sizes -- hence FLOPs -- are the same whichever channels the client keeps);
upload bytes are those of the slice encoding of such a mask (same sizes,
same bytes); the client downloads the full model (it scores its channels on
it).

Server: per-coordinate masked mean weighted by example count
(:func:`fedray.aggregation.rules.masked_mean`). Every dispatch records
``keep_ratio``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedray import config as C
from fedray.aggregation import rules
from fedray.config import POS, UNIT_POS, _f
from fedray.errors import ConfigError
from fedray.methods.base import Assignment, Method
from fedray.methods.heterofl import speed_ratios
from fedray.methods.registry import register
from fedray.models.spec import build_compact, model_spec, width_keep
from fedray.submodel.encode import payload_nbytes
from fedray.submodel.width import keep_mask


client_profiles = C.profiles  # the one draw of the devices of a run


@dataclass(frozen=True)
class CompactCost:
    """Training FLOPs per example and upload bytes of a keep ratio's compact model."""

    train_flops_per_example: int
    bytes_up: int
    num_params: int


def compact_cost(spec, model_name: str, options, ratio: float) -> CompactCost:
    """Cost of a compact model keeping ``ceil(ratio C)`` channels of every prunable layer."""
    keep = width_keep(spec, ratio)
    num_classes = spec.layers[-1].out
    with torch.random.fork_rng(devices=[]):  # building a module draws its initial weights
        compact = build_compact(model_name, spec.input_shape, num_classes, options, spec, keep)
    cspec = model_spec(compact, spec.input_shape)
    state = compact.state_dict()
    like = {k: np.broadcast_to(np.zeros((), dtype=state[k].detach().numpy().dtype), tuple(shape))
            for k, shape in spec.shapes.items()}
    return CompactCost(train_flops_per_example=cspec.train_flops(cspec.layer_names, 1),
                       bytes_up=payload_nbytes(like, keep_mask(spec, like, keep)), num_params=cspec.num_params())


@register
class CAHFP(Method):
    name = "cahfp"
    feedback = False
    schedule = "sync"

    @dataclass(frozen=True)
    class Params:
        ratios: tuple[float, ...] = _f((1.0, 0.8, 0.6, 0.4), check=UNIT_POS,
                                       doc="keep ratios by speed rank, fastest group first")
        tier_ratios: dict | None = _f(None, doc="keep ratio per device tier name (overrides ratios)")
        score_batches: int = _f(4, check=POS, doc="local mini-batches used for the curvature scores")

    def __init__(self, cfg, spec=None):
        super().__init__(cfg, spec)
        if spec is None:
            raise ValueError("cahfp needs the model spec")
        p = self.params
        if not p.ratios:
            raise ConfigError("method.ratios", "needs at least one keep ratio")
        profiles = client_profiles(cfg)
        if p.tier_ratios is not None:
            for tier, r in p.tier_ratios.items():
                if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                    raise ConfigError(f"method.tier_ratios.{tier}", f"must be a number in (0, 1], got {r!r}")
            missing = sorted({pr.tier for pr in profiles} - set(p.tier_ratios))
            if missing:
                raise ConfigError("method.tier_ratios", f"has no keep ratio for tier {missing[0]!r}")
            self.ratio = [float(p.tier_ratios[pr.tier]) for pr in profiles]
        else:
            self.ratio = [float(r) for r in speed_ratios([pr.speed for pr in profiles], p.ratios)]
        self.costs = {r: compact_cost(spec, cfg.model.name, cfg.model.options, r) for r in sorted(set(self.ratio))
                      if r < 1.0}

    def plan(self, client_id: int, version: int) -> Assignment:
        c = int(client_id)
        r = self.ratio[c]
        if r >= 1.0:
            return Assignment(client_id=c, info=(("keep_ratio", 1.0),))
        cost = self.costs[r]
        return Assignment(client_id=c, keep_policy="curvature", keep_ratio=r, score_batches=self.params.score_batches,
                          train_flops_per_example=cost.train_flops_per_example, bytes_up=cost.bytes_up,
                          info=(("keep_ratio", r),))

    def aggregate(self, global_params, entries, version):
        return rules.masked_mean(global_params, [c for _, c in entries])
