"""The columnar population, O(k) selection, CSR partitions and lazily generated users (issue 14)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from fedray.data.partition import Partitions, cached_partition
from fedray.data.users import SyntheticUsers, UserColumn
from fedray.devices import columns
from fedray.devices.columns import DRAWS, PURPOSE_PROFILE, build_population
from fedray.devices.profile import PopulationSpec, TierSpec, clamp_tiers
from fedray.runtime.dispatch import Candidates, Dispatcher


def test_a_clients_row_is_its_slice_of_the_one_stream():
    pop = build_population(3000, PopulationSpec(tiers=clamp_tiers(), link_means="random"), seed=7)
    rows = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, PURPOSE_PROFILE]))).random((3000, DRAWS))
    for c in (0, 1, 1234, 2999):
        np.testing.assert_array_equal(pop.uniforms(c), rows[c])
        lo, hi = clamp_tiers()[pop.tier_index[c]].speed_range
        assert pop[c].speed == lo + rows[c, 0] * (hi - lo)
        assert pop[c].download_bps == 20e6 + rows[c, 1] * (1.5e6 - 20e6)


def test_columns_equal_the_profiles_built_one_by_one():
    tiers = (TierSpec("a", 0.3, speed_range=(0.2, 0.9), battery_j=500.0, battery_level_range=(0.3, 0.8)),
             TierSpec("b", 0.7, speed_range=(1.0, 2.0)))
    pop = build_population(500, PopulationSpec(tiers=tiers), seed=3)
    profiles = list(pop)
    np.testing.assert_array_equal(pop.column("speed"), [p.speed for p in profiles])
    np.testing.assert_array_equal(pop.column("battery_level"), [p.battery_level for p in profiles])
    np.testing.assert_array_equal(pop.column("battery_j"), [p.battery_j for p in profiles])
    np.testing.assert_array_equal(pop.slow, [p.speed < 0.8 for p in profiles])
    assert pop.tiers_present() == ["a", "b"] and [pop.tier_of(c) for c in range(5)] == [p.tier for p in profiles[:5]]
    assert list(pop.always_on()) == [False, True]  # a battery tier needs a check before selection
    assert list(pop.first_of_tier()) == sorted({p.tier: p.client_id for p in profiles[::-1]},
                                               key=lambda t: min(q.client_id for q in profiles if q.tier == t))


def test_a_homogeneous_population_draws_nothing(monkeypatch):
    pop = build_population(10_000_000, PopulationSpec(), seed=0)
    monkeypatch.setattr(columns, "_CHUNK", 0)  # drawing a column would now raise (range step 0)
    assert pop.column("speed").shape == (10_000_000,) and not pop.slow.any()
    assert pop.tier_index.dtype == np.int8 and pop.tier_index.nbytes == 10_000_000


class _Pool:
    def route(self, key, did):
        return 0

    def key_of(self, tier):
        return None


def _dispatcher(n, spec, seed=0, low=0.05):
    cfg = SimpleNamespace(seed=seed, devices=SimpleNamespace(shared_server_bps=None, noise_sigma=0.0, low_battery=low))
    setup = SimpleNamespace(profiles=build_population(n, spec, seed))
    return Dispatcher(cfg, setup, None, None, _Pool())


def test_selection_among_always_on_clients_draws_what_the_materialised_list_drew():
    """O(k) positions past the busy clients = ``rng.choice(sorted idle ids, k)`` (the old selection)."""
    d = _dispatcher(50_000, PopulationSpec())
    for c in (3, 4, 17, 20_000, 49_999):
        d._set_busy(c, True)
    idle = np.setdiff1d(np.arange(50_000), [3, 4, 17, 20_000, 49_999])
    for seed, k in ((0, 10), (1, 100), (2, 900)):
        got = d.available(0.0).sample(np.random.default_rng(seed), k)
        old = np.sort(np.random.default_rng(seed).choice(idle, size=k, replace=False))
        np.testing.assert_array_equal(got, old)
    np.testing.assert_array_equal(np.asarray(d.available(0.0)), idle)
    d.release(4)
    assert len(d.available(0.0)) == len(idle) + 1


def test_selection_with_availability_checks_only_drawn_clients_and_is_uniform():
    d = _dispatcher(2000, PopulationSpec(availability=0.5, availability_cycle_s=100.0))
    t = 1234.0
    ready = np.asarray(d.available(t))
    checked = []
    real = d.ready
    d.ready = lambda c, t: checked.append(c) or real(c, t)
    sel = d.available(t).sample(np.random.default_rng(5), 20)
    assert len(sel) == 20 and np.isin(sel, ready).all() and len(checked) < 200  # not every client
    counts = np.zeros(2000)
    for s in range(3000):
        counts[d.available(t).sample(np.random.default_rng(s), 20)] += 1
    assert counts[~np.isin(np.arange(2000), ready)].sum() == 0
    expect = 3000 * 20 / len(ready)
    assert abs(counts[ready].mean() - expect) < 1e-9 and counts[ready].std() < 0.25 * expect  # uniform
    assert len(d.available(t).sample(np.random.default_rng(0), 5000)) == len(ready)  # all of them, no more


def test_drained_batteries_stay_out_until_they_recharge():
    tier = TierSpec("phone", 1.0, battery_j=100.0, battery_level_range=(0.04, 0.04), recharge_w=1.0)
    d = _dispatcher(10, PopulationSpec(tiers=(tier,)))
    assert len(d.available(0.0).sample(np.random.default_rng(0), 5)) == 0  # 4% < low battery 5%
    assert len(d.available(2.0).sample(np.random.default_rng(0), 5)) == 5  # +2 J of 100 J: 6%
    assert d._charge(0, 2.0) == pytest.approx(0.06) and d.battery(0) == pytest.approx(0.06)
    assert math.isinf(_dispatcher(3, PopulationSpec()).profiles[0].battery_j)


def test_partitions_are_offsets_into_one_index_array(tmp_path):
    parts = [np.array([5, 9]), np.array([], dtype=np.int64), np.array([0, 1, 2])]
    p = Partitions.from_list(parts)
    assert len(p) == 3 and list(p.sizes) == [2, 0, 3] and p.index.tolist() == [5, 9, 0, 1, 2]
    assert [x.tolist() for x in p] == [x.tolist() for x in parts] and p[-1].tolist() == [0, 1, 2]
    with pytest.raises(IndexError):
        p[3]
    again = cached_partition(str(tmp_path), {"k": 1}, lambda: parts)
    read = cached_partition(str(tmp_path), {"k": 1}, lambda: pytest.fail("recomputed"))
    assert isinstance(read, Partitions) and [x.tolist() for x in read] == [x.tolist() for x in again]
    assert Partitions(np.array([0, 2, 5]))[1].tolist() == [2, 3, 4]  # client-major data: no index array


def test_lazy_users_are_generated_by_id_whoever_reads_them():
    kw = dict(alpha=1.0, beta=1.0, num_users=1000, dim=6, num_classes=4, samples_per_user=None, iid=False,
              test_fraction=0.2)
    a, b = SyntheticUsers(3, **kw), SyntheticUsers(3, **kw)
    x, y = UserColumn(a, 0), UserColumn(a, 1)
    off = a.offsets
    k = 417
    idx = np.arange(off[k], off[k + 1])
    for j in range(999, 400, -1):  # read in another order (and push user 417 out of the cache)
        b.user(j)
    np.testing.assert_array_equal(x[idx], b.user(k)[0])
    np.testing.assert_array_equal(y[idx], b.user(k)[1])
    both = np.array([off[2], off[900] + 1, off[2] + 3])  # rows of two users at once
    np.testing.assert_array_equal(x[both], np.stack([a.user(2)[0][0], a.user(900)[0][1], a.user(2)[0][3]]))
    assert x.shape == (int(off[-1]), 6) and y[off[5]] == a.user(5)[1][0]
    np.testing.assert_array_equal(y.flipped(4)[idx], 3 - y[idx])
    assert (a.train_counts + a.test_counts >= 50).all() and (a.test_counts >= 1).all()
    xt, yt = a.test_set(10)
    assert len(xt) == len(yt) == sum(int(a.test_counts[i]) for i in np.linspace(0, 999, 10).astype(int))
    assert not np.array_equal(SyntheticUsers(4, **kw).user(k)[0][:1], a.user(k)[0][:1])


# ---------------------------------------------------------------- the published PR-FL population


def _prfl_population(seed=0):
    from fedray.config import from_dict
    from fedray.devices.population import profiles

    cfg = from_dict({"seed": seed, "data": {"name": "digits", "num_clients": 10}, "devices": {"population": "prfl_paper"}})
    return profiles(cfg)


def test_prfl_paper_has_the_published_means_tiers_by_id_and_compute():
    pop = _prfl_population()
    mb = 1e6  # bytes per second: the cost model's unit
    assert [p.download_bps for p in pop] == [x * mb for x in (20, 18, 12, 10, 6, 4, 2.5, 2, 2, 1.5)]
    assert [p.upload_bps for p in pop] == [x * mb for x in (5, 4, 3, 2.5, 1.5, 1, .6, .5, .5, .4)]
    assert [p.tier for p in pop] == ["fast"] * 2 + ["mid"] * 2 + ["mid_slow"] * 2 + ["slow"] * 4
    assert [p.bw_sigma for p in pop] == [0.3] * 10
    # MAC/s x 2 FLOPs per MAC (the cost model counts FLOPs): 20e12 / 2e12 / 2e12 / 0.2e12 MAC/s
    macs = [20e12] * 2 + [2e12] * 4 + [0.2e12] * 4
    assert [p.flops_per_s for p in pop] == pytest.approx([2 * m for m in macs], rel=1e-12)
    assert list(pop.slow) == [False] * 6 + [True] * 4
    other = _prfl_population(seed=5)  # the seed changes the per-round draws, never the population
    assert [p.tier for p in other] == [p.tier for p in pop] and [p.download_bps for p in other] == [p.download_bps for p in pop]


def test_prfl_paper_links_are_lognormal_per_round_deterministic_by_seed():
    from fedray.devices.cost import CostModel

    pop = _prfl_population()
    args = dict(train_flops=10**9, bytes_down=10**6, bytes_up=10**6, t_start=0.0)
    draw = lambda c, seed, r: CostModel().estimate(pop[c], seed=seed, round_key=r, **args)
    a, b = draw(3, 0, 7), draw(3, 0, 7)
    assert a == b and draw(3, 1, 7).download_bps != a.download_bps and draw(3, 0, 8).download_bps != a.download_bps
    for c in (0, 9):
        down = np.array([draw(c, 0, r).download_bps for r in range(4000)])
        up = np.array([draw(c, 0, r).upload_bps for r in range(4000)])
        # log(bw) is normal with sigma 0.3, mean-preserving: median = mean * exp(-0.3^2 / 2)
        for x, mean in ((down, pop[c].download_bps), (up, pop[c].upload_bps)):
            assert np.std(np.log(x)) == pytest.approx(0.3, rel=0.05)
            assert np.median(x) == pytest.approx(mean * math.exp(-0.045), rel=0.02)
            assert np.mean(x) == pytest.approx(mean, rel=0.02)


@pytest.mark.parametrize("devices, num_clients, starts", [
    ({"population": "prfl_paper"}, 20, "data.num_clients: devices.population prfl_paper has exactly 10 clients, got 20"),
    ({"population": "prfl_paper", "tiers": "clamp"}, 10, "devices.tiers: conflicts with devices.population: prfl_paper"),
    ({"population": "prfl_paper", "link": "fixed", "bw_sigma": 0.5}, 10, "devices.bw_sigma: conflicts with"),
    ({"population": "prfl_paper", "download_bps_range": [1e6, 2e6]}, 10, "devices.download_bps_range: conflicts"),
    ({"population": "prfl_paperz"}, 10, "devices.population: unknown population 'prfl_paperz'; choose from: prfl_paper"),
])
def test_prfl_paper_config_mistakes_are_one_line_naming_the_field(devices, num_clients, starts):
    from fedray.config import from_dict
    from fedray.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        from_dict({"data": {"name": "digits", "num_clients": num_clients}, "devices": devices})
    assert str(e.value).startswith("config error: " + starts) and "\n" not in str(e.value)


def test_prfl_paper_with_other_than_10_clients_is_one_line_and_exit_2_from_the_cli(tmp_path, capsys):
    import yaml

    from fedray.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"name": "digits", "num_clients": 12}, "devices": {"population": "prfl_paper"}}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "config error: data.num_clients: devices.population prfl_paper has exactly 10 clients, got 12"


def test_prfl_paper_accepts_fields_equal_to_its_own():
    from fedray.config import from_dict

    cfg = from_dict({"data": {"name": "digits", "num_clients": 10},
                     "devices": {"population": "prfl_paper", "link": "lognormal", "bw_sigma": 0.3}})
    assert cfg.devices.population == "prfl_paper"


def test_fedray_describe_devices_lists_the_named_populations():
    from fedray.discover import describe

    text = describe("devices")
    assert "devices.population" in text and "  prfl_paper: PR-FL's published device model" in text
    assert "tier presets (devices.tiers): clamp, homogeneous" in text
