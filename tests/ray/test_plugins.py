"""User plugins by import path through the CLI, as a user runs them: ``fedray run`` in a
subprocess whose current directory holds the plugin package (``tests/plugins``: a method,
a model with Embedding + LayerNorm, a regression data set), and the one-line errors for a
structure-needing method on that model, a bad import path and a bad method parameter."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.runkit import run_folder

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests"  # the folder holding the plugin package `plugins`
FEDRAY = Path(sys.executable).parent / "fedray"

TINY = {"experiment": "plugins", "seed": 0,
        "data": {"name": "digits", "num_clients": 8, "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "options": {"hidden": [32]}},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.1},
        "server": {"rounds": 3, "clients_per_round": 4, "eval_every": 1},
        "cluster": {"num_client_actors": 2, "num_cpus": 2},
        "runtime": {"progress": False, "tensorboard": False}}


def fedray_run(tmp_path, *sets, timeout=300):
    """``fedray run tiny.yaml --set ...`` from the plugin package's folder; output under tmp_path."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    args = [str(FEDRAY), "run", str(cfg), "--quiet", "--set", f"runtime.out_dir={tmp_path / 'runs'}",
            "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    for s in sets:
        args += ["--set", s]
    t0 = time.time()
    r = subprocess.run(args, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.time() - t0


def summary(tmp_path, method: str) -> dict:
    return json.loads((run_folder(tmp_path / "runs" / "plugins", method.replace(':', '.')) / "summary.json").read_text())


def assert_ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def assert_finite(s: dict, metric: str = "accuracy"):
    assert s["metric"] == metric
    for k in (f"final_{metric}", f"best_{metric}", "final_loss"):
        assert isinstance(s[k], float) and math.isfinite(s[k]), (k, s[k])
    assert s["rounds"] >= 3 and s["updates"] > 0 and s["bytes_up"] > 0


def one_line_error(r, field: str):
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [x for x in lines if x.startswith("config error:")]
    assert len(errors) == 1 and field in errors[0], r.stderr[-3000:]
    return errors[0]


# ---------------------------------------------------------------- the method


def test_trimmed_mean_server_rule():
    """The plugin's rule itself (no Ray): the extremes of each coordinate are dropped."""
    sys.path.insert(0, str(HERE))
    try:
        from plugins.trimmed import trimmed_mean
    finally:
        sys.path.remove(str(HERE))
    stack = np.array([[0.0, 10.0], [1.0, 1.0], [2.0, 2.0], [3.0, -50.0], [100.0, 3.0]])
    np.testing.assert_allclose(trimmed_mean(stack, 0.2), [2.0, 2.0])  # k = 1 of 5 each side
    np.testing.assert_allclose(trimmed_mean(stack, 0.0), stack.mean(0))
    np.testing.assert_allclose(trimmed_mean(stack[:2], 0.49), stack[:2].mean(0))  # k capped: one value left


def test_trimmed_mean_method_by_import_path(tmp_path):
    r, _ = fedray_run(tmp_path, "method.name=plugins.trimmed:TrimmedMean", "method.beta=0.25")
    assert_ok(r)
    s = summary(tmp_path, "plugins.trimmed:TrimmedMean")
    assert_finite(s)
    assert s["method"] == "plugins.trimmed:TrimmedMean"
    saved = yaml.safe_load((Path(s["run_dir"]) / "config.yaml").read_text())
    assert saved["method"] == {"name": "plugins.trimmed:TrimmedMean", "beta": 0.25}


def test_bad_method_parameter_is_one_line(tmp_path):
    r, wall = fedray_run(tmp_path, "method.name=plugins.trimmed:TrimmedMean", "method.beta=0.7", timeout=60)
    line = one_line_error(r, "method.beta")
    assert "[0, 0.5)" in line and wall < 30


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("method", [["method.name=fedavg"],
                                    ["method.name=fedbuff", "method.buffer_size=2", "method.concurrency=3",
                                     "server.rounds=4"]], ids=["fedavg", "fedbuff"])
def test_layernorm_embedding_model_by_import_path(tmp_path, method):
    r, _ = fedray_run(tmp_path, "model.name=plugins.nets:TokenNet", "model.options={dim: 8}", *method)
    assert_ok(r)
    name = method[0].split("=", 1)[1]
    s = summary(tmp_path, name)
    assert_finite(s)
    saved = np.load(Path(s["run_dir"]) / "model.npz")
    assert {"value.weight", "position.weight", "norm.weight", "norm.bias", "head.weight"} <= set(saved.files)
    assert saved["value.weight"].shape == (17, 8)
    if name == "fedavg":  # it learns: 3 rounds of 4 clients reach about 0.65 (chance: 0.1)
        assert s["final_accuracy"] > 0.3, s["final_accuracy"]


def test_structure_needing_method_on_the_user_model_is_one_line(tmp_path):
    r, _ = fedray_run(tmp_path, "model.name=plugins.nets:TokenNet", "model.options={}", "method.name=heterofl")
    line = one_line_error(r, "model.name")
    assert "heterofl" in line and "plugins.nets:TokenNet" in line and "layer structure" in line


def test_bad_model_import_path_fails_before_ray_starts(tmp_path):
    r, wall = fedray_run(tmp_path, "model.name=nope.nothing:Net", timeout=60)
    line = one_line_error(r, "model.name")
    assert "nope.nothing" in line
    assert wall < 20, wall  # the config check imports it; Ray never starts (a Ray start alone takes longer here)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- the data set and task


def test_diabetes_regression_by_import_path(tmp_path):
    r, _ = fedray_run(tmp_path, "data.name=plugins.diabetes:load", "task.name=regression", "train.lr=0.05")
    s_path = run_folder(tmp_path / "runs" / "plugins", "fedavg") / "summary.json"
    assert s_path.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(s_path.read_text())
    assert_finite(s, "r2")
    assert "final_accuracy" not in s
    assert_ok(r)  # the CLI's closing line names the task's metric
