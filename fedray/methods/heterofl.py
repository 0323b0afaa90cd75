"""HeteroFL (Diao et al. 2021): width-sliced submodels by device capability.

Driver side. Each client gets a width ratio ``beta`` from ``ratios``
(default ``1, 1/2, 1/4, 1/8, 1/16``), fixed for the whole run:

- ``assign: speed`` (default): clients are ranked by device speed (fastest
  first, ties by client id) and split into ``len(ratios)`` consecutive groups,
  of equal size by default or of the sizes given by ``proportions``
  (fractions, largest ratio first); the fastest group trains the widest model
  (the run's device profiles, from the planner's context).
- ``assign: tier``: ``tier_ratios`` maps every device tier name to its ratio.

The client trains the physically smaller model ``width_keep(spec, beta, streams=True)``
(the first ``ceil(beta C)`` channels of every prunable layer, inputs and
outputs) with hidden-layer outputs scaled by ``1/beta`` during training
(HeteroFL's scaler, the client algorithm's ``scale`` setting); it downloads and
sends exactly that slice (``mask = download =`` the slice's mask). Training
FLOPs are those of the compact model (and so are its sparse-kernel FLOPs: a
physically smaller model runs dense kernels).

Server side: masked mean per coordinate over the clients whose slice covers it
(:func:`fedray.aggregation.rules.width_sliced_mean`); coordinates nobody
covered keep their value. ``weight: examples`` (default) weights client ``i``
by ``n_i`` like every other method here; ``weight: count`` gives each client
weight 1, as the original HeteroFL code does.

Batch norm ("static BN", ``bn_stats: static``, default): running statistics
(``running_mean``, ``running_var``, ``num_batches_tracked``) are never
aggregated (clients normalise with batch statistics while training). As in the
paper, the global model is evaluated -- and saved -- with statistics recomputed
by the full model on training data: before every evaluation the server resets
every batch norm and takes the cumulative average of the batch statistics over
the first ``bn_examples`` training examples in train mode
(:func:`fedray.aggregation.evaluate.recompute_bn`; the simulation's stand-in for
querying the clients' data). ``bn_stats: mean`` averages the clients' statistics
(masked mean) instead. Clients still send these buffers (a few bytes per
channel); the server ignores them under ``static``.

On ResNet the slices cut the residual stream of every stage too (its stem, every
block's second convolution and projection, and their readers), not only the
channels inside blocks.

Schedule: synchronous rounds, as in the paper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from fedray.aggregation import rules
from fedray.errors import ConfigError
from fedray.methods.base import Assignment, ClientAlgorithm, Method, Planner, Server
from fedray.methods.registry import register
from fedray.params import POS, UNIT_POS, _f
from fedray.submodel.submodel import Submodel
from fedray.submodel.width import width_submodel

DEFAULT_RATIOS = (1.0, 0.5, 0.25, 0.125, 0.0625)


def speed_ratios(speeds, ratios, proportions=None) -> np.ndarray:
    """Ratio per client: rank by speed (fastest first, ties by id), split into groups.

    ``ratios`` is sorted descending; group ``j`` (the ``j``-th fastest) gets
    ``ratios[j]``. Group sizes: equal (``np.array_split``) or
    ``round(p_j * n)`` with the rounding remainder added to the last groups'
    boundaries (cumulative rounding, so sizes sum to ``n``).
    """
    speeds = np.asarray(speeds, dtype=np.float64)
    n = len(speeds)
    rs = sorted((float(r) for r in ratios), reverse=True)
    order = np.lexsort((np.arange(n), -speeds))
    if proportions is None:
        groups = np.array_split(order, len(rs))
    else:
        bounds = np.rint(np.cumsum(proportions) * n).astype(int)
        bounds[-1] = n
        groups = np.split(order, bounds[:-1])
    out = np.empty(n, dtype=np.float64)
    for r, g in zip(rs, groups):
        out[g] = r
    return out


def tier_ratios(population, mapping, field: str = "method.tier_ratios") -> np.ndarray:
    """Ratio per client from ``{tier name: ratio}`` (``population``: a
    :class:`~fedray.devices.columns.Population`); every tier with clients needs one."""
    for tier, r in mapping.items():
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ConfigError(f"{field}.{tier}", f"must be a ratio in (0, 1], got {r!r}")
    missing = sorted(set(population.tiers_present()) - set(mapping))
    if missing:
        raise ConfigError(field, f"no ratio for device tier(s) {', '.join(missing)}")
    return np.array([float(mapping.get(t, 1.0)) for t in population.tier_names])[population.tier_index]


@dataclass(frozen=True)
class HeteroFLParams:
    ratios: tuple[float, ...] = _f(DEFAULT_RATIOS, check=UNIT_POS, doc="width ratios beta")
    assign: str = _f("speed", choices=("speed", "tier"), doc="how a client gets its ratio")
    proportions: tuple[float, ...] | None = _f(None, check=UNIT_POS,
                                               doc="speed: fraction of clients per ratio (largest first)")
    tier_ratios: dict = _f(factory=dict, doc="tier: {tier name: ratio}")
    weight: str = _f("examples", choices=("examples", "count"), doc="masked-mean weight per client")
    bn_stats: str = _f("static", choices=("static", "mean"), doc="BatchNorm running statistics")
    bn_examples: int = _f(2048, check=POS, doc="static: training examples the global statistics are recomputed on")

    def __post_init__(self):
        if not self.ratios:
            raise ConfigError("method.ratios", "needs at least one ratio")
        if len(set(self.ratios)) != len(self.ratios):
            raise ConfigError("method.ratios", f"ratios must be distinct, got {list(self.ratios)}")
        for r in self.ratios:
            if not 0 < r <= 1:
                raise ConfigError("method.ratios", f"must be in (0, 1], got {r!r}")
        if self.proportions is not None:
            if len(self.proportions) != len(self.ratios):
                raise ConfigError("method.proportions", f"needs one fraction per ratio ({len(self.ratios)}), "
                                                        f"got {len(self.proportions)}")
            if not math.isclose(sum(self.proportions), 1.0, abs_tol=1e-6):
                raise ConfigError("method.proportions", f"fractions must sum to 1, got {sum(self.proportions):g}")
        for tier, r in self.tier_ratios.items():
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise ConfigError(f"method.tier_ratios.{tier}", f"must be a ratio in (0, 1], got {r!r}")
        if self.assign == "tier" and not self.tier_ratios:
            raise ConfigError("method.tier_ratios", "assign: tier needs a {tier name: ratio} mapping")


class HeteroFLPlanner(Planner):
    def __init__(self, ctx):
        super().__init__(ctx)
        p = self.params
        if p.assign == "speed":
            self.ratio_of = speed_ratios(ctx.profiles.column("speed"), p.ratios, p.proportions)
        else:
            self.ratio_of = tier_ratios(ctx.profiles, p.tier_ratios)
        self._slices: dict[float, Submodel] = {}

    def ratio(self, client_id: int) -> float:
        return float(self.ratio_of[int(client_id)])

    def submodel(self, ratio: float) -> Submodel:
        """The width-``ratio`` slice (cached)."""
        if ratio not in self._slices:
            keep, mask = width_submodel(self.ctx.spec, self.ctx.model.like, ratio)
            self._slices[ratio] = Submodel(mask=mask, download=mask, keep=keep)
        return self._slices[ratio]

    def plan(self, client_id: int, version: int) -> Assignment:
        r = self.ratio(client_id)
        return Assignment(client_id=int(client_id), submodel=self.submodel(r), client=(("scale", r),),
                          info=(("width", r),))


class HeteroFLServer(Server):
    def __init__(self, ctx):
        super().__init__(ctx)
        self._stat_keys = frozenset(ctx.spec.buffer_keys)

    def eval_params(self, params, evaluator):
        """Static BN: the global model's statistics recomputed on training data."""
        if self.params.bn_stats != "static" or not self._stat_keys or evaluator is None or evaluator.train is None:
            return params
        return evaluator.bn_statistics(params, max_examples=self.params.bn_examples)

    def fused_check(self) -> bool:  # static BN leaves the statistics the clients send out of the merge
        return self.params.bn_stats != "static" or not self._stat_keys

    def aggregate(self, global_params, entries, record):
        count = self.params.weight == "count"
        static = self.params.bn_stats == "static"
        contribs = []
        for e in entries:
            c = e.contribution
            mask = {k: m for k, m in c.mask.items() if not (static and k in self._stat_keys)}
            contribs.append(rules.Contribution(c.values, mask, 1.0 if count else c.weight))
        return rules.width_sliced_mean(global_params, contribs)


class HeteroFLClient(ClientAlgorithm):
    """HeteroFL's scaler: outputs of every layer but the last divided by ``beta`` while training."""

    def prepare(self, run):
        scale = run.setting("scale", 1.0)
        if scale == 1.0:
            return
        layers = [m for m in run.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        for m in layers[:-1]:
            run.handles.append(m.register_forward_hook(lambda _m, _i, out: out / scale))


@register
class HeteroFL(Method):
    """Width slices (first ceil(beta C) channels) by device speed, masked mean."""

    name = "heterofl"
    paper = "Diao, Ding, Tarokh, HeteroFL: Computation and Communication Efficient Federated Learning for " \
            "Heterogeneous Clients, ICLR 2021"
    schedule = "sync"
    feedback = False
    needs_spec = True
    Params = HeteroFLParams
    Planner = HeteroFLPlanner
    Server = HeteroFLServer
    Client = HeteroFLClient
