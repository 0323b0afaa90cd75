"""Pruning methods (CLAMP family, PR-FL, CA-HFP, AutoFLIP) at method and AggregatorCore level, no Ray."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest

from fedray.aggregation import rules
from fedray.channel import Channel
from fedray.client.worker import ClientWorker, Task
from fedray.config import from_dict
from fedray.errors import ConfigError
from fedray.methods.base import Entry, RoundRecord
from fedray.models.spec import model_spec
from fedray.pruning.magnitude import prunable_keys
from fedray.pruning.progressive import importance_scores, residual_split
from fedray.submodel import masks as M
from fedray.submodel.encode import Payload, decode, encode
from fedray.update import Update
from fedray.devices import population
from tests import kit

HIDDEN = (8, 6)  # MLP 64 -> 8 -> 6 -> 10: L = 3 layers


def cfg_for(method: dict, **sections):
    data = {"method": method, "data": {"name": "digits", "num_clients": sections.pop("num_clients", 10)},
            "model": {"name": "mlp", "options": {"hidden": list(HIDDEN)}}}
    data.update(sections)
    return from_dict(data)


def setup_model(seed=0):
    """``(ModelInfo, params)`` of the 3-layer MLP; ``info.try_spec()`` is its spec."""
    return kit.model_info("mlp", {"hidden": list(HIDDEN)}, seed=seed)


def planner_for(method: dict, info, **sections):
    return kit.planner_for(cfg_for(method, **sections), info)


def core_for(method: dict, params, info, **sections):
    return kit.core_for(cfg_for(method, **sections), params, info)


def item(did, client, values, mask=None, n=10, base=0, telemetry=None, aux=None):
    h = Update(dispatch_id=did, client_id=client, base_version=base, num_examples=n, telemetry=telemetry or {})
    p = encode(values, mask)
    return h, Payload(p.entries, aux or {}), None


def shifted(params, value):
    return {k: np.full_like(v, value) for k, v in params.items()}


def header(client, round_s, battery=1.0):
    return Update(dispatch_id=0, client_id=client, base_version=0, num_examples=1,
                  telemetry={"round_s": round_s, "comm_s": round_s, "battery": battery})


# ------------------------------------------------------------------ MA-CLAMP / CLAMP server rules


def layer_keys(spec, i):
    return spec.layers[i].keys


def depth_items(planner, params, depths, values, ns):
    out = []
    for i, (d, v, n) in enumerate(zip(depths, values, ns)):
        a = planner.plan(i, 0)
        assert dict(a.info)["depth"] == planner.depth(i)
        out.append(item(i, i, shifted(params, v), planner.mask_for(d), n=n))
    return out


def test_ma_clamp_rho_half_updates_layer_trained_by_two_keeps_layer_trained_by_one():
    info, params = setup_model()
    spec = info.try_spec()
    method = {"name": "ma_clamp", "rho": 0.5}
    core = core_for(method, params, info, server={"clients_per_round": 5})
    planner = planner_for(method, info, server={"clients_per_round": 5})
    # depths 1,1,1,2,3: layer 2 trained by 5, layer 1 by 2 (threshold max(1, floor(2.5)) = 2), layer 0 by 1
    values, ns = [1.0, 2.0, 3.0, 4.0, 5.0], [10, 10, 10, 10, 30]
    res = core.receive(depth_items(planner, params, [1, 1, 1, 2, 3], values, ns), force=True)
    assert res["aggregated"]
    new = core.params
    for k in layer_keys(spec, 2):
        np.testing.assert_allclose(new[k], (10 + 20 + 30 + 40 + 150) / 70)
    for k in layer_keys(spec, 1):
        np.testing.assert_allclose(new[k], (4.0 * 10 + 5.0 * 30) / 40)
    for k in layer_keys(spec, 0):
        np.testing.assert_array_equal(new[k], params[k])
    # layer-level inclusion: depth 1 keeps its one layer, depth 2 both, depth 3 loses layer 0
    assert res["included"] == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: pytest.approx(2 / 3)}


def test_ma_clamp_rho_08_keeps_layer_trained_by_three():
    info, params = setup_model()
    spec = info.try_spec()
    method = {"name": "ma_clamp", "rho": 0.8}
    core = core_for(method, params, info, server={"clients_per_round": 5})
    # threshold max(1, floor(4.0)) = 4: layer 1 is trained by 3 (depths 2,3,3) -> kept
    core.receive(depth_items(planner_for(method, info), params, [1, 1, 2, 3, 3], [1.0] * 5, [10] * 5), force=True)
    for k in layer_keys(spec, 1) + layer_keys(spec, 0):
        np.testing.assert_array_equal(core.params[k], params[k])
    for k in layer_keys(spec, 2):
        np.testing.assert_allclose(core.params[k], 1.0)


def _depth_entries(planner, params, depths_values):
    return [Entry(Update(i, i, 0, 10), rules.Contribution(shifted(params, v), planner.mask_for(d), 10.0))
            for i, (d, v) in enumerate(depths_values)]


def test_ma_clamp_counts_selected_clients_that_did_not_arrive():
    info, params = setup_model()
    method = {"name": "ma_clamp", "rho": 0.5}
    server, planner = kit.server_for(cfg_for(method), info), planner_for(method, info)
    # only 2 of the 5 selected arrive; layer 1 is trained by 1 < 2 -> kept, layer 2 by 2 -> averaged
    entries = _depth_entries(planner, params, [(1, 1.0), (2, 3.0)])
    new = server.aggregate(params, entries, RoundRecord(0, selected=(0, 1, 2, 3, 4), dropped=(2, 3, 4))).params
    np.testing.assert_allclose(new["layers.2.weight"], 2.0)
    np.testing.assert_array_equal(new["layers.1.weight"], params["layers.1.weight"])


def test_ma_clamp_threshold_uses_the_rounds_real_selected_set():
    """Regression: |S| was max(arrivals, clients_per_round). With 10 per round but only 3
    clients available, the threshold was max(1, floor(0.5 * 10)) = 5 and no layer could ever
    be updated; the round's selected set (3) gives a threshold of 1."""
    info, params = setup_model()
    method = {"name": "ma_clamp", "rho": 0.5}
    cfg = cfg_for(method, server={"clients_per_round": 10})
    server, planner = kit.server_for(cfg, info), kit.planner_for(cfg, info)
    entries = _depth_entries(planner, params, [(1, 1.0), (1, 2.0), (2, 3.0)])
    res = server.aggregate(params, entries, RoundRecord(0, selected=(0, 1, 2)))
    np.testing.assert_allclose(res.params["layers.2.weight"], 2.0)
    np.testing.assert_allclose(res.params["layers.1.weight"], 3.0)  # trained by 1 >= max(1, floor(1.5))
    assert res.included == {0: 1.0, 1: 1.0, 2: 1.0}


def test_ma_clamp_masks_carry_every_batchnorm_statistic():
    info, _ = kit.model_info("vgg11", {"batch_norm": True, "width": 1 / 64}, input_shape=(3, 32, 32))
    spec = info.try_spec()
    m = planner_for({"name": "ma_clamp", "initial_depth": 1}, info)
    stats = [k for k in spec.buffer_keys if "running" in k or "num_batches" in k]
    assert stats and set(stats) <= set(m.mask_for(1))
    assert set(m.plan(0, 0).submodel.trainable) == set(k for k in spec.layers[-1].keys if k in spec.param_keys)
    clamp = planner_for({"name": "clamp"}, info)
    assert not set(stats) & set(clamp.mask_for(1))


def test_clamp_updates_only_the_common_depth():
    info, params = setup_model()
    spec = info.try_spec()
    core = core_for({"name": "clamp"}, params, info)
    res = core.receive(depth_items(planner_for({"name": "clamp"}, info), params, [1, 2, 3], [1.0, 2.0, 3.0],
                                   [10, 20, 30]), force=True)
    for k in layer_keys(spec, 2):
        np.testing.assert_allclose(core.params[k], (10 + 40 + 90) / 60)
    for k in layer_keys(spec, 0) + layer_keys(spec, 1):
        np.testing.assert_array_equal(core.params[k], params[k])
    assert res["included"] == {0: 1.0, 1: 0.5, 2: pytest.approx(1 / 3)}  # only the common depth counts


# ------------------------------------------------------------------ depth controller


def test_depth_plan_trains_and_sends_only_the_last_d_layers():
    info, _ = setup_model()
    spec = info.try_spec()
    m = planner_for({"name": "clamp", "initial_depth": 5}, info)  # capped at L = 3
    assert dict(m.plan(0, 0).info)["depth"] == 3
    m = planner_for({"name": "clamp", "initial_depth": 2}, info)
    a = m.plan(4, 0)
    assert dict(a.info)["depth"] == 2
    sub = a.submodel
    assert set(sub.trainable) == set(layer_keys(spec, 1) + layer_keys(spec, 2))
    assert set(sub.mask) == set(sub.trainable) and all(v.all() for v in sub.mask.values())
    assert sub.cost(info, Channel(info.like)).flops_per_example == spec.train_flops(
        [spec.layers[1].name, spec.layers[2].name], 1)
    flops = spec.train_flops([spec.layers[1].name, spec.layers[2].name], 1)
    assert flops < spec.train_flops(spec.layer_names, 1)


def test_depth_controller_hysteresis_through_observe():
    info, _ = setup_model()
    m = planner_for({"name": "ma_clamp", "initial_depth": 2, "threshold_reference": "own"}, info)
    depth = lambda: dict(m.plan(0, 0).info)["depth"]  # noqa: E731
    m.observe(header(0, 1.0))  # calibration: thresholds (0.75, 1.25); 1.0 is a "stay"
    assert depth() == 2
    m.observe(header(0, 2.0))
    m.observe(header(0, 2.0))
    assert depth() == 2  # two "-1" suggestions: not yet
    m.observe(header(0, 1.0))  # "stay" resets the streak
    m.observe(header(0, 2.0))
    m.observe(header(0, 2.0))
    assert depth() == 2
    m.observe(header(0, 2.0))
    assert depth() == 1  # third consecutive "-1"
    for _ in range(2):
        m.observe(header(0, 0.5))
    assert depth() == 1
    m.observe(header(0, 0.5))
    assert depth() == 2  # three "+1"
    for _ in range(3):  # low battery suggests a smaller depth even at a fast round time
        m.observe(header(0, 0.5, battery=0.1))
    assert depth() == 1
    assert dict(m.plan(1, 0).info)["depth"] == 2  # other clients untouched


def test_depth_thresholds_follow_the_federation_median():
    info, _ = setup_model()
    m = planner_for({"name": "clamp", "initial_depth": 2}, info)
    for c in range(1, 5):
        m.observe(header(c, 1.0))
    for _ in range(3):
        m.observe(header(0, 3.0))  # 3 x the federation median: above T_high = 1.25
    assert dict(m.plan(0, 0).info)["depth"] == 1
    assert all(dict(m.plan(c, 0).info)["depth"] == 2 for c in range(1, 5))


def test_fedpmt_fixed_and_feddrop_random_depths():
    info, _ = setup_model()
    pmt = planner_for({"name": "fedpmt", "depth": 2}, info)
    assert {dict(pmt.plan(c, v).info)["depth"] for c in range(5) for v in range(3)} == {2}
    with pytest.raises(ConfigError, match="method.depth"):
        planner_for({"name": "fedpmt", "depth": 4}, info)
    drop = planner_for({"name": "feddrop"}, info)
    depths = [dict(drop.plan(c, v).info)["depth"] for c in range(10) for v in range(10)]
    assert set(depths) == {1, 2, 3}
    again = planner_for({"name": "feddrop"}, info)
    assert depths == [dict(again.plan(c, v).info)["depth"] for c in range(10) for v in range(10)]


# ------------------------------------------------------------------ PR-FL


def prfl_pair(info, params, **p):
    method = {"name": "prfl", **p}
    core = core_for(method, params, info)
    driver = planner_for(method, info)
    driver.receive(core.message)
    return core, driver


def test_prfl_masks_nest_and_residual_pieces_are_counted():
    info, params = setup_model()
    spec = info.try_spec()
    core, driver = prfl_pair(info, params)
    plans = [driver.plan(c, 0).submodel for c in range(10)]
    assert all(a.mask is a.download for a in plans)
    # squared gradients travel over the mask: one value per covered coordinate of each prunable key
    for a in plans:
        assert {e.name: e.over for e in a.extras} == {f"sq_grads/{k}": k for k in prunable_keys(spec) if a.mask[k].any()}
    dens = [dict(driver.plan(c, 0).info)["density"] for c in range(10)]
    assert dens[0] == 1.0 and dens[6] < dens[4] < dens[2] < 1.0
    order = sorted(range(10), key=lambda c: dens[c])
    for i, j in zip(order, order[1:]):
        assert M.is_subset(plans[i].mask, plans[j].mask)
    # BatchNorm-free MLP: every key is prunable; densities are met on the prunable coordinates
    keys = list(prunable_keys(spec))
    assert M.density(plans[2].mask, params, keys) == pytest.approx(0.6, abs=1e-3)
    channel = Channel(info.like)
    levels = [plans[c].mask for c in (6, 4, 2, 0)]
    piece_bytes = [channel.mask_nbytes(p) for p in residual_split(levels)]
    expected = list(np.cumsum(piece_bytes))
    assert [channel.downlink_nbytes(plans[c]) for c in (6, 4, 2, 0)] == expected
    assert expected == sorted(expected)
    # each piece costs its client a little more than its own mask would ...
    for c, down in zip((6, 4, 2, 0), expected):
        assert channel.mask_nbytes(plans[c].mask) <= down <= 1.13 * channel.mask_nbytes(plans[c].mask)
    # ... but the server sends every piece of a version once: egress below sending each client its submodel
    sent = set()
    egress = sum(channel.egress(plans[c].pieces, channel.downlink_nbytes(plans[c]), 0, sent) for c in range(10))
    assert egress == sum(piece_bytes) < sum(channel.mask_nbytes(plans[c].mask) for c in range(10))


def test_prfl_maskfedavg_over_the_cache_matches_hand_computation():
    info, params = setup_model()
    core = core_for({"name": "prfl", "eta_g": 0.5, "a": 0.6}, params, info)
    k = "layers.2.bias"
    old = params[k].copy()
    mask_a = {k: np.array([True, True, False] + [False] * 7)}
    mask_b = {k: np.array([True, False, False] + [False] * 7)}
    va = {k: np.full(10, 1.0, dtype=np.float32)}
    vb = {k: np.full(10, 3.0, dtype=np.float32)}
    core.receive([item(0, 0, va, mask_a, n=10, base=0)], force=True)  # v = 0: only A, s = 1
    t1 = 0.5 * old + 0.5 * np.where(mask_a[k], 1.0, old)
    np.testing.assert_allclose(core.params[k], t1, rtol=1e-6)
    core.receive([item(1, 1, vb, mask_b, n=30, base=1)], force=True)  # v = 1: A (stale, cached) and B
    s_a, s_b = 2.0 ** -0.6, 1.0
    p_a, p_b = s_a / (s_a + s_b), s_b / (s_a + s_b)
    w0 = (p_a * 10 * 1.0 + p_b * 30 * 3.0) / (p_a * 10 + p_b * 30)
    w_new = t1.copy()
    w_new[0], w_new[1] = w0, 1.0  # coordinate 1: only A covers it; 2..9: nobody, keep
    np.testing.assert_allclose(core.params[k], 0.5 * t1 + 0.5 * w_new, rtol=1e-6)
    assert core.version == 2 and sorted(core.server.state.cache) == [0, 1]


def test_prfl_scores_from_squared_gradients_flow_to_the_driver():
    info, params = setup_model()
    spec = info.try_spec()
    core, driver = prfl_pair(info, params, recompute_every=2, layer_floor=0.0)
    rng = np.random.default_rng(0)
    ups = []
    for i in range(2):
        sq = {k: rng.random(params[k].shape) * (i + 1) for k in prunable_keys(spec)}
        ups.append(sq)
        aux = {f"sq_grads/{k}": v.astype(np.float32) for k, v in sq.items()}
        res = core.receive([item(i, i, params, None, aux=aux)], force=True)
        assert ("messages" in res) == (i == 1)  # sent every I = 2 aggregations
    scores = res["messages"][0]["scores"]
    ref = importance_scores(ups, params, list(prunable_keys(spec)))
    flat = np.concatenate([scores[k].ravel() for k in prunable_keys(spec)])
    flat_ref = np.concatenate([ref[k].ravel() for k in prunable_keys(spec)])
    np.testing.assert_allclose(flat / flat.sum(), flat_ref / flat_ref.sum(), rtol=1e-5)
    driver.receive(res["messages"][0])
    top = driver.plan(6, 0).submodel.mask  # density 0.1: the best-scored coordinates
    k0 = max(prunable_keys(spec), key=lambda k: flat_ref.max() == ref[k].max())
    assert top[k0].reshape(-1)[int(np.argmax(ref[k0]))]


def test_prfl_densities_from_round_times_and_recovery_on_plateau():
    info, params = setup_model()
    core, driver = prfl_pair(info, params, rho_min=0.1, delta_rho=0.2)
    st = driver.state
    assert dict(driver.plan(7, 0).info)["density"] == pytest.approx(0.1, abs=2e-3)
    for c, t in [(0, 1.0), (1, 2.0), (2, 4.0)]:
        driver.observe(header(c, t))
        driver.observe(header(c, t))
    driver.replan()
    assert st.rho[0] == 1.0 and st.rho[1] == 0.5 and st.rho[2] == 0.25
    assert st.rho[7] == 0.1  # not observed yet: its starting density
    driver.receive({"plateau": True})  # the server saw a plateau: recovery
    assert st.rho_min == pytest.approx(0.3)
    assert st.rho[7] == pytest.approx(0.3) and st.rho[2] == pytest.approx(0.3)
    assert dict(driver.plan(7, 0).info)["density"] == pytest.approx(0.3, abs=2e-3)
    assert not driver.finished()
    for step in range(4):  # 0.3 -> 0.5 -> 0.7 -> 0.9 -> 1.0, a recovery at every plateau
        driver.receive({"plateau": True})
    assert st.rho_min == 1.0 and all(r == 1.0 for r in st.rho.values()) and not driver.finished()
    driver.receive({"plateau": True})  # a last plateau with every density at 1: PR-FL's training ends
    assert driver.finished()


class _Scores:
    """An evaluator that returns the next of a list of accuracies (and sees nothing)."""

    task = SimpleNamespace(primary="accuracy")

    def __init__(self, scores):
        self.scores = list(scores)

    def __call__(self, params):
        return {"accuracy": self.scores.pop(0), "loss": 0.0}


def test_prfl_recovery_reloads_the_best_model_and_empties_the_cache():
    """Regression: a plateau only raised rho_min; the authors' code also reloads the best
    global model so far. Patience counts evaluations (checks), 10 by default as published."""
    from fedray.methods.prfl import PRFLParams

    assert PRFLParams().patience == 10
    info, params = setup_model()
    core, driver = prfl_pair(info, params, patience=2)
    core.evaluator = _Scores([0.8, 0.5, 0.5, 0.9])
    k = "layers.2.bias"
    ones = shifted(params, 1.0)
    core.receive([item(0, 0, ones, None)], force=True)  # v1: the cache {0: ones}; evaluated 0.8 (best)
    assert all(np.array_equal(v, ones[key]) for key, v in core.server.state.best.items())
    for did, client in ((1, 1), (2, 4)):  # two evaluations without improvement: a plateau
        res = core.receive([item(did, client, shifted(params, 2.0), None, base=did)], force=True)
        assert "messages" not in res
    assert core.server.state.reload and not np.allclose(core.params[k], 1.0)
    mask = {k: np.array([True] + [False] * 9)}
    res = core.receive([item(3, 2, {k: np.full(10, 3.0, dtype=np.float32)}, mask, base=3)], force=True)
    assert res["messages"] == [{"plateau": True}]
    assert sorted(core.server.state.cache) == [2]  # emptied, then the new arrival
    expect = {key: v.copy() for key, v in ones.items()}
    expect[k][0] = 3.0  # the arrival's coordinate; everything else: the best model (ones), not the cache mean
    assert all(np.allclose(core.params[key], expect[key]) for key in expect)
    rho_min = driver.state.rho_min
    driver.receive(res["messages"][0])
    assert driver.state.rho_min == pytest.approx(rho_min + 0.2)


def test_prfl_densities_come_from_communication_times_by_default():
    """Regression: densities came from total round times; the paper allocates by
    communication times (``time_source: round`` keeps the old rule as an option)."""
    info, params = setup_model()
    for source, expect in (("comm", 0.25), ("round", 0.5)):
        _, driver = prfl_pair(info, params, time_source=source)
        for c, (round_s, comm_s) in enumerate([(2.0, 1.0), (4.0, 4.0)]):
            driver.observe(Update(0, c, 0, 1, telemetry={"round_s": round_s, "comm_s": comm_s}))
        driver.replan()
        assert driver.state.rho[0] == 1.0 and driver.state.rho[1] == pytest.approx(max(expect, 0.1))


def test_prfl_state_survives_a_checkpoint():
    info, params = setup_model()
    core, driver = prfl_pair(info, params)
    core.receive([item(0, 3, shifted(params, 1.0), None)], force=True)
    other = core_for({"name": "prfl"}, params, info)
    other.load_state_dict(core.state_dict())
    assert sorted(other.server.state.cache) == [3] and other.server.state.aggregations == 1
    driver.observe(header(4, 2.0))
    again = planner_for({"name": "prfl"}, info)
    again.load_state_dict(pickle.loads(pickle.dumps(driver.state_dict())))
    assert again.state.fifo == driver.state.fifo
    assert all(M.equal(again.plan(c, 0).submodel.mask, driver.plan(c, 0).submodel.mask) for c in range(10))


def test_prfl_extra_arrays_with_a_bad_shape_are_rejected_with_a_reason():
    """Regression: an update whose squared gradients had the wrong shape crashed the
    aggregator; the channel now rejects anything but the declared extra arrays."""
    info, params = setup_model()
    core, driver = prfl_pair(info, params)
    sub = driver.plan(6, 0).submodel
    channel = Channel(info.like)
    good_values = {k: np.where(m, 1.0, 0.0).astype(np.float32) for k, m in sub.mask.items()}
    sq = {e.name: np.ones(int(sub.mask[e.over].sum()), np.float32) for e in sub.extras}
    nbytes = channel.uplink_nbytes(sub, info)
    expected = channel.expected(sub, nbytes, info)

    def send(did, aux):
        h = Update(dispatch_id=did, client_id=6, base_version=0, num_examples=10)
        return core.receive([(h, channel.encode(good_values, sub.mask, aux), expected)], force=True)

    name = sub.extras[0].name
    bad_shape = {**sq, name: np.ones((3, 3), np.float32)}
    assert send(0, bad_shape)["results"] == [(0, "size")]  # a different size is caught first
    same_size = {**sq, name: np.ones(sq[name].size, np.float64)[: sq[name].size // 2]}
    assert send(1, same_size)["results"][0][1] in ("size", "extras")
    renamed = {("x" + k if k == name else k): v for k, v in sq.items()}
    assert send(2, renamed)["results"] == [(2, "extras")]
    nan = {**sq, name: np.full(sq[name].size, np.nan, np.float32)}
    assert send(3, nan)["results"] == [(3, "extras")]
    res = send(4, sq)
    assert res["results"] == [(4, None)] and res["aggregated"]
    assert core.rejected["extras"] >= 2 and core.version == 1


# ------------------------------------------------------------------ CA-HFP


def test_cahfp_keep_ratios_by_tier_and_by_speed():
    info, _ = setup_model()
    method = {"name": "cahfp", "tier_ratios": {"very_slow": 0.4, "normal": 0.6, "very_fast": 1.0}}
    cfg = cfg_for(method, devices={"tiers": "clamp"}, num_clients=20)
    m = kit.planner_for(cfg, info)
    tiers = [p.tier for p in population.profiles(cfg)]
    want = {"very_slow": 0.4, "normal": 0.6, "very_fast": 1.0}
    assert [dict(m.plan(c, 0).info)["keep_ratio"] for c in range(20)] == [want[t] for t in tiers]
    with pytest.raises(ConfigError, match="method.tier_ratios"):
        planner_for({"name": "cahfp", "tier_ratios": {"normal": 0.5}}, info, devices={"tiers": "clamp"})
    cfg = cfg_for({"name": "cahfp"}, devices={"tiers": "clamp"}, num_clients=20)
    by_speed = kit.planner_for(cfg, info)
    speeds = [p.speed for p in population.profiles(cfg)]
    ratio = [dict(by_speed.plan(c, 0).info)["keep_ratio"] for c in range(20)]
    assert ratio[int(np.argmax(speeds))] == 1.0 and ratio[int(np.argmin(speeds))] == 0.4
    assert sorted(ratio) == [0.4] * 5 + [0.6] * 5 + [0.8] * 5 + [1.0] * 5


def test_cahfp_client_trains_a_physically_smaller_model_and_reconstructs_it():
    info, params = setup_model()
    spec = info.try_spec()
    cfg = cfg_for({"name": "cahfp", "ratios": [0.5]}, train={"batch_size": 8, "local_epochs": 1})
    planner = kit.planner_for(cfg, info, examples=np.full(10, 40))
    a = planner.plan(0, 0)
    sub = a.submodel
    assert sub.widths == {"layers.0": 4, "layers.1": 3} and a.setting("keep_ratio") == 0.5
    channel = Channel(info.like)
    cost = sub.cost(info, channel)
    full = spec.train_flops(spec.layer_names, 1)
    assert cost.flops_per_example <= 0.6 * full
    # the scoring pass is costed: forward and backward of the full model on the scored examples
    assert sub.extra_flops == 4 * 8 * full and cost.extra_flops == sub.extra_flops
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=40).astype(np.int64)
    worker = ClientWorker(cfg, {"x": x, "y": y}, [np.arange(40)], (64,), 10)
    u = worker.run_task(params, Task(0, 0, a))
    assert u.error is None
    kept = {k[len("kept/"):]: v for k, v in u.payload.aux.items() if k.startswith("kept/")}
    assert {g: len(v) for g, v in kept.items()} == {"layers.0": 4, "layers.1": 3}
    (compact,) = worker._compact.values()
    state = {k: v.detach().numpy() for k, v in compact.state_dict().items()}
    assert state["layers.0.weight"].shape == (4, 64) and state["layers.1.weight"].shape == (3, 4)
    assert state["layers.2.weight"].shape == (10, 3)
    assert sum(v.size for v in state.values()) <= 0.6 * sum(v.size for v in params.values())
    cspec = model_spec(compact, (64,))
    assert cspec.train_flops(cspec.layer_names, 1) == cost.flops_per_example
    # the payload holds the compact tensors, written back at their original indices
    values, mask = decode(u.payload, spec.shapes)
    index = spec.slice_index({g: v.astype(np.int64) for g, v in kept.items()})
    for k in params:
        np.testing.assert_array_equal(values[k][np.ix_(*index[k])], state[k])
        assert mask[k].sum() == state[k].size and mask[k][np.ix_(*index[k])].all()
    # regression: the kept indices are part of the predicted upload (virtual time = totals)
    assert u.bytes_up == cost.bytes_up == u.payload.nbytes
    # server: masked mean over the clients' masks; the channel accepts exactly the declared payload
    core = kit.core_for(cfg, params, info)
    res = core.receive([(u.header(), u.payload, channel.expected(sub, cost.bytes_up, info))], force=True)
    assert res["results"] == [(0, None)]
    expect = rules.masked_mean(params, [rules.Contribution(values, mask, 40.0)])
    for k in params:
        np.testing.assert_array_equal(core.params[k], expect[k])


# ------------------------------------------------------------------ AutoFLIP / random pruning


def explored_models(params, seed=0):
    rng = np.random.default_rng(seed)
    return [{k: (v + rng.normal(size=v.shape)).astype(v.dtype) for k, v in params.items()} for _ in range(3)]


def test_autoflip_exploration_prunes_the_expected_quantile_and_zeroes_the_model():
    info, params = setup_model()
    spec = info.try_spec()
    method = {"name": "autoflip", "q": 0.3, "structured": False}
    core = core_for(method, params, info)
    driver = planner_for(method, info)
    a0 = driver.plan(0, 0)
    assert a0.submodel.mask is None and a0.local_epochs == 3 and dict(a0.info)["phase"] == 0
    models = explored_models(params)
    res = core.receive([item(i, i, m) for i, m in enumerate(models)], force=True)
    weights = [layer.weight_key for layer in spec.layers]
    g = {k: np.mean([(m[k].astype(np.float64) - params[k]) ** 2 for m in models], axis=0) for k in weights}
    g = {k: (v - v.min()) / (v.max() - v.min()) for k, v in g.items()}
    tau = np.quantile(np.concatenate([g[k].ravel() for k in weights]), 0.3)
    mask = res["messages"][0]["mask"]
    n = sum(g[k].size for k in weights)
    pruned = sum(int((~mask[k]).sum()) for k in weights)
    assert pruned == sum(int((g[k] <= tau).sum()) for k in weights)
    assert abs(pruned / n - 0.3) < 0.01
    for k in weights:
        np.testing.assert_array_equal(mask[k], g[k] > tau)
        np.testing.assert_array_equal(core.params[k], np.where(mask[k], params[k], 0))
    driver.receive(res["messages"][0])
    a1 = driver.plan(0, 1)
    assert a1.send == "delta" and a1.submodel.mask is not None and dict(a1.info)["phase"] == 1
    assert dict(a1.info)["density"] == pytest.approx(driver.density()) and driver.density() < 0.75


def test_autoflip_phase1_fedavg_of_deltas_with_server_momentum():
    info, params = setup_model()
    core = core_for({"name": "autoflip", "structured": False}, params, info)
    core.receive([item(i, i, m) for i, m in enumerate(explored_models(params))], force=True)
    mask = core.server.state.mask
    x0 = {k: v.copy() for k, v in core.params.items()}
    d1 = {k: np.where(mask[k], 0.1, 0).astype(np.float32) for k in params}
    d2 = {k: np.where(mask[k], 0.3, 0).astype(np.float32) for k in params}
    core.receive([item(10, 0, d1, mask, n=10, base=1), item(11, 1, d2, mask, n=30, base=1)], force=True)
    step1 = (10 * 0.1 + 30 * 0.3) / 40  # velocity v1 = -step1; x1 = x0 + step1
    k = "layers.1.weight"
    np.testing.assert_allclose(core.params[k], np.where(mask[k], x0[k] + step1, 0), rtol=1e-6, atol=1e-7)
    core.receive([item(12, 0, d1, mask, n=10, base=2)], force=True)
    v2 = 0.9 * step1 + 0.1  # g2 = -0.1, v2 = 0.9 v1 + g2, x2 = x1 - v2 = x1 + 0.9 step1 + 0.1
    np.testing.assert_allclose(core.params[k], np.where(mask[k], x0[k] + step1 + v2, 0), rtol=1e-5, atol=1e-6)
    assert not np.any(core.params[k][~mask[k]])


def test_autoflip_structured_part_and_refresh_never_regrows():
    info, params = setup_model()
    core = core_for({"name": "autoflip", "refresh": True}, params, info)
    core.receive([item(i, i, m) for i, m in enumerate(explored_models(params))], force=True)
    first = {k: v.copy() for k, v in core.server.state.mask.items()}
    rng = np.random.default_rng(1)
    d = {k: np.where(first[k], rng.normal(size=v.shape), 0).astype(np.float32) for k, v in params.items()}
    res = core.receive([item(5, 0, d, first, base=1)], force=True)
    assert "messages" in res and M.is_subset(res["messages"][0]["mask"], first)


def test_random_prune_matches_autoflip_density():
    info, params = setup_model()
    spec = info.try_spec()
    models = explored_models(params)
    flip = core_for({"name": "autoflip"}, params, info)
    rand = core_for({"name": "random_prune"}, params, info)
    for core in (flip, rand):
        core.receive([item(i, i, m) for i, m in enumerate(models)], force=True)
    weights = [layer.weight_key for layer in spec.layers]
    count = lambda mk: sum(int(mk[k].sum()) for k in weights)  # noqa: E731
    assert count(rand.server.state.mask) == count(flip.server.state.mask)
    assert not M.equal(rand.server.state.mask, flip.server.state.mask)
    assert all(rand.server.state.mask[k].all() for k in params if k not in weights)
