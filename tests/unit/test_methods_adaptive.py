"""adaptive_masked_buff and the pure pieces it shares with PR-FL and CA-HFP, hand-checked, no Ray."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from fedray.aggregation import rules
from fedray.config import from_dict
from fedray.errors import ConfigError
from fedray.methods.adaptive_masked_buff import quantize_up
from fedray.methods.base import Entry, RoundRecord
from fedray.pruning.progressive import Plateau, observed_time, recover_on_plateau
from fedray.update import Update
from tests import kit

HIDDEN = (8, 6)  # MLP 64 -> 8 -> 6 -> 10


def cfg_for(method: dict, num_clients=4, **sections):
    return from_dict({"method": {"name": "adaptive_masked_buff", **method},
                      "data": {"name": "digits", "num_clients": num_clients},
                      "model": {"name": "mlp", "options": {"hidden": list(HIDDEN)}},
                      "server": {"clients_per_round": 2}, **sections})


def header(client, round_s, comm_s=None):
    return Update(dispatch_id=0, client_id=client, base_version=0, num_examples=1,
                  telemetry={"round_s": round_s, "comm_s": round_s if comm_s is None else comm_s})


def test_observed_time_and_recover_on_plateau():
    assert observed_time({"round_s": 2.0, "comm_s": 0.5}, "comm") == 0.5
    assert observed_time({"round_s": 2.0, "comm_s": 0.5}, "round") == 2.0
    for bad in ({}, None, {"comm_s": 0.0}, {"comm_s": float("nan")}, {"comm_s": -1.0}):
        assert observed_time(bad, "comm") is None
    p = Plateau(patience=2)
    p, rho, hit = recover_on_plateau(p, 0.1, 0.5, 0.2)
    assert (rho, hit, p.best) == (0.1, False, 0.5)
    p, rho, hit = recover_on_plateau(p, rho, 0.5, 0.2)  # first evaluation without a gain
    assert (rho, hit) == (0.1, False)
    p, rho, hit = recover_on_plateau(p, rho, 0.4, 0.2)  # second: a plateau, the floor rises 0.1 -> 0.3
    assert (rho, hit, p.bad) == (0.3, True, 0)
    p, rho, hit = recover_on_plateau(Plateau(patience=1), 1.0, 0.0, 0.2)  # full model already: floor stays
    assert (rho, hit) == (1.0, False)  # the first evaluation always improves on -inf
    p, rho, hit = recover_on_plateau(p, 1.0, 0.0, 0.2)
    assert (rho, hit) == (1.0, True)


def test_quantize_up():
    assert quantize_up(0.25, 0.1) == 0.3
    assert quantize_up(0.3, 0.1) == 0.3  # not 0.4 (0.3 / 0.1 = 2.9999999999999996)
    assert quantize_up(0.96, 0.1) == 1.0 and quantize_up(1.0, 0.1) == 1.0
    assert quantize_up(0.123, 0.0) == 0.123


def test_widths_follow_the_observed_times_with_the_floor():
    info, _ = kit.model_info("mlp", {"hidden": list(HIDDEN)})
    cfg = cfg_for({"rho_min": 0.1, "ratios": [0.5], "time_source": "comm"})
    planner = kit.planner_for(cfg, info, examples=np.full(4, 40))
    # nobody observed: the starting ratio (one speed group: 0.5)
    assert [planner.ratio(c) for c in range(4)] == [0.5] * 4
    planner.observe(header(0, 9.0, comm_s=1.0))
    planner.observe(header(1, 9.0, comm_s=4.0))
    planner.observe(header(1, 9.0, comm_s=6.0))  # tbar_1 = 5
    planner.observe(header(2, 9.0, comm_s=100.0))  # 1/100 < rho_min
    # r_i = max(min_j tbar_j / tbar_i, rho_min) rounded up to 0.1: 1, 1/5 = 0.2, max(0.01, 0.1) = 0.1
    assert [planner.ratio(c) for c in range(4)] == [1.0, 0.2, 0.1, 0.5]
    full = planner.plan(0, 0)
    assert full.submodel.widths is None and dict(full.info)["keep_ratio"] == 1.0
    a = planner.plan(1, 0)
    # compact widths ceil(0.2 * 8) = 2 and ceil(0.2 * 6) = 2, the kept indices as extras, scoring costed
    assert a.submodel.widths == {"layers.0": 2, "layers.1": 2} and a.setting("keep_ratio") == 0.2
    assert sorted(e.name for e in a.submodel.extras) == ["kept/layers.0", "kept/layers.1"]
    # scoring: min(4, ceil(40 / 32)) = 2 batches of the default 32, capped at the 40 examples
    assert a.submodel.extra_flops == 40 * info.train_flops_per_example()
    # recovery: every plateau raises the floor by delta_rho = 0.25 until the full model
    for metric in (0.5, 0.5, 0.5, 0.5, 0.5, 0.5):  # patience 5: one plateau
        planner.on_eval(metric, 0.0)
    assert planner.state.rho_min == 0.35 and planner.state.recoveries == 1
    assert [planner.ratio(c) for c in range(4)] == [1.0, 0.4, 0.4, 0.5]
    for _ in range(15):
        planner.on_eval(0.5, 0.0)
    assert planner.state.rho_min == 1.0 and planner.state.recoveries == 4
    assert [planner.ratio(c) for c in range(4)] == [1.0] * 4
    # the state survives a checkpoint (pickled) and plans the same
    restored = kit.planner_for(cfg, info, examples=np.full(4, 40))
    restored.load_state_dict(pickle.loads(pickle.dumps(planner.state_dict())))
    assert restored.state == planner.state and restored.ratio(1) == planner.ratio(1)


def test_score_every_keeps_a_channel_set_until_t_versions_pass_or_the_ratio_changes():
    from fedray.channel import Channel

    info, _ = kit.model_info("mlp", {"hidden": list(HIDDEN)})
    cfg = cfg_for({"rho_min": 0.1, "ratios": [0.5], "score_every": 3})
    planner = kit.planner_for(cfg, info, examples=np.full(4, 40))
    plans = [planner.plan(1, v) for v in range(5)]  # not observed: the starting ratio 0.5
    assert [a.setting("score") for a in plans] == [True, False, False, True, False]
    assert [dict(a.info)["scored"] for a in plans] == [True, False, False, True, False]
    assert all(a.setting("keep_set") for a in plans)
    score, reuse = plans[0].submodel, plans[1].submodel
    assert reuse is plans[2].submodel and reuse.widths == score.widths == {"layers.0": 4, "layers.1": 3}
    assert reuse.extras == () and reuse.extra_flops == 0 and score.extra_flops > 0
    # scoring downloads the full model, reusing only the compact one (the same sizes' slice)
    channel = Channel(info.like)
    assert score.cost(info, channel).bytes_down == channel.mask_nbytes(None)
    assert reuse.cost(info, channel).bytes_down == channel.mask_nbytes(info.slice_mask(reuse.widths))
    assert reuse.cost(info, channel).bytes_down < score.cost(info, channel).bytes_down
    # a new keep ratio scores at once (the stored set has the old sizes)
    planner.observe(header(0, 1.0))
    planner.observe(header(1, 5.0))
    a = planner.plan(1, 5)
    assert a.setting("keep_ratio") == 0.2 and a.setting("score") is True and planner.state.scored[1] == (5, 0.2)
    assert planner.plan(1, 6).setting("score") is False
    # the last scorings are the planner's (checkpointed) state
    restored = kit.planner_for(cfg, info, examples=np.full(4, 40))
    restored.load_state_dict(pickle.loads(pickle.dumps(planner.state_dict())))
    assert restored.plan(1, 7).setting("score") is False and restored.plan(1, 8).setting("score") is True
    # the default (1): every dispatch scores, nothing kept on the device, the settings as before
    default = kit.planner_for(cfg_for({"ratios": [0.5]}), info, examples=np.full(4, 40))
    assert [default.plan(1, v).client for v in range(2)] == [(("keep_ratio", 0.5),)] * 2


def test_server_buffers_k_and_takes_the_staleness_weighted_masked_mean():
    info, params = kit.model_info("mlp", {"hidden": list(HIDDEN)})
    server = kit.server_for(cfg_for({"buffer_size": 2, "eta_g": 0.5}), info)
    assert not server.trigger(1) and server.trigger(2)
    ones = {k: np.ones_like(v) for k, v in params.items()}
    threes = {k: np.full_like(v, 3.0) for k, v in params.items()}
    half = {k: np.zeros(v.shape, bool) for k, v in params.items()}
    half["layers.0.weight"][:4] = True
    full = {k: np.ones(v.shape, bool) for k, v in params.items()}

    def entry(values, mask, n, base):
        u = Update(dispatch_id=base, client_id=base, base_version=base, num_examples=n)
        return Entry(u, rules.Contribution(values, mask, float(n)))

    # version 3: a delta of +3 from version 3 (weight 10 * 1) over half of one tensor, a delta of
    # +1 everywhere from version 0 (staleness 3: weight 30 * 4^-0.6); eta_g = 0.5
    new = server.aggregate(params, [entry(threes, half, 10, 3), entry(ones, full, 30, 0)], RoundRecord(version=3))
    w1, w2 = 10.0, 30.0 * 4.0 ** -0.6
    covered = (w1 * 3.0 + w2 * 1.0) / (w1 + w2)
    w = params["layers.0.weight"]
    np.testing.assert_allclose(new["layers.0.weight"][:4], w[:4] + 0.5 * covered, rtol=1e-6)
    np.testing.assert_allclose(new["layers.0.weight"][4:], w[4:] + 0.5 * 1.0, rtol=1e-6)  # only the full delta
    np.testing.assert_allclose(new["layers.2.bias"], params["layers.2.bias"] + 0.5, rtol=1e-6)
    assert new["layers.0.weight"].dtype == w.dtype
    # nobody covers a coordinate: it stays
    none = server.aggregate(params, [entry(threes, half, 10, 3)], RoundRecord(version=3))
    np.testing.assert_array_equal(none["layers.0.weight"][4:], w[4:])
    np.testing.assert_array_equal(none["layers.2.bias"], params["layers.2.bias"])


def test_bad_parameters_name_their_field():
    with pytest.raises(ConfigError, match="method.ratios"):
        cfg_for({"ratios": []})
    with pytest.raises(ConfigError, match="method.time_source"):
        cfg_for({"time_source": "wall"})
    with pytest.raises(ConfigError, match="method.rho_min"):
        cfg_for({"rho_min": 1.5})


def test_the_adaptive_experiment_plans_every_method_on_the_same_settings():
    from pathlib import Path

    from fedray import comparison

    p = comparison.plan(Path(__file__).resolve().parents[2] / "configs" / "experiments" / "adaptive.yaml")
    labels = {r.label for r in p.runs}
    assert labels == {"adaptive_masked_buff", "prfl", "cahfp", "fedbuff", "fedasync", "fedavg", "heterofl", "ma_clamp"}
    assert len(p.runs) == 3 * len(labels)
    assert {r.cfg.data.partition.alpha for r in p.runs} == {0.3}
