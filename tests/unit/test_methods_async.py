"""Asynchronous, deadline and HeteroFL methods at the aggregator level (no Ray).

Updates are built as the wire format carries them (``Update`` header +
``encode``d payload) and go through :class:`AggregatorCore`, so validation,
de-duplication, buffering, triggers and checkpoints are exercised with the
methods' own rules.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from fedray.aggregation.core import AggregatorCore
from fedray.channel import Channel, Expected
from fedray.config import from_dict
from fedray.errors import ConfigError
from fedray.methods.deadline import deadline_seconds
from fedray.methods.heterofl import speed_ratios
from fedray.submodel.encode import Entry, Payload, encode
from fedray.update import Update
from fedray.devices import population
from tests import kit


def cfg_for(method: dict, **sections):
    data = {"method": method, "data": {"name": "digits", "num_clients": sections.pop("num_clients", 10)}}
    data.update(sections)
    return from_dict(data)


def planner_for(method: dict, info=None, **sections):
    return kit.planner_for(cfg_for(method, **sections), info)


def server_for(method: dict, info=None, **sections):
    return kit.server_for(cfg_for(method, **sections), info)


def core_for(method: dict, params, info=None, **sections) -> AggregatorCore:
    return AggregatorCore(params, server_for(method, info, **sections))


def params0(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}


def item(did, base, values, n=10, mask=None, kind="model", error=None):
    h = Update(dispatch_id=did, client_id=did % 7, base_version=base, num_examples=n, kind=kind, error=error)
    return h, encode(values, mask), None


def perturb(params, rng, scale=0.1):
    return {k: (v + scale * rng.normal(size=v.shape)).astype(v.dtype) for k, v in params.items()}


def sub(a, b):
    return {k: (a[k] - b[k]).astype(a[k].dtype) for k in a}


# ------------------------------------------------------------------ equivalences
def test_fedbuff_k1_equals_fedasync_fresh_updates():
    """Every update starts from the current model: FedBuff(K=1, eta_g) == FedAsync(alpha = eta_g)."""
    p = params0()
    buff = core_for({"name": "fedbuff", "buffer_size": 1, "server_lr": 0.6, "staleness": "polynomial"}, p)
    fa = core_for({"name": "fedasync", "alpha": 0.6, "staleness": "polynomial"}, p)
    rng = np.random.default_rng(1)
    for did in range(6):
        base = fa.params  # the model the client downloaded (both cores hold it, up to rounding)
        theta_i = perturb(base, rng)
        out_b = buff.receive([item(did, buff.version, sub(theta_i, base), kind="delta")])
        out_a = fa.receive([item(did, fa.version, theta_i)])
        assert out_a["aggregated"] and out_b["aggregated"]
        for k in p:
            np.testing.assert_allclose(buff.params[k], fa.params[k], rtol=1e-5, atol=1e-6)
    assert buff.version == fa.version == 6


def test_fedbuff_k1_equals_fedasync_with_staleness():
    """Same staleness weight on both sides: theta + 0.6 * (1 + 3)^-0.5 * delta."""
    p = params0()
    buff = core_for({"name": "fedbuff", "buffer_size": 1, "server_lr": 0.6, "staleness": "polynomial", "a": 0.5}, p)
    fa = core_for({"name": "fedasync", "alpha": 0.6, "staleness": "polynomial", "a": 0.5}, p)
    buff.version = fa.version = 3
    d = {k: np.full(v.shape, 1.0, np.float32) for k, v in p.items()}
    fa.receive([item(0, 0, {k: p[k] + d[k] for k in p})])
    buff.receive([item(0, 0, d, kind="delta")])
    for k in p:
        expected = p[k] + 0.3 * d[k]
        np.testing.assert_allclose(fa.params[k], expected, rtol=1e-6)
        np.testing.assert_allclose(buff.params[k], expected, rtol=1e-6)


def test_fedbuff_k_m_without_staleness_equals_fedavg():
    """K = m deltas from version 0, equal example counts, eta_g = 1 == FedAvg of the m models.
    (FedBuff weights only by staleness, so equal n_i is what makes the two coincide.)"""
    p = params0()
    m = 4
    buff = core_for({"name": "fedbuff", "buffer_size": m}, p)
    avg = core_for({"name": "fedavg"}, p)
    rng = np.random.default_rng(2)
    models = [perturb(p, rng) for _ in range(m)]
    for i, theta_i in enumerate(models):
        out = buff.receive([item(i, 0, sub(theta_i, p), n=25, kind="delta")])
        assert out["aggregated"] == (i == m - 1)
    avg.receive([item(i, 0, theta_i, n=25) for i, theta_i in enumerate(models)], force=True)
    assert buff.version == avg.version == 1
    for k in p:
        np.testing.assert_allclose(buff.params[k], avg.params[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(avg.params[k], np.mean([t[k] for t in models], axis=0), rtol=1e-6)


def _mlp_spec(hidden=(8, 6)):
    return kit.model_info("mlp", {"hidden": list(hidden)})


def test_masked_mean_with_full_masks_equals_fedavg():
    info, p = _mlp_spec()
    het = core_for({"name": "heterofl"}, p, info, model={"name": "mlp", "options": {"hidden": [8, 6]}})
    avg = core_for({"name": "fedavg"}, p)
    rng = np.random.default_rng(3)
    models = [perturb(p, rng) for _ in range(3)]
    full = {k: np.ones(v.shape, bool) for k, v in p.items()}
    ns = [5, 17, 40]
    het.receive([item(i, 0, t, n=n, mask=full) for i, (t, n) in enumerate(zip(models, ns))], force=True)
    avg.receive([item(i, 0, t, n=n) for i, (t, n) in enumerate(zip(models, ns))], force=True)
    for k in p:
        assert np.array_equal(het.params[k], avg.params[k])


# ------------------------------------------------------------------ hand-computed rules
def test_fedasync_mixes_only_covered_coordinates():
    p = {"w": np.zeros((2, 2), np.float32), "b": np.ones(2, np.float32)}
    core = core_for({"name": "fedasync", "alpha": 0.5, "staleness": "constant"}, p)
    mask = {"w": np.array([[True, False], [False, True]])}
    out = core.receive([item(0, 0, {"w": np.full((2, 2), 4.0, np.float32)}, mask=mask)])
    assert out["aggregated"] and core.version == 1
    assert np.array_equal(core.params["w"], np.array([[2.0, 0.0], [0.0, 2.0]], np.float32))
    assert np.array_equal(core.params["b"], p["b"])


def test_fedbuff_hand_computed_with_momentum():
    p = {"w": np.zeros(2, np.float32)}
    core = core_for({"name": "fedbuff", "buffer_size": 2, "server_lr": 0.5, "server_momentum": 0.5}, p)
    # aggregation 1 at version 0: deltas [2, 0] (tau 0, s 1) and [0, 4] (tau 0): step 0.5 * [2, 4] / 2
    core.receive([item(0, 0, {"w": np.array([2.0, 0.0], np.float32)}, kind="delta"),
                  item(1, 0, {"w": np.array([0.0, 4.0], np.float32)}, kind="delta")])
    assert np.allclose(core.params["w"], [0.5, 1.0])  # v = -[0.5, 1]
    # aggregation 2 at version 1: delta [4, 4] with tau 1 (s = 1/sqrt 2) and [0, 0] fresh
    core.receive([item(2, 0, {"w": np.array([4.0, 4.0], np.float32)}, kind="delta"),
                  item(3, 1, {"w": np.zeros(2, np.float32)}, kind="delta")])
    step = 0.5 * (4 / np.sqrt(2)) / 2  # target - theta
    # v = 0.5 * (-[0.5, 1]) - step ; theta = theta - v
    v = 0.5 * np.array([-0.5, -1.0]) - step
    assert np.allclose(core.params["w"], np.array([0.5, 1.0]) - v, rtol=1e-6)
    assert core.version == 2


def test_fedfix_weights_by_examples_and_staleness_then_mixes():
    p = {"w": np.zeros(1, np.float32)}
    core = core_for({"name": "fedfix", "staleness": "polynomial", "a": 1.0, "server_mix": 0.5, "interval_s": 5}, p)
    core.version = 1
    out = core.receive([item(0, 1, {"w": np.array([3.0], np.float32)}, n=10),   # tau 0: weight 10
                        item(1, 0, {"w": np.array([6.0], np.float32)}, n=40)])  # tau 1: weight 40 / 2
    assert not out["aggregated"] and out["buffer"] == 2  # only the interval tick aggregates
    out = core.receive([], force=True)
    assert out["aggregated"] and core.version == 2
    w_new = (10 * 3 + 20 * 6) / 30
    assert np.allclose(core.params["w"], 0.5 * w_new)
    assert not core.receive([], force=True)["aggregated"]  # an empty interval publishes nothing


# ------------------------------------------------------------------ safety
def test_duplicate_dispatch_id_changes_nothing():
    p = params0()
    core = core_for({"name": "fedasync"}, p)
    rng = np.random.default_rng(4)
    core.receive([item(7, 0, perturb(p, rng))])
    before = {k: v.copy() for k, v in core.params.items()}
    out = core.receive([item(7, 0, perturb(p, rng)), item(7, 1, perturb(p, rng))])
    assert out["results"] == [(7, "duplicate"), (7, "duplicate")]
    assert not out["aggregated"] and core.version == 1 and core.applied == 1
    assert core.rejected["duplicate"] == 2
    for k in p:
        assert np.array_equal(core.params[k], before[k])


def _bad_payloads(p):
    w, b = p["w"], p["b"]
    dense_b = Entry("dense", b.copy())
    nan_w = w.copy()
    nan_w[1, 2] = np.nan
    inf_b = b.copy()
    inf_b[0] = -np.inf
    return {
        "nan": ({"w": Entry("dense", nan_w), "b": dense_b}, "nonfinite", 10),
        "inf": ({"w": Entry("dense", w.copy()), "b": Entry("dense", inf_b)}, "nonfinite", 10),
        "shape": ({"w": Entry("dense", w.T.copy()), "b": dense_b}, "shape", 10),
        "dtype": ({"w": Entry("dense", w.astype(np.float64)), "b": dense_b}, "dtype", 10),
        "missing": ({"w": Entry("dense", w.copy())}, "missing_key", 10),
        "unknown": ({"w": Entry("dense", w.copy()), "b": dense_b, "zz": Entry("dense", b.copy())},
                    "unknown_key", 10),
        "index_range": ({"w": Entry("sparse", np.ones(2, np.float32), (np.array([3, 12], np.int32),)), "b": dense_b},
                        "mask_mismatch", 10),
        "index_length": ({"w": Entry("sparse", np.ones(3, np.float32), (np.array([0, 5], np.int32),)), "b": dense_b},
                         "mask_mismatch", 10),
        "index_duplicate": ({"w": Entry("sparse", np.ones(2, np.float32), (np.array([4, 4], np.int32),)),
                             "b": dense_b}, "mask_mismatch", 10),
        "slice_values": ({"w": Entry("slices", np.ones((2, 2), np.float32),
                                     (np.array([0, 1], np.int32), np.array([0], np.int32))), "b": dense_b},
                         "mask_mismatch", 10),
        "zero_examples": ({"w": Entry("dense", w.copy()), "b": dense_b}, "zero_examples", 0),
    }


@pytest.mark.parametrize("case", list(_bad_payloads(params0())))
@pytest.mark.parametrize("name", ["fedasync", "fedbuff"])
def test_bad_updates_are_rejected_and_later_ones_aggregate(case, name):
    p = params0()
    entries, reason, n = _bad_payloads(p)[case]
    core = core_for({"name": name, "buffer_size": 1} if name == "fedbuff" else {"name": name}, p)
    h = Update(dispatch_id=0, client_id=0, base_version=0, num_examples=n, kind="delta" if name == "fedbuff" else "model")
    out = core.receive([(h, Payload(entries), Expected(tuple(p), 0))])  # checked before its size
    assert out["results"] == [(0, reason)]
    assert not out["aggregated"] and core.version == 0 and core.pending == []
    assert core.rejected[reason] == 1
    for k in p:
        assert np.array_equal(core.params[k], p[k])
    good = {k: np.full(v.shape, 0.5, np.float32) for k, v in p.items()}
    out = core.receive([item(1, 0, good, kind="delta" if name == "fedbuff" else "model")])
    assert out["results"] == [(1, None)] and out["aggregated"] and core.version == 1
    assert all(np.isfinite(v).all() for v in core.params.values())


def test_client_error_is_rejected():
    p = params0()
    core = core_for({"name": "fedasync"}, p)
    h = Update(dispatch_id=0, client_id=0, base_version=0, num_examples=10, error="RuntimeError: boom")
    assert core.receive([(h, None, None)])["results"] == [(0, "client_error")]
    assert core.rejected == {"client_error": 1} and core.version == 0
    assert core.first_error == "RuntimeError: boom"  # kept for the summary and the warning
    h2 = Update(dispatch_id=1, client_id=1, base_version=0, num_examples=10, error="ValueError: later")
    core.receive([(h2, None, None)])
    assert core.first_error == "RuntimeError: boom"


def test_max_staleness_cutoff_rejects_stale():
    p = params0()
    core = core_for({"name": "fedasync", "max_staleness": 1}, p)
    rng = np.random.default_rng(5)
    core.receive([item(0, 0, perturb(p, rng)), item(1, 0, perturb(p, rng))])
    assert core.version == 2
    out = core.receive([item(2, 0, perturb(p, rng)), item(3, 1, perturb(p, rng))])
    assert out["results"] == [(2, "stale"), (3, None)] and out["staleness"] == [2, 1]
    assert core.rejected["stale"] == 1 and core.version == 3


# ------------------------------------------------------------------ checkpoint / restore
RESTORE_CASES = {
    "fedbuff": {"name": "fedbuff", "buffer_size": 3, "server_lr": 0.8, "server_momentum": 0.5},
    "fedasync": {"name": "fedasync", "staleness": "hinge", "a": 2.0, "b": 1.0},
    "fedfix": {"name": "fedfix", "interval_s": 10},
}


@pytest.mark.parametrize("case", list(RESTORE_CASES))
def test_restored_aggregator_continues_bitwise(case):
    method = RESTORE_CASES[case]
    p = params0()
    kind = "delta" if case == "fedbuff" else "model"
    rng = np.random.default_rng(6)
    stream = []  # (items, force) batches with staleness and a duplicate
    for i in range(12):
        base = max(0, i // 2 - 2)
        stream.append(([item(i, base, perturb(p, rng), n=5 + i, kind=kind)], i % 3 == 2))
    stream.insert(7, ([item(3, 0, perturb(p, rng), kind=kind)], False))  # a retried dispatch

    def run(core, batches):
        for items, force in batches:
            core.receive(items, force=force)

    straight = core_for(method, p)
    run(straight, stream)

    first = core_for(method, p)
    run(first, stream[:5])
    assert case != "fedbuff" or first.pending  # restore in the middle of a buffer
    blob = pickle.dumps(first.state_dict())
    resumed = core_for(method, params0(seed=99))  # a fresh process: other initial params
    resumed.load_state_dict(pickle.loads(blob))
    run(resumed, stream[5:])

    assert resumed.version == straight.version > 2
    assert resumed.rejected == straight.rejected and resumed.rejected["duplicate"] == 1
    assert resumed.applied == straight.applied
    for k in p:
        assert np.array_equal(resumed.params[k], straight.params[k])


# ------------------------------------------------------------------ deadline FedAvg
def test_deadline_rule():
    assert deadline_seconds(np.array([1.0, 2.0, 3.0, 10.0]), 1.5) == pytest.approx(3.75)
    assert deadline_seconds(np.array([]), 1.5) is None
    m = planner_for({"name": "fedavg_deadline"})
    assert m.deadline(np.array([4.0, 1.0, 2.0])) == pytest.approx(3.0)
    m2 = planner_for({"name": "fedavg_deadline", "deadline_factor": 1.0})
    assert m2.deadline(np.array([4.0, 1.0, 2.0])) == pytest.approx(2.0)
    assert planner_for({"name": "fedavg"}).deadline(np.array([1.0])) is None


# ------------------------------------------------------------------ HeteroFL
def test_speed_ratios_fastest_get_widest():
    speeds = [1.0, 3.0, 0.5, 2.0, 2.0, 0.1]
    r = speed_ratios(speeds, (0.25, 1.0, 0.5))
    # ranking (fastest first, ties by id): 1, 3, 4, 0, 2, 5
    assert r.tolist() == [0.5, 1.0, 0.25, 1.0, 0.5, 0.25]
    r = speed_ratios(speeds, (1.0, 0.5), proportions=(1 / 6, 5 / 6))
    assert r.tolist() == [0.5, 1.0, 0.5, 0.5, 0.5, 0.5]


HETERO_DEVICES = {"tiers": [{"name": "slow", "fraction": 0.5, "speed_range": [0.2, 0.6]},
                            {"name": "fast", "fraction": 0.5, "speed_range": [1.0, 3.0]}]}


def _heterofl_cfg(**method):
    return cfg_for({"name": "heterofl", **method}, num_clients=10, model={"name": "mlp", "options": {"hidden": [8, 6]}},
                   devices=HETERO_DEVICES)


def test_heterofl_plans_width_slices_by_speed():
    info, p = _mlp_spec()
    spec = info.try_spec()
    cfg = _heterofl_cfg()
    m = kit.planner_for(cfg, info)
    prof = population.profiles(cfg)
    order = sorted(range(10), key=lambda c: (-prof[c].speed, c))
    ratios = [m.ratio(c) for c in order]
    assert ratios == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625]
    flops = {}
    channel = Channel(info.like)
    for c in range(10):
        a = m.plan(c, 0)
        sub = a.submodel
        r = m.ratio(c)
        h1, h2 = (max(1, int(np.ceil(r * 8))), max(1, int(np.ceil(r * 6))))
        assert [len(sub.keep[g.layer]) for g in spec.groups] == [h1, h2]
        assert all(np.array_equal(sub.keep[g.layer], np.arange(len(sub.keep[g.layer]))) for g in spec.groups)
        assert a.setting("scale") == r and sub.download is sub.mask and dict(a.info) == {"width": r}
        assert int(sub.mask["layers.0.weight"].sum()) == h1 * 64
        assert int(sub.mask["layers.1.weight"].sum()) == h2 * h1
        covered = sum(int(v.sum()) for v in sub.mask.values())
        n_sub = sum(int(np.prod(s)) for s in spec.compact_shapes(sub.keep).values())
        assert covered == n_sub  # mask = exactly the compact model's coordinates
        cost = sub.cost(info, channel)
        flops[r] = cost.flops_per_example
        assert cost.sparse_factor == 1.0  # a physically smaller model runs dense kernels
    assert flops[1.0] == spec.train_flops(spec.layer_names, 1)
    assert flops[1.0] > flops[0.5] > flops[0.25] > flops[0.0625] > 0


def test_heterofl_tier_assignment_and_missing_tier():
    info, _ = _mlp_spec()
    cfg = _heterofl_cfg(assign="tier", tier_ratios={"slow": 0.25, "fast": 1.0})
    m = kit.planner_for(cfg, info)
    assert [m.ratio(c) for c in range(10)] == [0.25 if q.tier == "slow" else 1.0 for q in population.profiles(cfg)]
    with pytest.raises(ConfigError, match="method.tier_ratios: no ratio for device tier"):
        kit.planner_for(_heterofl_cfg(assign="tier", tier_ratios={"slow": 0.25}), info)


def test_heterofl_masked_mean_over_slices():
    info, p = _mlp_spec()
    m = kit.planner_for(_heterofl_cfg(), info)
    wide, narrow = m.submodel(1.0).mask, m.submodel(0.5).mask
    core = kit.core_for(_heterofl_cfg(), p, info)
    a = {k: np.full(v.shape, 1.0, v.dtype) for k, v in p.items()}
    b = {k: np.full(v.shape, 4.0, v.dtype) for k, v in p.items()}
    core.receive([item(0, 0, a, n=10, mask=wide), item(1, 0, b, n=30, mask=narrow)], force=True)
    for k, v in core.params.items():
        both = narrow[k]
        assert np.allclose(v[both], (10 * 1 + 30 * 4) / 40)
        assert np.allclose(v[~both], 1.0)
    core = kit.core_for(_heterofl_cfg(weight="count"), p, info)
    core.receive([item(0, 0, a, n=10, mask=wide), item(1, 0, b, n=30, mask=narrow)], force=True)
    assert np.allclose(core.params["layers.0.bias"][:4], 2.5)
    assert np.allclose(core.params["layers.0.bias"][4:], 1.0)


def test_heterofl_static_bn_keeps_running_stats():
    info, p = kit.model_info("vgg11", {"width": 0.0625}, input_shape=(3, 32, 32))
    spec = info.try_spec()
    stats = [k for k in p if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    counter = next(k for k in stats if k.endswith("num_batches_tracked"))
    assert encode({counter: p[counter]}).entries[counter].values.shape == ()  # 0-d tensors stay 0-d on the wire
    assert stats and set(stats) == set(spec.buffer_keys)
    cfgs = dict(num_clients=10, model={"name": "vgg11", "options": {"width": 0.0625}})
    upd = {k: (np.full(v.shape, 3, v.dtype)) for k, v in p.items()}
    full = {k: np.ones(v.shape, bool) for k, v in p.items()}
    static = core_for({"name": "heterofl"}, p, info, **cfgs)
    static.receive([item(0, 0, upd, mask=full)], force=True)
    mean = core_for({"name": "heterofl", "bn_stats": "mean"}, p, info, **cfgs)
    mean.receive([item(0, 0, upd, mask=full)], force=True)
    for k in p:
        if k in stats:
            assert np.array_equal(static.params[k], p[k])
            assert np.all(mean.params[k] == 3)
        else:
            assert np.all(static.params[k] == 3) and np.all(mean.params[k] == 3)


# ------------------------------------------------------------------ config validation
@pytest.mark.parametrize("method,field", [
    ({"name": "fedasync", "alpha": 0.0}, "method.alpha"),
    ({"name": "fedasync", "alpha": 1.5}, "method.alpha"),
    ({"name": "fedasync", "staleness": "nope"}, "method.staleness"),
    ({"name": "fedasync", "staleness": "constant", "a": 1.0}, "method.a"),
    ({"name": "fedasync", "staleness": "polynomial", "b": 1.0}, "method.b"),
    ({"name": "fedasync", "a": -1.0}, "method.a"),
    ({"name": "fedasync", "concurrency": 0}, "method.concurrency"),
    ({"name": "fedasync", "max_staleness": -1}, "method.max_staleness"),
    ({"name": "fedbuff", "buffer_size": 0}, "method.buffer_size"),
    ({"name": "fedbuff", "server_lr": 0}, "method.server_lr"),
    ({"name": "fedbuff", "server_momentum": 1.0}, "method.server_momentum"),
    ({"name": "fedbuff", "staleness": "inv_sqrt", "a": 0.5}, "method.a"),
    ({"name": "fedfix", "interval_s": 0}, "method.interval_s"),
    ({"name": "fedfix", "server_mix": 0}, "method.server_mix"),
    ({"name": "fedavg_deadline", "deadline_factor": 0.9}, "method.deadline_factor"),
    ({"name": "heterofl", "ratios": [1.0, 0.0]}, "method.ratios"),
    ({"name": "heterofl", "ratios": [1.0, 1.0]}, "method.ratios"),
    ({"name": "heterofl", "ratios": []}, "method.ratios"),
    ({"name": "heterofl", "assign": "random"}, "method.assign"),
    ({"name": "heterofl", "assign": "tier"}, "method.tier_ratios"),
    ({"name": "heterofl", "tier_ratios": {"a": 2}}, "method.tier_ratios.a"),
    ({"name": "heterofl", "ratios": [1, 0.5], "proportions": [1.0]}, "method.proportions"),
    ({"name": "heterofl", "weight": "bytes"}, "method.weight"),
    ({"name": "heterofl", "bn_stats": "running"}, "method.bn_stats"),
    ({"name": "fedbuff", "K": 3}, "method.K"),
])
def test_bad_method_params_name_the_field(method, field):
    with pytest.raises(ConfigError) as e:
        cfg_for(method)
    assert e.value.field == field


def test_defaults_and_hooks():
    from fedray.methods import registry

    fa, fas = planner_for({"name": "fedasync"}, server={"clients_per_round": 7}), server_for({"name": "fedasync"})
    assert (fa.params.alpha, fa.params.staleness, registry.get("fedasync").schedule) == (0.6, "polynomial", "async")
    assert fa.concurrency() == 7 and fas.max_staleness() is None and fas.trigger(1)
    assert fas.staleness_weight(3, 0) == pytest.approx(0.5)
    method = {"name": "fedbuff", "concurrency": 20, "max_staleness": 4}
    fb, fbs = planner_for(method), server_for(method)
    assert (fb.params.buffer_size, fb.params.staleness, fb.plan(3, 0).send) == (10, "inv_sqrt", "delta")
    assert fb.concurrency() == 20 and fbs.max_staleness() == 4
    assert not fbs.trigger(9) and fbs.trigger(10)
    assert fbs.staleness_weight(5, 2) == pytest.approx(0.5)
    ff, ffs = planner_for({"name": "fedfix", "interval_s": 12.5}), server_for({"name": "fedfix", "interval_s": 12.5})
    assert registry.get("fedfix").schedule == "interval" and ff.interval_s() == 12.5 and not ffs.trigger(100)
    hinge = server_for({"name": "fedasync", "staleness": "hinge", "a": 1.0, "b": 2.0})
    assert hinge.staleness_weight(2, 0) == 1.0 and hinge.staleness_weight(5, 0) == pytest.approx(0.25)
