"""Asynchronous, interval, deadline and HeteroFL methods end to end on a local Ray.

Every run is digits + a tiny MLP on 20 clients for a few aggregations. Also:
one ``ray.put`` per model version whatever the number of clients, and
injected client failures become ``reject`` events while the run goes on.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from fedray.config import from_dict
from fedray.methods import registry
from fedray.runtime.runner import Runner

TIERS = [{"name": "slow", "fraction": 0.5, "speed_range": [0.1, 0.3]},
         {"name": "fast", "fraction": 0.5, "speed_range": [1.0, 2.0]}]


def config(tmp_path, method: dict, *, clients=20, per_round=5, rounds=3, **sections):
    data = {
        "experiment": "async",
        "method": method,
        "data": {"name": "digits", "num_clients": clients, "cache_dir": str(tmp_path / "cache")},
        "model": {"name": "mlp", "options": {"hidden": [16]}},
        "train": {"local_steps": 2, "batch_size": 16, "lr": 0.1},
        "server": {"rounds": rounds, "clients_per_round": per_round, "eval_every": 1},
        "devices": {"tiers": TIERS, "reference_flops": 1e6},  # slow compute: stragglers and staleness show
        "cluster": {"num_client_actors": 1, "client_actor": {"num_cpus": 0.5}},
        "runtime": {"out_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False, "device": "cpu"},
    }
    data.update(sections)
    return from_dict(data)


def events(summary):
    return pq.read_table(f"{summary['run_dir']}/metrics.parquet").to_pylist()


class FailingRunner(Runner):
    """Test-only: injects client failures (``Task.fail``) into chosen dispatches."""

    def __init__(self, cfg, fail: dict[int, str]):
        super().__init__(cfg)
        self.fail = fail

    def _start(self):
        super()._start()
        groups = self.dispatcher.groups

        def failing(recs):
            for r in recs:
                if r.dispatch_id in self.fail:
                    r.task = replace(r.task, fail=self.fail[r.dispatch_id])
            return groups(recs)

        self.dispatcher.groups = failing


def check_run(cfg, summary, rounds=3):
    """summary.json on disk, finite accuracy, one put per version; returns the event rows."""
    on_disk = json.loads((cfg.run_dir / "summary.json").read_text())
    assert on_disk["method"] == cfg.method.name and on_disk["version"] == summary["version"] == rounds
    assert math.isfinite(summary["final_accuracy"]) and 0.0 <= summary["final_accuracy"] <= 1.0
    assert math.isfinite(summary["final_loss"])
    # one object per model version, whatever the number of clients
    if registry.get(cfg.method.name).schedule != "sync":  # every aggregation publishes a version
        assert summary["model_puts"] == summary["version"] + 1 and summary["model_inline"] == 0
    elif summary["model_inline"]:  # a small model travels by value inside each round's calls
        assert summary["model_puts"] == 1 and summary["model_inline"] == rounds
    else:  # versions 0..rounds-1 are put once each (the last one trains nobody)
        assert summary["model_puts"] == rounds
    rows = events(summary)
    assert summary["updates"] == len([r for r in rows if r["event"] == "update"]) > 0
    assert len([r for r in rows if r["event"] == "aggregate"]) == rounds
    return rows


@pytest.mark.parametrize("method", [{"name": "fedasync", "concurrency": 4},
                                    {"name": "fedfix", "interval_s": 1.0, "concurrency": 5}], ids=lambda m: m["name"])
def test_async_method_runs_end_to_end(ray_session, tmp_path, method):
    cfg = config(tmp_path, method)
    summary = Runner(cfg).run()
    rows = check_run(cfg, summary)
    assert summary["rejected"] == 0
    assert max(r["staleness"] for r in rows if r["event"] == "update") >= 1  # asynchrony actually happened


def test_fedbuff_with_injected_client_failures(ray_session, tmp_path, capsys):
    """Injected failures become reject events with their reason; the run goes on to the end, and
    the first client error's text reaches the summary and one warning line (regression: a method
    whose every compact client crashed ran to the end with only the count ``client_error`` shown)."""
    cfg = config(tmp_path, {"name": "fedbuff", "buffer_size": 3, "concurrency": 5})
    summary = FailingRunner(cfg, {1: "raise", 3: "nan"}).run()
    assert summary["client_error"] == "RuntimeError: injected client failure"
    assert "warning: fedbuff seed 0: 1 updates failed on the client, the first with RuntimeError: injected client " \
           "failure" in capsys.readouterr().err
    rows = check_run(cfg, summary)
    rejects = {r["dispatch_id"]: r["reason"] for r in rows if r["event"] == "reject"}
    assert rejects == {1: "client_error", 3: "nonfinite"}
    assert summary["rejected"] == 2 and summary["rejected_by_reason"] == {"client_error": 1, "nonfinite": 1}
    assert summary["updates"] == 3 * 3  # K = 3 valid deltas per aggregation
    assert max(r["staleness"] for r in rows if r["event"] == "update") >= 1


def test_heterofl_runs_end_to_end(ray_session, tmp_path):
    cfg = config(tmp_path, {"name": "heterofl"})
    summary = Runner(cfg).run()
    rows = check_run(cfg, summary)
    updates = [r for r in rows if r["event"] == "update"]
    widths = {r["client_id"]: r["width"] for r in updates}
    assert set(widths.values()) <= {1.0, 0.5, 0.25, 0.125, 0.0625} and len(set(widths.values())) > 1
    fast = [widths[r["client_id"]] for r in updates if r["tier"] == "fast"]
    slow = [widths[r["client_id"]] for r in updates if r["tier"] == "slow"]
    assert fast and slow and min(fast) >= max(slow)  # the fastest clients train the widest models
    by_width = {r["width"]: (r["bytes_down"], r["bytes_up"], r["train_flops"] / r["examples"]) for r in updates}
    ws = sorted(by_width)
    assert all(by_width[a][i] < by_width[b][i] for a, b in zip(ws, ws[1:]) for i in range(3))


def test_deadline_fedavg_with_100_clients_costs_one_put_per_version(ray_session, tmp_path):
    """100 clients per round: the model is put once per version, not once per client; stragglers
    past 1.5 x the median predicted round time are dropped as ``late``."""
    cfg = config(tmp_path, {"name": "fedavg_deadline"}, clients=100, per_round=100, rounds=2,
                 train={"local_steps": 1, "batch_size": 8},
                 model={"name": "mlp", "options": {"hidden": [512]}})  # 153 KB: above Ray's inline size
    summary = Runner(cfg).run()
    rows = check_run(cfg, summary, rounds=2)
    assert summary["model_puts"] == 2  # one per version sent (2 rounds), not one per client
    late = [r for r in rows if r["event"] == "late"]
    assert summary["late"] == len(late) > 0 and all(r["tier"] == "slow" for r in late)
    assert summary["updates"] + summary["late"] == 200
