"""End to end on local Ray: every pruning method runs a few aggregations on digits."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from fedray import config as C
from fedray.runtime.runner import Runner

METHODS = {
    "clamp": ({"initial_depth": 2}, "depth"),
    "ma_clamp": ({"initial_depth": 2, "rho": 0.5}, "depth"),
    "fedpmt": ({"depth": 2}, "depth"),
    "feddrop": ({}, "depth"),
    "prfl": ({"interval_s": 0.02, "recompute_every": 2, "patience": 1}, "density"),
    "cahfp": ({}, "keep_ratio"),
    "adaptive_masked_buff": ({"buffer_size": 3, "patience": 1}, "keep_ratio"),
    "autoflip": ({"explore_epochs": 1, "refresh": True}, "density"),
    "random_prune": ({"explore_epochs": 1}, "density"),
}
SEED_METRICS = ("sdir", "time_to_target_s", "train_flops", "bytes_up", "bytes_down", "energy_j")


def _cfg(name: str, params: dict, tmp: Path):
    return C.from_dict({
        "experiment": "pruning", "seed": 0, "method": {"name": name, **params},
        "data": {"name": "digits", "num_clients": 20, "cache_dir": str(tmp / "cache")},
        "model": {"name": "mlp", "options": {"hidden": [32, 16]}},
        "train": {"local_epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 1e-3},
        "server": {"rounds": 3, "clients_per_round": 5, "target_accuracy": 0.5},
        "devices": {"tiers": "clamp"},
        "cluster": {"num_client_actors": 1},
        "runtime": {"progress": False, "tensorboard": False, "out_dir": str(tmp / "runs")},
    })


@pytest.mark.parametrize("name", list(METHODS))
def test_method_runs_end_to_end(ray_session, tmp_path, name):
    params, column = METHODS[name]
    summary = Runner(_cfg(name, params, tmp_path)).run()
    assert summary["rounds"] == 3
    assert math.isfinite(summary["final_accuracy"]) and 0.0 <= summary["final_accuracy"] <= 1.0
    saved = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    for key in SEED_METRICS:
        assert key in saved, key
    assert saved["train_flops"] > 0 and saved["bytes_up"] > 0 and saved["bytes_down"] > 0
    table = pd.read_parquet(Path(summary["run_dir"]) / "metrics.parquet")
    updates = table[table["event"] == "update"]
    assert len(updates) > 0 and updates[column].notna().all()


def test_structured_autoflip_executes_fewer_flops_than_fedavg(ray_session, tmp_path):
    """Regression: AutoFLIP's structured part only zeroed whole neurons of the full model, so its
    executed ``train_flops`` exceeded FedAvg's (exploration round included); now it trains the
    compact model and the sparse FLOPs (unmasked weights only) sit below the executed ones."""
    flip = Runner(_cfg("autoflip", {"explore_epochs": 1, "q": 0.6}, tmp_path)).run()
    avg = Runner(_cfg("fedavg", {}, tmp_path)).run()
    assert flip["train_flops"] < avg["train_flops"]
    assert flip["sparse_train_flops"] < flip["train_flops"]
    table = pd.read_parquet(Path(flip["run_dir"]) / "metrics.parquet")
    phase1 = table[(table["event"] == "update") & (table["phase"] == 1)]
    assert len(phase1) > 0 and (phase1["bytes_up"] < table[table["phase"] == 0]["bytes_up"].min()).all()


def test_cahfp_server_scoring_every_two_rounds_end_to_end(ray_session, tmp_path):
    """Server scoring through the aggregator (scores broadcast, terms in the upload, channel sets in
    the per-client store): every update is accepted and each client's compact model is summarised."""
    cfg = _cfg("cahfp", {"score_every": 2, "scoring": "server"}, tmp_path)
    cfg = C.from_dict({**C.to_dict(cfg), "data": {**C.to_dict(cfg)["data"], "num_clients": 5}})
    summary = Runner(cfg).run()
    saved = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert saved["rejected"] == 0 and saved["updates"] == 15
    assert len(saved["compact_by_client"]) == 5 and saved["compact_params_mean"] > 0
    table = pd.read_parquet(Path(summary["run_dir"]) / "metrics.parquet")
    ups = table[table["event"] == "update"]
    part = ups[ups["keep_ratio"] < 1.0]
    assert part["scored"].tolist() == [True] * len(part[part["round"] == 0]) + [False] * len(part[part["round"] == 1]) \
        + [True] * len(part[part["round"] == 2])
    assert (part["compact_flops"] < ups["compact_flops"].max()).all()
