"""Every random draw comes from (seed, purpose, round/version, client id).

Generators are derived with numpy's ``SeedSequence`` from the run seed, a
fixed purpose code and integer keys, so a draw never depends on the order in
which other draws happened, on the number of actors, or on which worker ran.
"""
from __future__ import annotations

import numpy as np

PURPOSES = {
    "init": 1,
    "select": 2,
    "train": 3,
    "partition": 4,
    "devices": 5,
    "noise": 6,
    "dropout": 7,
    "availability": 8,
    "mask": 9,
    "explore": 10,
    "split": 11,
    "client_eval": 12,
    "attack": 13,
    "attack_noise": 14,
    "dp": 15,
    "local_dp": 16,
}


def _entropy(seed: int, purpose: str, keys) -> list[int]:
    return [int(seed), PURPOSES[purpose], *(int(k) for k in keys)]


def rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A generator for one purpose and key tuple (e.g. ``rng(s, "select", round)``)."""
    return np.random.default_rng(_entropy(seed, purpose, keys))


def derive(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit integer seed (for torch) derived the same way."""
    return int(np.random.SeedSequence(_entropy(seed, purpose, keys)).generate_state(1, np.uint64)[0] >> 1)
