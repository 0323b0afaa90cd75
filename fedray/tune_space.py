"""The Tune ``param_space`` of a ``fedray tune`` search, and what the user sees while it runs.

Conventions:

- A space with a continuous domain (uniform, loguniform, randint) is Tune's own: grids are
  crossed with ``num_samples`` random draws of the other domains.
- A *categorical* space (only ``grid`` and ``choice``) is drawn without replacement: for every
  grid point, ``num_samples`` distinct combinations of the choice values, in an order seeded by
  the config's ``seed``. When ``num_samples`` is at least the number of choice combinations,
  every combination runs once and no more: a repeat would reproduce the same run bit for bit
  (same config, same seed), so the search has ``grid points x min(num_samples, combinations)``
  trials. The points are fixed before the search starts (a ``grid_search`` over their index,
  key :data:`POINT`, with each field resolved from it), so ``--resume`` keeps them.
- Output: Tune's status tables are off (:func:`tune_environment`); :class:`TrialLines` prints one line per finished (or
  failed) trial, and the CLI prints the best trial at the end.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
from typing import Mapping

import numpy as np

POINT = "point"  # the trial's index among the precomputed points of a categorical space
CATEGORICAL = ("grid", "choice")


def categorical(space: Mapping[str, tuple]) -> bool:
    return all(kind in CATEGORICAL for kind, _ in space.values())


def points(space: Mapping[str, tuple], num_samples: int, seed: int) -> list[dict]:
    """The configurations of a categorical space (see module doc), each keyed like ``space``."""
    grid = [k for k, (kind, _) in space.items() if kind == "grid"]
    choice = [k for k, (kind, _) in space.items() if kind == "choice"]
    combos = list(itertools.product(*(space[k][1] for k in choice)))
    rng = np.random.default_rng([int(seed), 0x74756E65])  # "tune"
    out = []
    for g in itertools.product(*(space[k][1] for k in grid)):
        for i in rng.permutation(len(combos))[:num_samples]:
            values = {**dict(zip(grid, g)), **dict(zip(choice, combos[i]))}
            out.append({k: values[k] for k in space})
    return out


def param_space(space: Mapping[str, tuple], num_samples: int, seed: int) -> tuple[dict, int]:
    """(Tune ``param_space`` keyed by field path, Tune ``num_samples``)."""
    from ray import tune

    if categorical(space):
        pts = points(space, num_samples, seed)
        ps = {POINT: tune.grid_search(list(range(len(pts))))}
        for k in space:
            ps[k] = tune.sample_from(lambda config, k=k: pts[config[POINT]][k])
        return ps, 1
    make = {"grid": lambda a: tune.grid_search(list(a)), "choice": lambda a: tune.choice(list(a)),
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a)}
    return {k: make[kind](args) for k, (kind, args) in space.items()}, num_samples


def field_values(config: Mapping) -> dict:
    """A trial's config without the :data:`POINT` index: field path -> value."""
    return {k: v for k, v in config.items() if k != POINT}


# Tune's switches, set while the search runs and restored afterwards:
TUNE_ENVIRONMENT = {
    # the older console engine: at ``verbose=0`` it prints nothing, where the newer one still prints
    # its experiment box and paths (Ray's documented switch)
    "RAY_AIR_NEW_OUTPUT": "0",
    # no TensorBoard logger of Tune's own: its event files (one per trial folder) would show up as
    # extra runs beside each trial's ``run/tb`` under ``tensorboard --logdir runs`` (the CSV and
    # JSON loggers are passed explicitly)
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


@contextlib.contextmanager
def tune_environment():
    """:data:`TUNE_ENVIRONMENT` while the search runs, the previous values restored afterwards."""
    old = {k: os.environ.get(k) for k in TUNE_ENVIRONMENT}
    os.environ.update(TUNE_ENVIRONMENT)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def trial_count(space: Mapping[str, tuple], num_samples: int) -> int:
    """How many trials the search has (see module doc)."""
    if categorical(space):
        return len(points(space, num_samples, 0))
    return int(np.prod([len(args) for kind, args in space.values() if kind == "grid"])) * num_samples


def trial_lines(keys, metric: str, total: int, stream=None):
    """A Tune callback printing one line per finished or failed trial (see module doc)."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self):
            self.done = 0

        def _line(self, trials, trial, text):
            self.done += 1
            vals = ", ".join(f"{k}={trial.config.get(k)!r}" for k in keys)
            print(f"trial {self.done}/{max(total, len(trials))} {text} ({vals})", file=stream or sys.stdout, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            got = r.get(metric)
            score = f"{metric} {got:.4f}" if isinstance(got, (int, float)) else f"no {metric}"
            self._line(trials, trial, f"done: {score} at version {r.get('version', '?')}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, "failed (see its error.txt)")

    return TrialLines()
