"""The device cost model, battery, availability, dropout and straggler helpers (no Ray)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedray.devices import cost as cost_module
from fedray.devices.cost import (
    Cost,
    CostModel,
    available,
    drain,
    dropout_point,
    is_available,
    is_slow,
    recharge,
    straggler_mask,
)
from fedray.devices.profile import DeviceProfile
from fedray.devices.traces import DeviceTrace


def _profile(**kw) -> DeviceProfile:
    base = dict(client_id=0, tier="t", speed=1.0, flops_per_s=2e9, download_bps=1e6, upload_bps=5e5,
                latency_s=0.1, compute_power_w=4.0, radio_power_w=2.0)
    base.update(kw)
    return DeviceProfile(**base)


def _trace(**kw) -> DeviceTrace:
    base = dict(t_s=[0.0, 10.0], cpu_load=[0.5, 0.0], download_bps=[1e6, 2e6], upload_bps=[5e5, 1e6],
                available=[True, False])
    base.update(kw)
    return DeviceTrace(**base)


ARGS = dict(train_flops=1_000_000_000, bytes_down=1_000_000, bytes_up=1_000_000, seed=0, round_key=0)


def test_hand_computed_cost_without_trace():
    c = CostModel().estimate(_profile(cpu_load=0.5), t_start=123.0, **ARGS)
    # 1e9 FLOPs / (2e9 FLOP/s * (1 - 0.5)) = 1 s; 1e6 B / 1e6 B/s = 1 s; 1e6 B / 5e5 B/s = 2 s
    assert c == Cost(compute_s=1.0, download_s=1.0, upload_s=2.0, latency_s=0.1, total_s=4.2,
                     energy_j=4.0 * 1.0 + 2.0 * 3.0, train_flops=10**9, bytes_down=10**6, bytes_up=10**6,
                     cpu_load=0.5, download_bps=1e6, upload_bps=5e5)


def test_conditions_come_from_trace_at_t_start():
    p = _profile(trace=_trace())
    c0 = CostModel().estimate(p, t_start=9.9, **ARGS)
    assert (c0.compute_s, c0.download_s, c0.upload_s, c0.cpu_load) == (1.0, 1.0, 2.0, 0.5)
    c1 = CostModel().estimate(p, t_start=10.0, **ARGS)
    assert (c1.compute_s, c1.download_s, c1.upload_s, c1.cpu_load) == (0.5, 0.5, 1.0, 0.0)
    assert c1.total_s == pytest.approx(0.5 + 0.5 + 1.0 + 0.2)
    assert c1.energy_j == pytest.approx(4.0 * 0.5 + 2.0 * 1.5)
    assert (c1.download_bps, c1.upload_bps) == (2e6, 1e6)


def test_shared_server_link_limits_bandwidth():
    m = CostModel(shared_server_bps=4e6)
    c = m.estimate(_profile(), t_start=0.0, concurrent=8, **ARGS)  # 4e6 / 8 = 5e5 B/s each
    assert (c.download_bps, c.upload_bps) == (5e5, 5e5)
    assert (c.download_s, c.upload_s) == (2.0, 2.0)
    c = m.estimate(_profile(), t_start=0.0, concurrent=1, **ARGS)  # client link is the bottleneck
    assert (c.download_bps, c.upload_bps) == (1e6, 5e5)


def _noisy(cid: int) -> DeviceProfile:
    return _profile(client_id=cid, load_sigma=0.5, bw_sigma=0.3)


def test_noise_deterministic_and_independent_of_call_order():
    m = CostModel(noise_sigma=0.2)
    kw = dict(train_flops=10**9, bytes_down=10**6, bytes_up=10**6, t_start=0.0)
    fwd = [m.estimate(_noisy(c), seed=7, round_key=r, **kw) for c in range(4) for r in range(3)]
    rev = [m.estimate(_noisy(c), seed=7, round_key=r, **kw) for c in reversed(range(4)) for r in reversed(range(3))]
    assert fwd == list(reversed(rev))
    assert fwd[0] != fwd[1]  # another round
    assert fwd[0] != fwd[3]  # another client
    assert m.estimate(_noisy(0), seed=8, round_key=0, **kw) != fwd[0]
    assert m.estimate(_noisy(0), seed=7, round_key=0, **{**kw, "t_start": 99.0}) == fwd[0]  # no trace


def test_bandwidth_noise_is_mean_preserving_and_load_only_slows():
    m = CostModel()
    p = _noisy(3)
    cs = [m.estimate(p, t_start=0.0, train_flops=10**9, bytes_down=1, bytes_up=1, seed=1, round_key=r)
          for r in range(4000)]
    down = np.array([c.download_bps for c in cs])
    assert down.mean() == pytest.approx(1e6, rel=0.02)
    assert np.median(down) < 1e6  # mean-preserving, so the median sits below the mean
    load = np.array([c.cpu_load for c in cs])
    compute = np.array([c.compute_s for c in cs])
    assert load.min() >= 0.0 and load.max() < 1.0
    assert np.mean(load == 0.0) == pytest.approx(0.5, abs=0.05)  # median free share capped at 1
    assert compute.min() == pytest.approx(0.5)  # never faster than the unloaded device
    np.testing.assert_allclose(compute, 0.5 / (1.0 - load))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        CostModel(shared_server_bps=0.0)
    with pytest.raises(ValueError):
        CostModel().estimate(_profile(), t_start=0.0, concurrent=0, **ARGS)
    with pytest.raises(ValueError):
        CostModel().estimate(_profile(), t_start=0.0, **{**ARGS, "round_key": -1})


# ----------------------------------------------------------------------------- battery


def test_battery_drain_and_recharge():
    assert drain(0.5, 100.0, 1000.0) == pytest.approx(0.4)
    assert drain(0.05, 100.0, 1000.0) == 0.0
    assert drain(0.5, 1e9, math.inf) == 0.5
    assert recharge(0.4, 100.0, 2.0, 1000.0) == pytest.approx(0.6)
    assert recharge(0.9, 100.0, 2.0, 1000.0) == 1.0
    assert recharge(0.3, 100.0, 2.0, math.inf) == 0.3


def test_available_combines_availability_and_battery():
    on_battery = _profile(battery_j=1000.0)
    assert available(on_battery, 0.0, 0.05, seed=0)
    assert not available(on_battery, 0.0, 0.049, seed=0)
    assert available(on_battery, 0.0, 0.2, seed=0, low=0.1)
    assert available(_profile(), 0.0, 0.0, seed=0)  # mains powered
    traced = _profile(trace=_trace())
    assert available(traced, 5.0, 1.0, seed=0)
    assert not available(traced, 10.0, 1.0, seed=0)  # the trace says unavailable
    low = _profile(trace=_trace(battery_level=[0.01, 0.9]), battery_j=1000.0)
    assert not available(low, 5.0, 1.0, seed=0)  # the trace's battery wins over the passed level
    windowed = _profile(windows=((0.0, 10.0), (20.0, 30.0)), windows_period_s=100.0, battery_j=1000.0)
    assert available(windowed, 125.0, 0.5, seed=0)
    assert not available(windowed, 115.0, 0.5, seed=0)


def test_is_available_windows():
    p = _profile(windows=((0.0, 10.0), (20.0, 30.0)), windows_period_s=100.0)
    assert [is_available(p, t, seed=0) for t in (0, 5, 10, 15, 25, 30, 105, 115, 125)] == [
        True, True, False, False, True, False, True, False, True]
    q = _profile(windows=((5.0, 6.0),))
    assert [is_available(q, t, seed=0) for t in (4.9, 5.0, 105.0)] == [False, True, False]


def test_on_off_process_fraction_and_determinism():
    ts = np.arange(0.0, 20_000.0, 13.0)
    fracs = []
    for cid in range(20):
        p = _profile(client_id=cid, availability=0.3, availability_cycle_s=100.0)
        states = [is_available(p, t, seed=4) for t in ts]
        cost_module._onoff_batch.cache_clear()  # a fresh process evaluating in reverse agrees
        cost_module._first_on.cache_clear()
        assert [is_available(p, t, seed=4) for t in ts[::-1]] == states[::-1]
        fracs.append(np.mean(states))
        switches = np.count_nonzero(np.diff(states))
        assert 100 < switches < 600  # about 2 switches per 100 s cycle, 200 cycles
    assert np.mean(fracs) == pytest.approx(0.3, abs=0.04)
    p = _profile(client_id=1, availability=0.3, availability_cycle_s=100.0)
    assert [is_available(p, t, seed=4) for t in ts] != [is_available(p, t, seed=5) for t in ts]
    assert is_available(_profile(availability=1.0), 1e9, seed=0)
    assert not is_available(_profile(availability=0.0), 5.0, seed=0)


# ----------------------------------------------------------------------------- dropout, slow, stragglers


def test_dropout_point():
    assert all(dropout_point(_profile(), seed=0, round_key=r) is None for r in range(100))
    always = _profile(dropout_prob=1.0)
    pts = [dropout_point(always, seed=0, round_key=r) for r in range(100)]
    assert all(0.0 <= x < 1.0 for x in pts)
    assert pts == [dropout_point(always, seed=0, round_key=r) for r in range(100)]
    some = _profile(dropout_prob=0.3)
    drops = [dropout_point(some, seed=2, round_key=r) is not None for r in range(3000)]
    assert np.mean(drops) == pytest.approx(0.3, abs=0.03)


def test_is_slow():
    assert is_slow(_profile(speed=0.79))
    assert not is_slow(_profile(speed=0.8))
    assert not is_slow(_profile(speed=2.0))


def test_straggler_mask_by_hand():
    # median 2.5 -> threshold 3.75
    np.testing.assert_array_equal(straggler_mask([1.0, 2.0, 3.0, 10.0]), [False, False, False, True])
    # median 1.25 -> 1.875: nobody
    np.testing.assert_array_equal(straggler_mask([1.0, 1.0, 1.5, 1.6]), [False] * 4)
    np.testing.assert_array_equal(straggler_mask([1.0, 1.0, 1.5, 1.6], gamma=1.0), [False, False, True, True])
    assert straggler_mask([]).shape == (0,)


def test_partial_cost_of_an_abandoned_dispatch():
    """Download energy plus the done fraction of the compute energy, and of the FLOPs."""
    from fedray.devices.cost import CostModel, partial
    from fedray.devices.profile import DeviceProfile

    p = DeviceProfile(client_id=0, tier="t", speed=1.0, flops_per_s=1e9, download_bps=1e6, upload_bps=1e6,
                      compute_power_w=4.0, radio_power_w=2.0)
    c = CostModel().estimate(p, train_flops=2_000_000_000, bytes_down=1_000_000, bytes_up=0, t_start=0.0, seed=0,
                             round_key=0)
    assert c.compute_s == 2.0 and c.download_s == 1.0
    energy, flops = partial(p, c, 0.25)
    assert energy == 2.0 * 1.0 + 4.0 * 0.25 * 2.0  # 4 J
    assert flops == 500_000_000
