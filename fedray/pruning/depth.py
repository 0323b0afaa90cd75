"""Depth control: CLAMP / MA-CLAMP client-side controller, FedPMT and FedDrop depths.

A client trains only its last ``d`` layers (``1 <= d <= L``; a layer is a
Linear/Conv2d with its bias and BatchNorm, see :mod:`fedray.models.spec`).

CLAMP depth rule (:func:`depth_step`), with personal thresholds
``T_low < T_high``:

* suggestion ``-1`` when the predicted round time is above ``T_high`` (or the
  battery is below ``low_battery``) and ``d > 1``;
* suggestion ``+1`` when the predicted round time is below ``T_low`` and
  ``d < L`` (and the battery is not low);
* otherwise ``0`` ("stay"), which resets the streak.

A change is applied only after ``patience`` (3) consecutive suggestions in the
same direction; a suggestion in the other direction restarts the streak at 1.
After a change the streak resets to 0. Low battery wins over a "+1".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["DepthState", "depth_step", "personal_thresholds", "fedpmt_depth", "feddrop_depth"]


@dataclass(frozen=True)
class DepthState:
    """Controller state of one client: current depth, length of the current
    run of equal suggestions and their direction (-1, 0 or +1)."""

    depth: int
    streak: int = 0
    direction: int = 0


def _check_depth(d: int, L: int) -> None:
    if L < 1:
        raise ValueError(f"number of layers L must be >= 1, got {L}")
    if not 1 <= d <= L:
        raise ValueError(f"depth must be in 1..{L}, got {d}")


def depth_step(state: DepthState, predicted_round_s: float, t_low: float, t_high: float, L: int, *,
               battery_level: float | None = None, low_battery: float = 0.2, patience: int = 3) -> DepthState:
    """One round of the CLAMP depth rule (pure; returns the new state)."""
    _check_depth(state.depth, L)
    if not t_low < t_high:
        raise ValueError(f"thresholds must satisfy t_low < t_high, got {t_low} and {t_high}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if not math.isfinite(predicted_round_s):
        raise ValueError(f"predicted round time must be finite, got {predicted_round_s}")
    d = state.depth
    battery_low = battery_level is not None and battery_level < low_battery
    if (predicted_round_s > t_high or battery_low) and d > 1:
        suggestion = -1
    elif predicted_round_s < t_low and d < L and not battery_low:
        suggestion = 1
    else:
        suggestion = 0
    if suggestion == 0:
        return DepthState(d, 0, 0)
    streak = state.streak + 1 if suggestion == state.direction else 1
    if streak >= patience:
        return DepthState(d + suggestion, 0, 0)
    return DepthState(d, streak, suggestion)


def personal_thresholds(observed_s: float | Sequence[float], reference_s: float | None = None, *,
                        margin: float = 0.25, max_margin: float = 0.9) -> tuple[float, float]:
    """Personal thresholds ``(T_low,i, T_high,i)`` of one client.

    Our choice (the published rule gives no formula):

    * ``target`` = ``reference_s`` when given -- the round-time target of the
      federation, which we take as the median predicted round time of the
      clients at their initial depth -- else the median of the client's own
      first observed round time(s);
    * the client's personal band half-width is
      ``m_i = min(max(margin, spread_i), max_margin)`` with
      ``spread_i = (max - min) / (2 * median)`` of its first observed times
      (0 for a single observation): a client whose round times are noisy gets
      a wider dead band so that it does not oscillate;
    * ``T_low,i = (1 - m_i) * target``, ``T_high,i = (1 + m_i) * target``.
    """
    obs = np.atleast_1d(np.asarray(observed_s, dtype=np.float64))
    if obs.size == 0 or not np.all(np.isfinite(obs)) or np.any(obs <= 0):
        raise ValueError("observed round times must be a non-empty list of positive numbers")
    if not 0 <= margin < 1 or not 0 < max_margin < 1:
        raise ValueError(f"margins must lie in [0, 1), got margin={margin}, max_margin={max_margin}")
    own = float(np.median(obs))
    if reference_s is None:
        target = own
    else:
        if not (math.isfinite(reference_s) and reference_s > 0):
            raise ValueError(f"reference round time must be positive, got {reference_s}")
        target = float(reference_s)
    spread = float((obs.max() - obs.min()) / (2 * own)) if obs.size > 1 else 0.0
    m = min(max(margin, spread), max_margin)
    if m == 0:
        raise ValueError("margin 0 gives T_low == T_high; use a positive margin")
    return (1 - m) * target, (1 + m) * target


def fedpmt_depth(L: int, d: int) -> int:
    """FedPMT: a fixed number ``d`` of last layers every round (validated ``1..L``)."""
    _check_depth(d, L)
    return int(d)


def feddrop_depth(rng: np.random.Generator, L: int) -> int:
    """FedDrop: a depth drawn uniformly from ``1..L`` (inclusive) with ``rng``."""
    if L < 1:
        raise ValueError(f"number of layers L must be >= 1, got {L}")
    return int(rng.integers(1, L + 1))
