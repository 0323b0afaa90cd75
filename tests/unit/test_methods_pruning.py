"""Pruning methods (CLAMP family, PR-FL, CA-HFP, AutoFLIP) at method and AggregatorCore level, no Ray."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedray.aggregation import rules
from fedray.aggregation.actor import AggregatorCore
from fedray.client.actor import ClientWorker, Task
from fedray.config import from_dict
from fedray.errors import ConfigError
from fedray.methods import registry
from fedray.models.spec import model_spec
from fedray.models.zoo import build_model
from fedray.pruning.magnitude import prunable_keys
from fedray.pruning.progressive import importance_scores, residual_bytes, residual_split
from fedray.submodel import masks as M
from fedray.submodel.encode import Payload, decode, encode
from fedray.update import Update

HIDDEN = (8, 6)  # MLP 64 -> 8 -> 6 -> 10: L = 3 layers


def cfg_for(method: dict, **sections):
    data = {"method": method, "data": {"name": "digits", "num_clients": sections.pop("num_clients", 10)},
            "model": {"name": "mlp", "options": {"hidden": list(HIDDEN)}}}
    data.update(sections)
    return from_dict(data)


def setup_model(seed=0):
    torch.manual_seed(seed)
    model = build_model("mlp", (64,), 10, options={"hidden": list(HIDDEN)})
    spec = model_spec(model, (64,))
    return spec, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def method_for(method: dict, spec, **sections):
    cfg = cfg_for(method, **sections)
    return registry.get(cfg.method.name)(cfg, spec)


def item(did, client, values, mask=None, n=10, base=0, telemetry=None, aux=None):
    h = Update(dispatch_id=did, client_id=client, base_version=base, num_examples=n, telemetry=telemetry or {})
    p = encode(values, mask)
    return h, Payload(p.entries, aux or {}), None


def shifted(params, value):
    return {k: np.full_like(v, value) for k, v in params.items()}


def header(client, round_s, battery=1.0):
    return Update(dispatch_id=0, client_id=client, base_version=0, num_examples=1,
                  telemetry={"round_s": round_s, "battery": battery})


# ------------------------------------------------------------------ MA-CLAMP / CLAMP server rules


def layer_keys(spec, i):
    return spec.layers[i].keys


def depth_items(method, params, depths, values, ns):
    out = []
    for i, (d, v, n) in enumerate(zip(depths, values, ns)):
        a = method.plan(i, 0)
        assert dict(a.info)["depth"] == method.planner.depth(i)
        out.append(item(i, i, shifted(params, v), method.mask_for(d), n=n))
    return out


def test_ma_clamp_rho_half_updates_layer_trained_by_two_keeps_layer_trained_by_one():
    spec, params = setup_model()
    core = AggregatorCore(params, method_for({"name": "ma_clamp", "rho": 0.5}, spec,
                                             server={"clients_per_round": 5}))
    # depths 1,1,1,2,3: layer 2 trained by 5, layer 1 by 2 (threshold max(1, floor(2.5)) = 2), layer 0 by 1
    values, ns = [1.0, 2.0, 3.0, 4.0, 5.0], [10, 10, 10, 10, 30]
    res = core.receive(depth_items(core.method, params, [1, 1, 1, 2, 3], values, ns), force=True)
    assert res["aggregated"]
    new = core.params
    for k in layer_keys(spec, 2):
        np.testing.assert_allclose(new[k], (10 + 20 + 30 + 40 + 150) / 70)
    for k in layer_keys(spec, 1):
        np.testing.assert_allclose(new[k], (4.0 * 10 + 5.0 * 30) / 40)
    for k in layer_keys(spec, 0):
        np.testing.assert_array_equal(new[k], params[k])


def test_ma_clamp_rho_08_keeps_layer_trained_by_three():
    spec, params = setup_model()
    core = AggregatorCore(params, method_for({"name": "ma_clamp", "rho": 0.8}, spec,
                                             server={"clients_per_round": 5}))
    # threshold max(1, floor(4.0)) = 4: layer 1 is trained by 3 (depths 2,3,3) -> kept
    core.receive(depth_items(core.method, params, [1, 1, 2, 3, 3], [1.0] * 5, [10] * 5), force=True)
    for k in layer_keys(spec, 1) + layer_keys(spec, 0):
        np.testing.assert_array_equal(core.params[k], params[k])
    for k in layer_keys(spec, 2):
        np.testing.assert_allclose(core.params[k], 1.0)


def test_ma_clamp_counts_selected_clients_that_did_not_arrive():
    spec, params = setup_model()
    m = method_for({"name": "ma_clamp", "rho": 0.5}, spec, server={"clients_per_round": 5})
    # only 2 of the 5 selected arrive; layer 1 is trained by 1 < 2 -> kept, layer 2 by 2 -> averaged
    entries = [(Update(i, i, 0, 10), rules.Contribution(shifted(params, v), m.mask_for(d), 10.0))
               for i, (d, v) in enumerate([(1, 1.0), (2, 3.0)])]
    new = m.aggregate(params, entries, 0)
    np.testing.assert_allclose(new["layers.2.weight"], 2.0)
    np.testing.assert_array_equal(new["layers.1.weight"], params["layers.1.weight"])


def test_ma_clamp_masks_carry_every_batchnorm_statistic():
    torch.manual_seed(0)
    model = build_model("vgg11", (3, 32, 32), 10, options={"batch_norm": True, "width": 1 / 64})
    spec = model_spec(model, (3, 32, 32))
    m = method_for({"name": "ma_clamp", "initial_depth": 1}, spec)
    stats = [k for k in spec.buffer_keys if "running" in k or "num_batches" in k]
    assert stats and set(stats) <= set(m.mask_for(1))
    assert set(m.plan(0, 0).trainable) == set(k for k in spec.layers[-1].keys if k in spec.param_keys)
    clamp = method_for({"name": "clamp"}, spec)
    assert not set(stats) & set(clamp.mask_for(1))


def test_clamp_updates_only_the_common_depth():
    spec, params = setup_model()
    core = AggregatorCore(params, method_for({"name": "clamp"}, spec))
    core.receive(depth_items(core.method, params, [1, 2, 3], [1.0, 2.0, 3.0], [10, 20, 30]), force=True)
    for k in layer_keys(spec, 2):
        np.testing.assert_allclose(core.params[k], (10 + 40 + 90) / 60)
    for k in layer_keys(spec, 0) + layer_keys(spec, 1):
        np.testing.assert_array_equal(core.params[k], params[k])


# ------------------------------------------------------------------ depth controller


def test_depth_plan_trains_and_sends_only_the_last_d_layers():
    spec, _ = setup_model()
    m = method_for({"name": "clamp", "initial_depth": 5}, spec)  # capped at L = 3
    assert dict(m.plan(0, 0).info)["depth"] == 3
    m = method_for({"name": "clamp", "initial_depth": 2}, spec)
    a = m.plan(4, 0)
    assert dict(a.info)["depth"] == 2
    assert set(a.trainable) == set(layer_keys(spec, 1) + layer_keys(spec, 2))
    assert set(a.mask) == set(a.trainable) and all(v.all() for v in a.mask.values())
    flops = spec.train_flops([spec.layers[1].name, spec.layers[2].name], 1)
    assert flops < spec.train_flops(spec.layer_names, 1)


def test_depth_controller_hysteresis_through_observe():
    spec, _ = setup_model()
    m = method_for({"name": "ma_clamp", "initial_depth": 2, "threshold_reference": "own"}, spec)
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
    spec, _ = setup_model()
    m = method_for({"name": "clamp", "initial_depth": 2}, spec)
    for c in range(1, 5):
        m.observe(header(c, 1.0))
    for _ in range(3):
        m.observe(header(0, 3.0))  # 3 x the federation median: above T_high = 1.25
    assert dict(m.plan(0, 0).info)["depth"] == 1
    assert all(dict(m.plan(c, 0).info)["depth"] == 2 for c in range(1, 5))


def test_fedpmt_fixed_and_feddrop_random_depths():
    spec, _ = setup_model()
    pmt = method_for({"name": "fedpmt", "depth": 2}, spec)
    assert {dict(pmt.plan(c, v).info)["depth"] for c in range(5) for v in range(3)} == {2}
    with pytest.raises(ConfigError, match="method.depth"):
        method_for({"name": "fedpmt", "depth": 4}, spec)
    drop = method_for({"name": "feddrop"}, spec)
    depths = [dict(drop.plan(c, v).info)["depth"] for c in range(10) for v in range(10)]
    assert set(depths) == {1, 2, 3}
    again = method_for({"name": "feddrop"}, spec)
    assert depths == [dict(again.plan(c, v).info)["depth"] for c in range(10) for v in range(10)]


# ------------------------------------------------------------------ PR-FL


def prfl_pair(spec, params, **p):
    method = {"name": "prfl", **p}
    core = AggregatorCore(params, method_for(method, spec))
    driver = method_for(method, spec)
    driver.sync_from_server(core.public_state())
    return core, driver


def test_prfl_masks_nest_and_residual_bytes_are_counted():
    spec, params = setup_model()
    core, driver = prfl_pair(spec, params)
    plans = [driver.plan(c, 0) for c in range(10)]
    assert all(a.collect_sq_grads and a.mask is a.download_mask for a in plans)
    dens = [dict(a.info)["density"] for a in plans]
    assert dens[0] == 1.0 and dens[6] < dens[4] < dens[2] < 1.0
    order = sorted(range(10), key=lambda c: dens[c])
    for i, j in zip(order, order[1:]):
        assert M.is_subset(plans[i].mask, plans[j].mask)
    # BatchNorm-free MLP: every key is prunable; densities are met on the prunable coordinates
    keys = list(prunable_keys(spec))
    assert M.density(plans[2].mask, params, keys) == pytest.approx(0.6, abs=1e-3)
    levels = [plans[c].mask for c in (6, 4, 2, 0)]
    expected = residual_bytes(params, residual_split(levels))
    assert [plans[c].bytes_down for c in (6, 4, 2, 0)] == expected
    assert expected == sorted(expected)


def test_prfl_maskfedavg_over_the_cache_matches_hand_computation():
    spec, params = setup_model()
    core = AggregatorCore(params, method_for({"name": "prfl", "eta_g": 0.5, "a": 0.6}, spec))
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
    assert core.version == 2 and sorted(core.method.cache) == [0, 1]


def test_prfl_scores_from_squared_gradients_flow_to_the_driver():
    spec, params = setup_model()
    core, driver = prfl_pair(spec, params, recompute_every=2, layer_floor=0.0)
    rng = np.random.default_rng(0)
    ups = []
    for i in range(2):
        sq = {k: rng.random(params[k].shape) * (i + 1) for k in prunable_keys(spec)}
        ups.append(sq)
        aux = {f"sq_grads/{k}": v.astype(np.float32) for k, v in sq.items()}
        res = core.receive([item(i, i, params, None, aux=aux)], force=True)
        assert ("method_state" in res) == (i == 1)  # published every I = 2 aggregations
    scores = res["method_state"]["scores"]
    ref = importance_scores(ups, params, list(prunable_keys(spec)))
    flat = np.concatenate([scores[k].ravel() for k in prunable_keys(spec)])
    flat_ref = np.concatenate([ref[k].ravel() for k in prunable_keys(spec)])
    np.testing.assert_allclose(flat / flat.sum(), flat_ref / flat_ref.sum(), rtol=1e-5)
    driver.sync_from_server(res["method_state"])
    top = driver.plan(6, 0).mask  # density 0.1: the best-scored coordinates
    k0 = max(prunable_keys(spec), key=lambda k: flat_ref.max() == ref[k].max())
    assert top[k0].reshape(-1)[int(np.argmax(ref[k0]))]


def test_prfl_densities_from_round_times_and_recovery_on_plateau():
    spec, params = setup_model()
    core, driver = prfl_pair(spec, params, rho_min=0.1, patience=2, delta_rho=0.2)
    assert dict(driver.plan(7, 0).info)["density"] == pytest.approx(0.1, abs=2e-3)
    for c, t in [(0, 1.0), (1, 2.0), (2, 4.0)]:
        driver.observe(header(c, t))
        driver.observe(header(c, t))
    driver.replan()
    assert driver.rho[0] == 1.0 and driver.rho[1] == 0.5 and driver.rho[2] == 0.25
    assert driver.rho[7] == 0.1  # not observed yet: its starting density
    driver.on_eval(0.5, 1.0)
    driver.on_eval(0.4, 1.0)
    assert driver.rho_min == 0.1
    driver.on_eval(0.5, 1.0)  # second evaluation without improvement: plateau -> recovery
    assert driver.rho_min == pytest.approx(0.3)
    assert driver.rho[7] == pytest.approx(0.3) and driver.rho[2] == pytest.approx(0.3)
    assert dict(driver.plan(7, 0).info)["density"] == pytest.approx(0.3, abs=2e-3)
    assert not driver.finished()
    for step in range(4):  # 0.3 -> 0.5 -> 0.7 -> 0.9 -> 1.0, a recovery at every plateau
        driver.on_eval(0.5, 1.0)
        driver.on_eval(0.5, 1.0)
    assert driver.rho_min == 1.0 and all(r == 1.0 for r in driver.rho.values()) and not driver.finished()
    driver.on_eval(0.5, 1.0)
    driver.on_eval(0.5, 1.0)  # a last plateau with every density at 1: PR-FL's training ends
    assert driver.finished()


def test_prfl_state_survives_a_checkpoint():
    spec, params = setup_model()
    core, _ = prfl_pair(spec, params)
    core.receive([item(0, 3, shifted(params, 1.0), None)], force=True)
    other = AggregatorCore(params, method_for({"name": "prfl"}, spec))
    other.load_state_dict(core.state_dict())
    assert sorted(other.method.cache) == [3] and other.method.aggregations == 1


# ------------------------------------------------------------------ CA-HFP


def test_cahfp_keep_ratios_by_tier_and_by_speed():
    spec, _ = setup_model()
    m = method_for({"name": "cahfp", "tier_ratios": {"very_slow": 0.4, "normal": 0.6, "very_fast": 1.0}}, spec,
                   devices={"tiers": "clamp"}, num_clients=20)
    from fedray.methods.cahfp import client_profiles

    tiers = [p.tier for p in client_profiles(m.cfg)]
    want = {"very_slow": 0.4, "normal": 0.6, "very_fast": 1.0}
    assert [dict(m.plan(c, 0).info)["keep_ratio"] for c in range(20)] == [want[t] for t in tiers]
    with pytest.raises(ConfigError, match="method.tier_ratios"):
        method_for({"name": "cahfp", "tier_ratios": {"normal": 0.5}}, spec, devices={"tiers": "clamp"})
    by_speed = method_for({"name": "cahfp"}, spec, devices={"tiers": "clamp"}, num_clients=20)
    speeds = [p.speed for p in client_profiles(by_speed.cfg)]
    ratio = [dict(by_speed.plan(c, 0).info)["keep_ratio"] for c in range(20)]
    assert ratio[int(np.argmax(speeds))] == 1.0 and ratio[int(np.argmin(speeds))] == 0.4
    assert sorted(ratio) == [0.4] * 5 + [0.6] * 5 + [0.8] * 5 + [1.0] * 5


def test_cahfp_client_trains_a_physically_smaller_model_and_reconstructs_it():
    spec, params = setup_model()
    cfg = cfg_for({"name": "cahfp", "ratios": [0.5]}, train={"batch_size": 8, "local_epochs": 1})
    m = registry.get("cahfp")(cfg, spec)
    a = m.plan(0, 0)
    assert a.keep_policy == "curvature" and a.keep_ratio == 0.5
    full = spec.train_flops(spec.layer_names, 1)
    assert a.train_flops_per_example <= 0.6 * full
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
    assert cspec.train_flops(cspec.layer_names, 1) == a.train_flops_per_example
    # the payload holds the compact tensors, written back at their original indices
    values, mask = decode(u.payload, spec.shapes)
    index = spec.slice_index({g: v.astype(np.int64) for g, v in kept.items()})
    for k in params:
        np.testing.assert_array_equal(values[k][np.ix_(*index[k])], state[k])
        assert mask[k].sum() == state[k].size and mask[k][np.ix_(*index[k])].all()
    assert u.bytes_up == a.bytes_up + sum(v.nbytes for v in u.payload.aux.values())
    # server: masked mean over the clients' masks
    core = AggregatorCore(params, registry.get("cahfp")(cfg, spec))
    core.receive([(u.header(), u.payload, None)], force=True)
    expect = rules.masked_mean(params, [rules.Contribution(values, mask, 40.0)])
    for k in params:
        np.testing.assert_array_equal(core.params[k], expect[k])


# ------------------------------------------------------------------ AutoFLIP / random pruning


def explored_models(params, seed=0):
    rng = np.random.default_rng(seed)
    return [{k: (v + rng.normal(size=v.shape)).astype(v.dtype) for k, v in params.items()} for _ in range(3)]


def test_autoflip_exploration_prunes_the_expected_quantile_and_zeroes_the_model():
    spec, params = setup_model()
    method = {"name": "autoflip", "q": 0.3, "structured": False}
    core = AggregatorCore(params, method_for(method, spec))
    driver = method_for(method, spec)
    a0 = driver.plan(0, 0)
    assert a0.mask is None and a0.local_epochs == 3 and dict(a0.info)["phase"] == 0
    models = explored_models(params)
    res = core.receive([item(i, i, m) for i, m in enumerate(models)], force=True)
    weights = [layer.weight_key for layer in spec.layers]
    g = {k: np.mean([(m[k].astype(np.float64) - params[k]) ** 2 for m in models], axis=0) for k in weights}
    g = {k: (v - v.min()) / (v.max() - v.min()) for k, v in g.items()}
    tau = np.quantile(np.concatenate([g[k].ravel() for k in weights]), 0.3)
    mask = res["method_state"]["mask"]
    n = sum(g[k].size for k in weights)
    pruned = sum(int((~mask[k]).sum()) for k in weights)
    assert pruned == sum(int((g[k] <= tau).sum()) for k in weights)
    assert abs(pruned / n - 0.3) < 0.01
    for k in weights:
        np.testing.assert_array_equal(mask[k], g[k] > tau)
        np.testing.assert_array_equal(core.params[k], np.where(mask[k], params[k], 0))
    driver.sync_from_server(res["method_state"])
    a1 = driver.plan(0, 1)
    assert a1.send == "delta" and a1.mask is not None and dict(a1.info)["phase"] == 1
    assert dict(a1.info)["density"] == pytest.approx(driver.density()) and driver.density() < 0.75


def test_autoflip_phase1_fedavg_of_deltas_with_server_momentum():
    spec, params = setup_model()
    core = AggregatorCore(params, method_for({"name": "autoflip", "structured": False}, spec))
    core.receive([item(i, i, m) for i, m in enumerate(explored_models(params))], force=True)
    mask = core.method.mask
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
    spec, params = setup_model()
    core = AggregatorCore(params, method_for({"name": "autoflip", "refresh": True}, spec))
    core.receive([item(i, i, m) for i, m in enumerate(explored_models(params))], force=True)
    first = {k: v.copy() for k, v in core.method.mask.items()}
    rng = np.random.default_rng(1)
    d = {k: np.where(first[k], rng.normal(size=v.shape), 0).astype(np.float32) for k, v in params.items()}
    res = core.receive([item(5, 0, d, first, base=1)], force=True)
    assert "method_state" in res and M.is_subset(res["method_state"]["mask"], first)


def test_random_prune_matches_autoflip_density():
    spec, params = setup_model()
    models = explored_models(params)
    flip = AggregatorCore(params, method_for({"name": "autoflip"}, spec))
    rand = AggregatorCore(params, method_for({"name": "random_prune"}, spec))
    for core in (flip, rand):
        core.receive([item(i, i, m) for i, m in enumerate(models)], force=True)
    weights = [layer.weight_key for layer in spec.layers]
    count = lambda mk: sum(int(mk[k].sum()) for k in weights)  # noqa: E731
    assert count(rand.method.mask) == count(flip.method.mask)
    assert not M.equal(rand.method.mask, flip.method.mask)
    assert all(rand.method.mask[k].all() for k in params if k not in weights)
