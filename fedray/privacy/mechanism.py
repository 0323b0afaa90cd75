"""The DP mechanisms (pure, seeded by the caller).

- :func:`dp_mean` -- DP-FedAvg's server step (McMahan et al. 2018, uniform weights): clip
  every client's move to ``C``, sum, add ``N(0, (z C)^2)`` to every coordinate, divide by the
  *expected* number of contributions ``m`` (fixed, so one client changes the result by at most
  ``C / m``).
- :func:`adaptive_clip` -- Andrew et al. 2021: ``C <- C exp(-eta (b - gamma))`` with ``b``
  the noised fraction of updates that were not clipped (``N(0, sigma_b^2)`` on the count);
  :func:`model_noise` splits the accounted noise multiplier ``z`` between the model and that
  count: ``z_model = (z^-2 - (2 sigma_b)^-2)^(-1/2)``.
- :class:`LocalGaussian` -- local DP: a client channel stage that clips the client's own move
  to ``C`` and adds ``N(0, (z C)^2)`` before it is encoded.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from fedray.aggregation.robust import Stack, clip_factors
from fedray.channel import Stage

__all__ = ["dp_mean", "adaptive_clip", "model_noise", "LocalGaussian"]


def dp_mean(s: Stack, clip: float, z: float, m: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``(sum_i clip_C(u_i) + N(0, (z C)^2)) / m`` per coordinate (keys in sorted order for the noise)."""
    f = clip_factors(s.norms(), clip)
    out = {}
    for k in sorted(s.u):
        total = (s.u[k] * f[:, None]).sum(axis=0)
        out[k] = (total + rng.normal(0.0, z * clip, total.shape)) / m
    return out


def model_noise(z: float, count_noise: float) -> float:
    """The model's share of the noise multiplier when the clipped count takes ``count_noise``."""
    rest = z ** -2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(f"noise multiplier {z} leaves nothing for the model with count noise {count_noise} "
                         f"(needs z < 2 x count_noise = {2 * count_noise})")
    return rest ** -0.5


def adaptive_clip(clip: float, norms: np.ndarray, target_quantile: float, lr: float, count_noise: float, m: int,
                  rng: np.random.Generator) -> float:
    b = (float(np.sum(np.asarray(norms) <= clip)) + rng.normal(0.0, count_noise)) / m
    return float(clip * math.exp(-lr * (b - target_quantile)))


class LocalGaussian(Stage):
    """Client side: clip the move (trained - downloaded, over what it sends) to ``clip`` and add
    ``N(0, (z clip)^2)`` to each sent coordinate. ``info``: ``download``, ``kind`` (``model``
    or ``delta``) and ``rng``."""

    def __init__(self, clip: float, z: float):
        self.clip, self.z = float(clip), float(z)

    def before_encode(self, values: dict, mask, info: Mapping) -> dict:
        if "rng" not in info:
            return values
        base, delta = info["download"], info["kind"] == "delta"
        keys = [k for k in sorted(values) if np.issubdtype(values[k].dtype, np.floating)]
        moves = {k: (np.asarray(values[k], np.float64) if delta else values[k] - np.asarray(base[k], np.float64))
                 for k in keys}
        cover = {k: (np.ones(values[k].shape, bool) if mask is None or k not in mask else np.asarray(mask[k]))
                 for k in keys}
        norm = math.sqrt(sum(float((moves[k][cover[k]] ** 2).sum()) for k in keys))
        f = min(1.0, self.clip / max(norm, 1e-300))
        out = dict(values)
        for k in keys:
            noised = moves[k] * f + np.where(cover[k], info["rng"].normal(0.0, self.z * self.clip, moves[k].shape), 0)
            out[k] = (noised if delta else np.asarray(base[k], np.float64) + noised).astype(values[k].dtype)
        return out
