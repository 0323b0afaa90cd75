"""CLAMP depth controller, personal thresholds, FedPMT / FedDrop depths."""
import numpy as np
import pytest

from fedray.pruning.depth import DepthState, depth_step, feddrop_depth, fedpmt_depth, personal_thresholds

L = 5


def run(state, times, **kw):
    out = []
    for t in times:
        state = depth_step(state, t, 8.0, 12.0, L, **kw)
        out.append(state)
    return out


def test_decrease_after_three_consecutive_slow_rounds():
    states = run(DepthState(3), [20, 20, 20])
    assert [s.depth for s in states] == [3, 3, 2]
    assert states[0] == DepthState(3, 1, -1) and states[1] == DepthState(3, 2, -1)
    assert states[2] == DepthState(2, 0, 0)


def test_increase_after_three_fast_rounds_and_stay_resets():
    states = run(DepthState(3), [5, 5, 10, 5, 5, 5])
    assert [s.depth for s in states] == [3, 3, 3, 3, 3, 4]
    assert states[2] == DepthState(3, 0, 0)  # stay resets the streak


def test_direction_change_restarts_streak():
    states = run(DepthState(3), [20, 20, 5, 5, 5])
    assert [(s.depth, s.streak, s.direction) for s in states] == [
        (3, 1, -1), (3, 2, -1), (3, 1, 1), (3, 2, 1), (4, 0, 0)]


def test_bounds_suggest_stay():
    assert run(DepthState(1, 2, -1), [100])[0] == DepthState(1, 0, 0)
    assert run(DepthState(L, 2, 1), [1])[0] == DepthState(L, 0, 0)


def test_low_battery_suggests_smaller_depth_even_when_fast():
    states = run(DepthState(3), [5, 5, 5], battery_level=0.1, low_battery=0.2)
    assert [s.depth for s in states] == [3, 3, 2]
    assert run(DepthState(3), [10], battery_level=0.5)[0] == DepthState(3, 0, 0)


def test_patience_one_and_bad_inputs():
    assert depth_step(DepthState(2), 20, 8, 12, L, patience=1) == DepthState(1, 0, 0)
    with pytest.raises(ValueError):
        depth_step(DepthState(2), 10, 12, 8, L)
    with pytest.raises(ValueError):
        depth_step(DepthState(6), 10, 8, 12, L)


def test_personal_thresholds():
    lo, hi = personal_thresholds(10.0)
    assert (lo, hi) == pytest.approx((7.5, 12.5))
    # reference target, own spread (12-8)/(2*10) = 0.2 < margin 0.25
    assert personal_thresholds([8, 10, 12], reference_s=4.0) == pytest.approx((3.0, 5.0))
    # noisy client: spread (16-4)/(2*10) = 0.6 widens the band
    assert personal_thresholds([4, 10, 16]) == pytest.approx((4.0, 16.0))
    with pytest.raises(ValueError):
        personal_thresholds([])


def test_fedpmt_and_feddrop():
    assert fedpmt_depth(5, 2) == 2
    with pytest.raises(ValueError):
        fedpmt_depth(5, 0)
    rng = np.random.default_rng(0)
    draws = [feddrop_depth(rng, 4) for _ in range(400)]
    assert set(draws) == {1, 2, 3, 4}
    assert feddrop_depth(np.random.default_rng(1), 4) == feddrop_depth(np.random.default_rng(1), 4)
