"""Test helpers for whole runs: a small config, a run's metrics table without its wall columns,
and a hook that acts on a run once it has aggregated a version."""
from __future__ import annotations

import os

import pyarrow.parquet as pq

from fedray.config import from_dict
from fedray.metrics.recorder import WALL_COLUMNS
from fedray.runtime import progress


def small(tmp_path, method: dict, out: str, **over):
    base = {"experiment": "rel", "method": method,
            "data": {"name": "digits", "num_clients": 12, "cache_dir": str(tmp_path / "cache")},
            "model": {"name": "mlp", "options": {"hidden": [24, 12]}},
            "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
            "server": {"rounds": 10, "clients_per_round": 4, "eval_every": 2},
            "devices": {"tiers": "clamp", "link": "lognormal", "reference_flops": 2e6, "load_sigma": 0.2,
                        "dropout_prob": 0.1},
            "cluster": {"num_client_actors": 2},
            "runtime": {"progress": False, "tensorboard": False, "out_dir": str(tmp_path / out),
                        "checkpoint_every": 3}}
    return from_dict(base, [f"{k}={v}" for k, v in over.items()])


_REFERENCES: dict[str, dict] = {}


def reference(tmp_path_factory, method: dict) -> dict:
    """The summary of an undisturbed :func:`small` run of ``method``, run once per test session
    (the tests of faults and of resuming compare against the same runs)."""
    import json

    from fedray.runtime.runner import Runner

    key = json.dumps(method, sort_keys=True)
    if key not in _REFERENCES:
        _REFERENCES[key] = Runner(small(tmp_path_factory.mktemp("ref"), method, "ref")).run()
    return _REFERENCES[key]


def table(run_dir):
    t = pq.read_table(os.path.join(run_dir, "metrics.parquet")).to_pandas()
    return t.drop(columns=[c for c in WALL_COLUMNS if c in t.columns])


def stop_after(monkeypatch, version: int, action, once: bool = False):
    """Run ``action(runner)`` once the run has aggregated ``version`` (in the driver); with
    ``once``, only the first time."""
    orig = progress.Progress.__call__
    done = []

    def hooked(self, res, t, rnd):
        orig(self, res, t, rnd)
        if res["version"] >= version and not (once and done):
            done.append(True)
            action(self.run)

    monkeypatch.setattr(progress.Progress, "__call__", hooked)


def run_python(args: list[str], prefix: str = "RESULT ", timeout: float = 600) -> dict:
    """Run ``python args...`` in a fresh process (its own Ray, never the session's) and return the
    JSON after ``prefix`` on its last such stdout line; fails with the output's tail otherwise."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [x for x in p.stdout.splitlines() if x.startswith(prefix or "{")]  # no prefix: a JSON line
    assert p.returncode == 0 and lines, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(lines[-1][len(prefix):])


def run_folder(parent, label, seed=0):
    """The one run folder of ``label`` and ``seed`` under ``parent`` (``<label>-s<seed>-<hash>``)."""
    from pathlib import Path

    found = sorted(p for p in Path(parent).glob(f"{label}-s{seed}-*") if p.is_dir() and len(p.name) ==
                   len(f"{label}-s{seed}-") + 8)
    assert len(found) == 1, (parent, label, seed, found)
    return found[0]
