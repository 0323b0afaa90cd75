"""A user method written against fedray's public API: coordinate-wise trimmed mean.

Use it by import path (this file's folder on the import path, e.g. next to the config)::

    method: {name: "trimmed:TrimmedMean", beta: 0.2}

Every round the selected clients train the whole model and send it (``Assignment`` defaults:
the full model, trained values). The server sorts the round's ``n`` values of every
coordinate, drops the ``k = floor(beta * n)`` largest and ``k`` smallest (at most ``(n-1)//2``
each, so one value is always left) and averages the rest, unweighted (Yin et al., ICML 2018).
Integer tensors (e.g. batch-norm counters) take the largest value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedray.methods.base import Method, Server
from fedray.params import _f


def trimmed_mean(stack: np.ndarray, beta: float) -> np.ndarray:
    """Trimmed mean over axis 0 of ``stack`` (one row per client)."""
    n = stack.shape[0]
    k = min(math.floor(beta * n + 1e-9), (n - 1) // 2)
    kept = np.sort(stack, axis=0)[k:n - k]
    return kept.mean(axis=0)


class TrimmedServer(Server):
    def aggregate(self, global_params, entries, record):
        if not entries:
            return dict(global_params)
        new = {}
        for key, g in global_params.items():
            g = np.asarray(g)
            rows = [np.asarray(e.contribution.values[key]) for e in entries if key in e.contribution.values]
            if not rows:
                new[key] = g.copy()
            elif np.issubdtype(g.dtype, np.floating):
                new[key] = trimmed_mean(np.stack(rows).astype(np.float64), self.params.beta).astype(g.dtype)
            else:
                new[key] = np.max(np.stack([g, *rows]), axis=0).astype(g.dtype)
        return new


class TrimmedMean(Method):
    """Coordinate-wise trimmed mean of the round's full models (robust to outliers)."""

    name = "trimmed_mean"
    paper = "Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates, ICML 2018"
    schedule = "sync"
    feedback = False  # planning ignores finished rounds: rounds may be planned ahead
    Server = TrimmedServer

    @dataclass(frozen=True)
    class Params:
        beta: float = _f(0.1, check=(lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
                         doc="fraction of the largest and of the smallest values dropped per coordinate")
