"""Foundation, end to end on a shared local Ray: outputs, determinism, parity with a plain loop."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from fedray.config import from_dict
from fedray.metrics.recorder import WALL_COLUMNS
from fedray.runtime import schedulers
from fedray.runtime.runner import run

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from plain_fedavg import plain_fedavg, workload_w  # noqa: E402

pytestmark = pytest.mark.ray


def small(tmp_path, **over):
    base = {"experiment": "t", "data": {"num_clients": 20, "cache_dir": str(tmp_path / "cache")},
            "server": {"rounds": 6, "clients_per_round": 5, "eval_every": 2},
            "runtime": {"progress": False, "out_dir": str(tmp_path / "runs")}}
    return from_dict(base, [f"{k}={v}" for k, v in over.items()])


def test_run_writes_outputs(ray_session, tmp_path):
    cfg = small(tmp_path)
    s = run(cfg)
    d = tmp_path / "runs" / "t" / cfg.run_name
    assert s["run_dir"] == str(d) and d.name.startswith("fedavg-s0-") and s["config_hash"] == d.name[-8:]
    for name in ("config.yaml", "summary.json", "model.npz"):
        assert (d / name).is_file(), name
    assert (d / "metrics.parquet").is_dir() and list((d / "metrics.parquet").glob("part-*.parquet"))
    summary = json.loads((d / "summary.json").read_text())
    for key in ("final_accuracy", "best_accuracy", "rounds", "wall_s", "bytes_up", "bytes_down", "train_flops",
                "virtual_s", "energy_j", "sdir"):
        assert key in summary, key
    assert summary["rounds"] == 6 and 0 <= summary["final_accuracy"] <= 1
    t = pq.read_table(d / "metrics.parquet").to_pandas()
    for col in ("round", "client_id", "examples", "train_loss", "bytes_up", "bytes_down", "train_flops", "wall_s",
                "virtual_s"):
        assert col in t.columns, col
    ups = t[t.event == "update"]
    assert len(ups) == 6 * 5
    assert ups.bytes_up.sum() == summary["bytes_up"] and t.train_flops.sum() == summary["train_flops"]
    # every update sends the dense MLP: 64*128 + 128 + 128*10 + 10 float32
    assert (ups.bytes_up == 4 * (64 * 128 + 128 + 128 * 10 + 10)).all()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(d / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("eval/accuracy", "eval/loss", "cost/bytes_up", "cost/train_flops", "time/wall_s",
                "eval/accuracy@virtual_s", "agg/buffer", "agg/fill_s", "summary/sdir", "summary/energy_j"):
        assert tag in tags, tag
    # <tag>@virtual_s: its own step per point, in order, and the exact virtual second as its time
    # (these rounds are shorter than one virtual second: whole seconds put them all on steps 0 and 1)
    evals = t[t.event == "eval"]
    assert evals.virtual_s.max() < 2
    pts = acc.Scalars("eval/accuracy@virtual_s")
    steps = [p.step for p in pts]
    assert steps == sorted(set(steps)) == list(evals.version) == [p.step for p in acc.Scalars("eval/accuracy")]
    assert [p.wall_time for p in pts] == pytest.approx(list(evals.virtual_s), abs=1e-6)
    assert [p.value for p in pts] == pytest.approx(list(evals.accuracy), rel=1e-6)
    # a plain run writes its HParams, each once
    from tensorboard.plugins.hparams import plugin_data_pb2

    hp = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert set(start.hparams) == {"method", "method.server_momentum", "seed", "train.lr", "server.clients_per_round"}
    assert start.hparams["method"].string_value == "fedavg" and "hparams/final_accuracy" in tags
    # the MLP (38 KB) is below Ray's inline size: each round's version travels by value inside
    # the round's calls (6 versions), only the initial one was put (the driver's first reference)
    assert s["model_puts"] == 1 and s["model_inline"] == 6


def _table(summary):
    t = pq.read_table(os.path.join(summary["run_dir"], "metrics.parquet")).to_pandas()
    return t.drop(columns=[c for c in WALL_COLUMNS if c in t.columns])


HETERO = {"devices.tiers": "clamp", "devices.link": "lognormal", "devices.load_sigma": 0.3,
          "devices.noise_sigma": 0.2, "devices.dropout_prob": 0.1}
# the CNN's vectorised updates differ from its one-by-one ones in the last bits, so a grouping
# that depended on the actors would show (groups of 3 dispatches: rounds of 5 split 3+2, 1+3+1, ...)
VECTORISED = {"model.name": "cnn", "model.options": "{channels: [4, 8], hidden: [16]}", "train.vectorise": 3}
# asynchronous, compact submodels whose widths follow the telemetry, curvature scores, recovery
ADAPTIVE = {**HETERO, "method.name": "adaptive_masked_buff", "method.buffer_size": 3, "method.patience": 1,
            "method.rho_min": 0.1}


# 0: no client actors, the aggregator trains the clients itself (synchronous methods)
@pytest.mark.parametrize("over,counts", [({}, (1, 0, 2, 4)), (HETERO, (1, 2, 4, 0)), (VECTORISED, (1, 2, 0)),
                                         (ADAPTIVE, (1, 2))],
                         ids=["homogeneous", "heterogeneous", "vectorised", "adaptive_masked_buff"])
def test_deterministic_whatever_the_actor_count_and_window(ray_session, tmp_path, over, counts, monkeypatch):
    # and whatever the number of rounds the aggregator runs per call: with calls this long the
    # windows grow to the cap after a first call of 2 rounds (6 rounds: 1x6, 2+4, 2+3+1)
    monkeypatch.setattr(schedulers, "CALL_S", 1e9)
    out = []
    for actors, window in zip(counts, (1, 8, 3, 2)):
        cfg = small(tmp_path / str(actors), **{"cluster.num_client_actors": actors,
                                               "cluster.rounds_per_call": window, **over})
        out.append(run(cfg))
    ref = _table(out[0])
    for s in out[1:]:
        assert s["model_sha256"] == out[0]["model_sha256"]
        assert _table(s).equals(ref)
        a = np.load(os.path.join(s["run_dir"], "model.npz"))
        b = np.load(os.path.join(out[0]["run_dir"], "model.npz"))
        assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_matches_plain_pytorch_loop(ray_session, tmp_path):
    """Workload W shortened (40 rounds, 5 local epochs so the end point is stable): mean final
    accuracy over 3 seeds within 3 points of the plain single-process loop."""
    fed, plain = [], []
    for seed in (0, 1, 2):
        w = workload_w(40, **{"train.local_epochs": 5, "seed": seed, "server.eval_every": 40,
                              "runtime.out_dir": str(tmp_path), "runtime.tensorboard": False,
                              "data.cache_dir": str(tmp_path / "cache")})
        cfg = from_dict(w)
        fed.append(run(cfg)["final_accuracy"])
        plain.append(plain_fedavg(cfg, seed=100 + seed)["final_accuracy"])
    assert abs(np.mean(fed) - np.mean(plain)) <= 0.03, (fed, plain)
    assert np.mean(fed) > 0.8


@pytest.mark.parametrize("method", ["fedavg", "fedbuff"])
def test_stop_at_target_ends_at_the_first_evaluation_on_target_and_changes_nothing_before(ray_session, tmp_path, method):
    over = {"method.name": method, "server.rounds": 30, "server.target_accuracy": 0.5}
    full = run(small(tmp_path, **over))
    stop = run(small(tmp_path, **over, **{"server.stop_at_target": "true"}))
    assert full["time_to_target_s"] is not None and stop["time_to_target_s"] == full["time_to_target_s"]
    assert stop["rounds"] < full["rounds"] == 30 and stop["status"] == "completed"
    ev = [pq.read_table(f"{s['run_dir']}/metrics.parquet").to_pandas().query("event == 'eval'") for s in (full, stop)]
    assert ev[1].accuracy.iloc[-1] >= 0.5 > ev[1].accuracy.iloc[:-1].max()  # ends at the first eval on target
    assert ev[1].accuracy.tolist() == ev[0].accuracy.tolist()[: len(ev[1])]
    assert stop["final_accuracy"] == ev[1].accuracy.iloc[-1]
