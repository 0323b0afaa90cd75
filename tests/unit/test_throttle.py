"""Throttle: debt accounting with a fake clock, and a real 0.25x vs 1x wall-time ratio."""
import time
from collections.abc import Callable

import pytest
import torch

from fedray.devices.throttle import Throttle, apply_cpu_share


class FakeTime:
    """A clock that only moves when slept on; each sleep overshoots by ``overshoot`` seconds."""

    def __init__(self, overshoot: float = 0.0):
        self.now = 0.0
        self.overshoot = overshoot
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + self.overshoot


def make(speed: float, overshoot: float = 0.0, **kw) -> tuple[Throttle, FakeTime]:
    fake = FakeTime(overshoot)
    return Throttle(speed, clock=fake.clock, sleep=fake.sleep, **kw), fake


def test_debt_accumulates_until_threshold_then_sleeps_in_one_chunk():
    thr, fake = make(0.5, period_s=0.02)  # factor 1.0, threshold 0.02 * 0.5 = 0.01
    assert thr.threshold_s == pytest.approx(0.01)
    thr.step(0.004)
    thr.step(0.004)
    assert fake.sleeps == [] and thr.debt_s == pytest.approx(0.008)
    thr.step(0.004)
    assert fake.sleeps == [pytest.approx(0.012)] and thr.debt_s == pytest.approx(0.0)
    assert thr.measured.busy_s == pytest.approx(0.012) and thr.measured.steps == 3
    assert thr.measured.sleep_s == pytest.approx(0.012)


def test_overshoot_is_credited_so_total_never_drifts():
    thr, fake = make(0.25, overshoot=0.002, period_s=0.02)  # factor 3, threshold 0.015
    thr.step(0.01)  # debt 0.03 -> sleeps 0.03, actually 0.032 -> debt -0.002
    assert fake.sleeps == [pytest.approx(0.03)] and thr.debt_s == pytest.approx(-0.002)
    thr.step(0.005)  # debt -0.002 + 0.015 = 0.013 < threshold: no sleep
    assert len(fake.sleeps) == 1 and thr.debt_s == pytest.approx(0.013)
    for _ in range(200):
        thr.step(0.001)
    thr.flush()
    owed = thr.measured.busy_s * 3
    assert thr.measured.sleep_s == pytest.approx(owed, abs=0.002 + 1e-9)  # off by <= one overshoot
    assert thr.measured.wall_s == pytest.approx(thr.measured.busy_s * 4, abs=0.002 + 1e-9)
    assert all(s >= thr.threshold_s for s in fake.sleeps[:-1])  # chunks, except the flush


def test_threshold_never_below_min_sleep():
    thr, fake = make(0.9, period_s=0.005)  # 0.005 * 0.1 = 0.0005 < 1 ms
    assert thr.threshold_s == pytest.approx(1e-3)
    thr.step(0.0045)  # debt 0.0045 / 9 = 0.0005: no sleep
    assert fake.sleeps == []


def test_timed_measures_block_with_clock():
    thr, fake = make(0.5, period_s=0.02)
    with thr.timed():
        fake.now += 0.05
    assert thr.measured.busy_s == pytest.approx(0.05)
    assert fake.sleeps == [pytest.approx(0.05)]


def test_speed_at_least_one_never_sleeps():
    for speed in (1.0, 2.5):
        thr, fake = make(speed)
        for _ in range(100):
            thr.step(0.1)
        thr.flush()
        assert fake.sleeps == [] and thr.measured.sleep_s == 0.0
        assert thr.measured.busy_s == pytest.approx(10.0)


@pytest.mark.parametrize("speed", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_invalid_speed_raises(speed):
    with pytest.raises(ValueError, match="speed"):
        Throttle(speed)


def test_invalid_busy_and_threads_raise():
    thr, _ = make(0.5)
    with pytest.raises(ValueError, match="busy_s"):
        thr.step(-0.1)
    with pytest.raises(ValueError, match="threads"):
        Throttle(0.5, threads=0)


def test_apply_cpu_share_sets_torch_threads():
    old = torch.get_num_threads()
    try:
        assert Throttle(0.5).apply_cpu_share() is None
        assert Throttle(0.5, threads=1).apply_cpu_share() == old
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def _workload(steps: int = 30) -> tuple[Callable[[], None], int]:
    """CPU-bound training steps on a small MLP (working set ~100 KB: small cache effects)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.Tanh(), torch.nn.Linear(96, 96),
                                torch.nn.Tanh(), torch.nn.Linear(96, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 96), torch.randint(0, 10, (64,))

    def train_step() -> None:
        for _ in range(12):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    return train_step, steps


def test_quarter_speed_takes_about_four_times_the_wall_time():
    """The same training steps alternate between a 1x and a 0.25x throttle, so both meet the same
    box conditions (a 2-core VM whose speed drifts by tens of percent between runs); each
    throttle's measured wall time (busy + real sleep) must add up to the real elapsed time."""
    old = apply_cpu_share(1)
    try:
        train_step, steps = _workload()
        for _ in range(5):
            train_step()  # warm-up
        fast, slow = Throttle(1.0), Throttle(0.25)
        start = time.perf_counter()
        for _ in range(steps):
            for throttle in (fast, slow):
                with throttle.timed():
                    train_step()
        slow.flush()
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(old)
    assert fast.measured.sleep_s == 0.0 and slow.measured.steps == steps
    assert fast.measured.wall_s + slow.measured.wall_s == pytest.approx(elapsed, rel=0.02)
    ratio = slow.measured.wall_s / fast.measured.wall_s
    assert 3.0 <= ratio <= 5.0, ratio
