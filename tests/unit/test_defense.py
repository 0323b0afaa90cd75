"""The defence stage, the attacks (what a malicious client sends), the DP mechanisms and the
accountant wiring -- without Ray."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedray.aggregation import attacks, robust
from fedray.aggregation.accumulate import Contribution
from fedray.aggregation.core import AggregatorCore
from fedray.aggregation.defense import Defense
from fedray.config import from_dict
from fedray.errors import ConfigError
from fedray.methods import registry
from fedray.methods.base import Entry, ServerContext
from fedray.privacy import accountant, mechanism
from fedray.submodel.encode import encode
from fedray.update import Update
from tests.unit.test_robust import stack

X = {"w": np.zeros(4, np.float32)}


def cfg(**over):
    return from_dict({"data": {"num_clients": 20}, "server": {"clients_per_round": 5}},
                     [f"{k}={v}" for k, v in over.items()])


def entry(i, values, kind="model", n=10):
    v = {"w": np.asarray(values, np.float32)}
    return Entry(Update(dispatch_id=i, client_id=i, base_version=0, num_examples=n, kind=kind),
                 Contribution(v, {"w": np.ones(4, bool)}, float(n)))


def defense(c, examples=None):
    method = registry.get(c.method.name)
    return Defense(c, method.Server(ServerContext(c, c.method.name, c.method.params, None, c.data.num_clients)),
                   examples)


# ------------------------------------------------------------------ attacks


def test_every_attack_kind_sends_what_its_paper_says():
    s = stack([[1.0, 2.0], [3.0, 2.0], [5.0, -4.0]])
    bad = np.array([False, False, True])
    np.testing.assert_allclose(attacks.craft("sign_flip", s, bad).u["w"][2], [-5, 4])
    np.testing.assert_allclose(attacks.craft("scale", s, bad, scale=1e6).u["w"][2], [5e6, -4e6])
    noise = attacks.craft("noise", s, bad, sigma=2.0, rngs={2: np.random.default_rng(7)}).u["w"][2]
    np.testing.assert_allclose(noise, np.random.default_rng(7).normal(0, 2.0, 2))
    # ALIE: honest mean (2, 2), population std (1, 0): mu - z sd
    np.testing.assert_allclose(attacks.craft("alie", s, bad, z=1.5).u["w"][2], [0.5, 2.0])
    np.testing.assert_allclose(attacks.craft("ipm", s, bad, epsilon=0.5).u["w"][2], [-1.0, -1.0])
    for kind in attacks.MODEL_POISONING:  # the honest rows are what they sent
        np.testing.assert_allclose(attacks.craft(kind, s, bad, rngs={2: np.random.default_rng(0)}).u["w"][:2],
                                   s.u["w"][:2])
    assert attacks.craft("label_flip", s, bad) is s


def test_alie_default_z_is_the_papers_z_max():
    from scipy.stats import norm

    assert attacks.alie_z(10, 2) == pytest.approx(norm.ppf((10 - (6 - 2)) / 10))  # s = floor(n/2 + 1) - f
    assert attacks.alie_z(50, 10) == pytest.approx(norm.ppf((50 - 16) / 50))


def test_alie_and_ipm_without_honest_updates_stay_honest():
    s = stack([[1.0, 2.0]])
    assert attacks.craft("ipm", s, np.array([True])) is s


def test_label_flipping_maps_c_to_the_mirror_class():
    np.testing.assert_array_equal(attacks.flip_labels(np.array([0, 3, 9]), 10), [9, 6, 0])


def test_the_malicious_set_is_seeded_and_listed_clients_win():
    from fedray import security

    a = security.malicious_clients(cfg(**{"attack.kind": "scale", "attack.fraction": 0.25}))
    assert len(a) == 5 and np.array_equal(a, security.malicious_clients(cfg(**{"attack.kind": "scale",
                                                                                "attack.fraction": 0.25})))
    assert not np.array_equal(a, security.malicious_clients(cfg(seed=1, **{"attack.kind": "scale",
                                                                           "attack.fraction": 0.25})))
    assert security.malicious_clients(cfg(**{"attack.kind": "scale", "attack.clients": "[3, 1]"})).tolist() == [1, 3]
    assert len(security.malicious_clients(cfg(**{"attack.fraction": 0.5}))) == 0  # kind none


# ------------------------------------------------------------------ the stage


def test_the_default_guard_rejects_a_scaled_update_and_passes_the_rest_untouched():
    d = defense(cfg())
    es = [entry(i, [0.1 * (i + 1), -0.1, 0.05, 0.0]) for i in range(4)] + [entry(9, [1e5, 0, 0, 0])]
    out = d.screen(X, es, 0)
    assert [r for _, r, _ in out] == [None] * 4 + ["norm"]
    assert all(o[0] is e for o, e in zip(out[:4], es))  # bit for bit: the same objects
    assert out[4][2] == pytest.approx(1e5)


def test_a_move_past_the_dtypes_range_is_rejected_without_a_warning():
    """A diverged client (HeteroFL's narrowest slices at lr 0.25) overflows the float32 dot
    product: its norm is inf, the guard rejects it, and nothing is printed."""
    import warnings

    d = defense(cfg())
    es = [entry(i, [0.1 * (i + 1), -0.1, 0.05, 0.0]) for i in range(4)] + [entry(9, [1e20, 1e20, 0, 0])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = d.screen(X, es, 0)
    assert [r for _, r, _ in out] == [None] * 4 + ["norm"] and out[4][2] == math.inf


def test_the_guard_judges_the_first_updates_against_the_model_itself():
    d = defense(cfg())
    x = {"w": np.full(4, 0.1, np.float32)}
    assert d.screen(x, [entry(0, [10.0, 10, 10, 10])], 0)[0][1] == "norm"  # 100x the weights' norm
    assert d.screen(x, [entry(1, [0.2, 0.1, 0.1, 0.1])], 0)[0][1] is None


def test_the_guard_can_be_switched_off():
    d = defense(cfg(**{"defense.norm_guard": "null"}))
    out = d.screen(X, [entry(i, [1.0, 0, 0, 0]) for i in range(4)] + [entry(9, [1e5, 0, 0, 0])], 0)
    assert [r for _, r, _ in out] == [None] * 5


def test_example_weights_are_capped_by_the_servers_count_and_the_configured_cap():
    d = defense(cfg(**{"server.max_examples_weight": 50}), examples=np.full(20, 30))
    e = entry(0, [0.1, 0, 0, 0], n=1000)
    assert d.screen(X, [e], 0)[0][0].contribution.weight == 30
    d = defense(cfg(**{"server.max_examples_weight": 20}), examples=np.full(20, 30))
    assert d.screen(X, [e], 0)[0][0].contribution.weight == 20


def test_fixed_clipping_before_the_buffer_and_adaptive_from_recent_norms():
    d = defense(cfg(**{"defense.clip": "fixed", "defense.clip_bound": 1.0, "defense.norm_guard": "null"}))
    out = d.screen(X, [entry(0, [3.0, 4.0, 0, 0]), entry(1, [0.3, 0.4, 0, 0])], 0)
    np.testing.assert_allclose(out[0][0].contribution.values["w"], [0.6, 0.8, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(out[1][0].contribution.values["w"], [0.3, 0.4, 0, 0], rtol=1e-6)
    d = defense(cfg(**{"defense.clip": "adaptive", "defense.clip_quantile": 0.5, "defense.norm_guard": "null"}))
    out = d.screen(X, [entry(i, [float(i + 1), 0, 0, 0]) for i in range(4)], 0)  # norms 1..4: C = 2.5
    np.testing.assert_allclose([o[0].contribution.values["w"][0] for o in out], [1, 2, 2.5, 2.5])


def test_a_robust_rule_replaces_the_mean_of_any_method():
    c = cfg(**{"defense.rule": "median", "defense.norm_guard": "null"})
    d = defense(c)
    es = [entry(i, [v, 0, 0, 0]) for i, v in enumerate([1.0, 2.0, 3.0, 4.0, 1e6])]
    combined, left = d.combine(X, es, 0)
    assert left == [] and all(e.contribution.values["w"][0] == 3.0 for e in combined)
    from fedray.aggregation import rules

    assert rules.weighted_mean(X, [e.contribution for e in combined])["w"][0] == 3.0


def test_multi_krum_keeps_the_selected_updates_and_lacks_a_quorum_after_dropouts():
    c = cfg(**{"defense.rule": "multi_krum", "defense.f": 1, "defense.m": 3, "defense.norm_guard": "null"})
    d = defense(c)
    es = [entry(i, [v, 0, 0, 0]) for i, v in enumerate([0.0, 1.0, 2.0, 10.0, 11.0])]
    kept, left = d.combine(X, es, 0)
    assert [e.dispatch_id for e in kept] == [0, 1, 2] and left == [3, 4]
    kept, left = d.combine(X, es[:4], 0)  # 4 <= 2f + 2: nothing aggregated
    assert kept == [] and left == [0, 1, 2, 3]


def test_krum_with_too_few_updates_per_round_is_a_config_error():
    with pytest.raises(ConfigError, match="defense.f"):
        cfg(**{"defense.rule": "krum", "defense.f": 2, "server.clients_per_round": 6})
    with pytest.raises(ConfigError, match="defense.rule"):  # FedAsync aggregates one at a time
        cfg(**{"method.name": "fedasync", "defense.rule": "median"})


def test_nan_updates_never_reach_the_defence():
    c = cfg()
    server = registry.get("fedavg").Server(ServerContext(c, "fedavg", c.method.params, None, 20))
    seen = []

    class Spy(Defense):
        def screen(self, params, entries, version):
            seen.extend(e.dispatch_id for e in entries)
            return super().screen(params, entries, version)

    core = AggregatorCore(dict(X), server, defense=Spy(c, server))
    good = Update(dispatch_id=1, client_id=1, base_version=0, num_examples=5, payload=encode({"w": np.ones(4, np.float32)}, None))
    bad = Update(dispatch_id=2, client_id=2, base_version=0, num_examples=5,
                 payload=encode({"w": np.full(4, np.nan, np.float32)}, None))
    out = core.receive([(good, good.payload, None), (bad, bad.payload, None)], force=True)
    assert dict(out["results"]) == {1: None, 2: "nonfinite"} and seen == [1]


# ------------------------------------------------------------------ DP


def test_dp_mean_is_the_clipped_sum_plus_noise_over_the_expected_count():
    s = stack([[3.0, 4.0], [0.3, 0.4]])
    got = mechanism.dp_mean(s, 1.0, 0.5, 4, np.random.default_rng(3))["w"]
    noise = np.random.default_rng(3).normal(0, 0.5 * 1.0, 2)
    np.testing.assert_allclose(got, (np.array([0.6, 0.8]) + np.array([0.3, 0.4]) + noise) / 4)


def test_adaptive_clipping_follows_andrew_et_al():
    rng = np.random.default_rng(0)
    noise = np.random.default_rng(0).normal(0, 0.1)
    # both norms below C: b = (2 + noise) / 2, C <- C exp(-0.2 (b - 0.5))
    got = mechanism.adaptive_clip(1.0, np.array([0.5, 0.9]), 0.5, 0.2, 0.1, 2, rng)
    assert got == pytest.approx(math.exp(-0.2 * ((2 + noise) / 2 - 0.5)))
    assert mechanism.model_noise(1.0, 5.0) == pytest.approx((1 - 0.01) ** -0.5)
    with pytest.raises(ValueError, match="count noise"):
        mechanism.model_noise(2.0, 0.5)


def test_local_noise_clips_the_move_and_adds_seeded_noise():
    stage = mechanism.LocalGaussian(1.0, 0.5)
    base = {"w": np.zeros(2, np.float32)}
    out = stage.before_encode({"w": np.array([3.0, 4.0], np.float32)}, None,
                              {"download": base, "kind": "model", "rng": np.random.default_rng(1)})
    expect = np.array([0.6, 0.8]) + np.random.default_rng(1).normal(0, 0.5, 2)
    np.testing.assert_allclose(out["w"], expect, rtol=1e-6)


def test_epsilon_is_the_libraries_answer_and_moves_the_right_way():
    import dp_accounting as dpa
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant(list(accountant.ORDERS))
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.1)), 50))
    assert accountant.epsilon(50, 1.1, 0.1, 1e-5) == acc.get_epsilon(1e-5)
    assert accountant.epsilon(100, 1.1, 0.1, 1e-5) > accountant.epsilon(50, 1.1, 0.1, 1e-5)
    assert accountant.epsilon(50, 2.0, 0.1, 1e-5) < accountant.epsilon(50, 1.1, 0.1, 1e-5)
    assert accountant.epsilon(0, 1.1, 0.1, 1e-5) == 0.0
    c = cfg(**{"privacy.noise_multiplier": 1.1})
    ledger = accountant.Ledger(c, 5)
    assert ledger.q == 5 / 20 and ledger.epsilon(50) == accountant.epsilon(50, 1.1, 0.25, 1e-5)
    local = accountant.Ledger(cfg(**{"privacy.noise_multiplier": 1.1, "privacy.mode": "local"}), 5)
    assert local.epsilon(50, {3: 7, 4: 2}) == accountant.epsilon(7, 1.1, 1.0, 1e-5)


def test_target_epsilon_stops_before_the_aggregation_that_would_pass_it():
    c = cfg(**{"privacy.noise_multiplier": 1.1, "server.target_epsilon": 2.0})
    ledger = accountant.Ledger(c, 5)
    n = next(k for k in range(1, 1000) if ledger.epsilon(k) > 2.0)
    assert not ledger.exhausted(n - 2) and ledger.exhausted(n - 1)


def test_privacy_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="privacy"):
        cfg(**{"privacy.noise_multiplier": 1.0, "defense.rule": "median"})
    with pytest.raises(ConfigError, match="server.target_epsilon"):
        cfg(**{"server.target_epsilon": 3})
    with pytest.raises(ConfigError, match="privacy.mode"):
        cfg(**{"privacy.noise_multiplier": 1.0, "method.name": "fedfix"})
    with pytest.raises(ConfigError, match="privacy.count_noise"):  # m / 20 = 0.25 leaves nothing for z = 1
        cfg(**{"privacy.noise_multiplier": 1.0, "privacy.adaptive": True})
    cfg(**{"privacy.noise_multiplier": 1.0, "privacy.adaptive": True, "privacy.count_noise": 2.0})
