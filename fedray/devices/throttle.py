"""Real throttling of a client actor: a duty-cycle controller that makes a ``speed``-x device
take ``1 / speed`` times the wall time of the work it does.

How the CPU share of a device is enforced in real mode (three layers):
1. Ray's ``num_cpus`` resource request for the actor (the scheduler's share of the box);
2. ``torch.set_num_threads`` to the device's thread count (``apply_cpu_share``);
3. this duty cycle: after each unit of work that was busy ``b`` seconds, sleep
   ``b * (1 / speed - 1)`` so the busy fraction of the wall time is ``speed``.

Conventions
-----------
- Busy time is measured with ``time.perf_counter`` (wall time of the step). We chose it over
  ``time.thread_time``/``process_time`` because (a) torch runs intra-op work on other threads,
  which ``thread_time`` does not see and ``process_time`` multiplies by the thread count, and
  (b) on a loaded box a preempted step is slow at every speed, so scaling the step's wall time
  keeps ``wall(speed) / wall(1.0) = 1 / speed`` whatever the contention, whereas CPU time would
  under-throttle exactly when the box is busy. The interpretation: the device needs ``1/speed``
  times what the work took here, under the current conditions.
- Debt: owed sleep accumulates across steps and is paid once it reaches
  ``threshold_s = max(min_sleep_s, period_s * (1 - speed))`` (one duty-cycle period's off
  part, never below ~1 ms), so short steps sleep in chunks. The sleep actually taken (measured
  with the clock, overshoot included) is subtracted from the debt, which may go negative, so
  the total never drifts. ``flush()`` pays what is left at the end of the work.
- The default period is 0.2 s: on these machines a step that follows a sleep runs measurably
  slower (cold caches), and the duty cycle scales that penalty too; sleeping rarely, in chunks of
  at most ``0.2 * (1 - speed)`` s, keeps it negligible (measured ratio of a 0.25x to a 1x device
  ~4 instead of ~5-6 with a 20 ms period).
- ``speed >= 1`` never sleeps (busy time is still counted).
- Known bias: work that resumes after a sleep runs slower for a while (cold caches, possibly
  another core), and that slower busy time is scaled too. On the 2-core dev VM, separate 1x and
  0.25x runs of small torch training steps measured ratios of ~4.0-4.5 (quiet box) and 2.5-6
  when other processes loaded it; steps interleaved in one loop measure ~4.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class ThrottleStats:
    """Measured seconds: ``busy_s`` of work, ``sleep_s`` of throttle sleep, ``steps`` counted."""

    busy_s: float = 0.0
    sleep_s: float = 0.0
    steps: int = 0

    @property
    def wall_s(self) -> float:
        """Busy plus throttle sleep: the seconds the device was measured to take."""
        return self.busy_s + self.sleep_s


def apply_cpu_share(num_threads: int) -> int:
    """Set torch's intra-op thread count to the device's ``num_threads``; return the old one."""
    if int(num_threads) < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    return previous


class Throttle:
    """Duty-cycle controller; ``step(busy_s)`` after each unit of work or ``with timed():``."""

    def __init__(self, speed: float, *, period_s: float = 0.2, threads: int | None = None,
                 min_sleep_s: float = 1e-3, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep):
        if not (isinstance(speed, (int, float)) and not isinstance(speed, bool)
                and math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a finite number > 0, got {speed!r}")
        if not (math.isfinite(period_s) and period_s > 0):
            raise ValueError(f"period_s must be a finite number > 0, got {period_s!r}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        self.speed = float(speed)
        self.period_s = float(period_s)
        self.threads = threads
        self._clock, self._sleep = clock, sleep
        self.factor = max(0.0, 1.0 / self.speed - 1.0)  # sleep seconds owed per busy second
        self.threshold_s = max(min_sleep_s, self.period_s * max(0.0, 1.0 - self.speed))
        self.debt_s = 0.0
        self.measured = ThrottleStats()

    def apply_cpu_share(self) -> int | None:
        """Apply ``threads`` via ``torch.set_num_threads``; return the old count (None if unset)."""
        return None if self.threads is None else apply_cpu_share(self.threads)

    def step(self, busy_s: float) -> None:
        """Record a unit of work that was busy ``busy_s`` seconds; sleep off the debt if due."""
        if not (math.isfinite(busy_s) and busy_s >= 0):
            raise ValueError(f"busy_s must be a finite number >= 0, got {busy_s!r}")
        self.measured.busy_s += busy_s
        self.measured.steps += 1
        if self.factor == 0.0:
            return
        self.debt_s += busy_s * self.factor
        if self.debt_s >= self.threshold_s:
            self._pay()

    def flush(self) -> None:
        """Pay any positive debt now (call at the end of the work so the total is exact)."""
        if self.debt_s > 0:
            self._pay()

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Measure the block with the clock, then ``step`` it (not when the block raises)."""
        start = self._clock()
        yield
        self.step(max(0.0, self._clock() - start))

    def _pay(self) -> None:
        start = self._clock()
        self._sleep(self.debt_s)
        slept = max(0.0, self._clock() - start)
        self.measured.sleep_s += slept
        self.debt_s -= slept
