"""fedray.report: table numbers from summary.json, time to target, missing keys, plots (no Ray)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from fedray import report as R
from fedray.cli import main
from fedray.errors import DataError
from fedray.metrics.recorder import Recorder


def make_run(root, label, seed, summary, *, target=None, evals=((0.0, 0.2), (1.5, 0.6), (3.0, 0.8)),
             experiment="exp", folder=None, train=None):
    d = root / experiment / (folder or f"{label}-s{seed}")
    rec = Recorder(d, tensorboard=False)
    for i, (vs, acc) in enumerate(evals):
        rec.event(event="update", round=i, version=i, dispatch_id=i, client_id=0, examples=10, bytes_up=100,
                  bytes_down=200, train_flops=1000, virtual_s=vs)
        rec.event(event="eval", round=i, version=i + 1, accuracy=acc, loss=1.0 - acc, virtual_s=vs)
    rec.close({"experiment": experiment, "method": label.split("+")[0], "seed": seed, **summary})
    cfg = {"experiment": experiment, "seed": seed, "method": {"name": label},
           "server": {"target_accuracy": target}, **({"train": train} if train else {})}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def test_table_numbers_equal_summaries(tmp_path):
    s = {
        ("fedavg", 0): {"final_accuracy": 0.81, "train_flops": 1.0e9, "bytes_up": 1000, "bytes_down": 3000,
                        "sdir": 1.0, "energy_j": 12.0, "time_to_target_s": 40.0},
        ("fedavg", 1): {"final_accuracy": 0.79, "train_flops": 1.2e9, "bytes_up": 1100, "bytes_down": 3300,
                        "sdir": 1.0, "energy_j": 14.0, "time_to_target_s": None},
        ("fedbuff", 0): {"final_accuracy": 0.70, "train_flops": 5.0e8, "bytes_up": 900, "bytes_down": 2000},
        ("fedbuff", 1): {"final_accuracy": 0.74, "train_flops": 7.0e8, "bytes_up": 950, "bytes_down": 2100},
    }
    for (m, seed), v in s.items():
        make_run(tmp_path, m, seed, v)
    out = R.write_report(tmp_path / "exp")
    rows = {r["label"]: r for r in csv.DictReader(open(out["csv"]))}
    for m in ("fedavg", "fedbuff"):
        for key in ("final_accuracy", "train_flops", "bytes_up", "bytes_down"):
            vals = [s[(m, 0)][key], s[(m, 1)][key]]
            assert float(rows[m][f"{key}_mean"]) == pytest.approx(np.mean(vals), rel=1e-12)
            assert float(rows[m][f"{key}_std"]) == pytest.approx(np.std(vals, ddof=1), rel=1e-12)
    md = out["markdown"].read_text()
    fa = [0.81, 0.79]
    assert f"{np.mean(fa):.4f} ± {np.std(fa, ddof=1):.4f}" in md
    assert R.cell([1.0e9, 1.2e9], "count") in md and "1.1 G ± 141 M" in md
    # time to target: one seed reached it
    assert "40 (1/2 reached)" in md
    # fedbuff has no sdir / layer sdir / energy / target -> dashes
    fb = next(line for line in md.splitlines() if line.startswith("| fedbuff"))
    assert fb.count(R.DASH) == 4
    assert rows["fedbuff"]["sdir_n"] == "0" and rows["fedbuff"]["sdir_mean"] == ""
    for p in out["plots"]:
        assert p.is_file() and p.stat().st_size > 1000


def test_time_to_target_from_events_when_summary_lacks_it(tmp_path):
    make_run(tmp_path, "a", 0, {"final_accuracy": 0.8}, target=0.5)   # eval at 1.5 s reaches 0.6
    make_run(tmp_path, "a", 1, {"final_accuracy": 0.8}, target=0.5,   # eval at 3.0 s reaches 0.8
             evals=((0.0, 0.2), (1.5, 0.4), (3.0, 0.8)))
    make_run(tmp_path, "b", 0, {"final_accuracy": 0.8}, target=0.95)  # never
    recs = R.find_runs(tmp_path)
    assert [R.time_to_target(r) for r in recs] == [1.5, 3.0, None]
    rows = {r["label"]: r for r in R.aggregate(recs)}
    assert R.cell(rows["a"]["values"]["time_to_target_s"], "seconds") == f"2.25 ± {np.std([1.5, 3.0], ddof=1):.4g}"
    assert R.cell(rows["b"]["values"]["time_to_target_s"], "seconds") == "not reached"


def test_curves_are_cumulative(tmp_path):
    make_run(tmp_path, "a", 0, {"final_accuracy": 0.8})
    c = R.curves(R.find_runs(tmp_path)[0])
    np.testing.assert_allclose(c["bytes"], [300, 600, 900])
    np.testing.assert_allclose(c["train_flops"], [1000, 2000, 3000])
    np.testing.assert_allclose(c["accuracy"], [0.2, 0.6, 0.8])


def test_single_seed_has_no_spread_and_nan_is_missing(tmp_path):
    make_run(tmp_path, "a", 3, {"final_accuracy": float("nan"), "bytes_up": 2048})
    rows = R.aggregate(R.find_runs(tmp_path))
    assert R.cell(rows[0]["values"]["final_accuracy"], "accuracy") == R.DASH
    assert R.cell(rows[0]["values"]["bytes_up"], "bytes") == "2.05 kB"


def test_folders_not_named_like_runs_are_skipped_and_empty_is_an_error(tmp_path):
    d = tmp_path / "t" / "trial_1" / "run"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"final_accuracy": 1.0}))
    assert R.find_runs(tmp_path) == []
    with pytest.raises(DataError):
        R.write_report(tmp_path)


def test_cli_report(tmp_path, capsys):
    make_run(tmp_path, "a", 0, {"final_accuracy": 0.5}, experiment="e1")
    make_run(tmp_path, "a", 0, {"final_accuracy": 0.6}, experiment="e2")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| experiment | method |" in out and "| e1 | a | 1 | 0.5000 |" in out
    assert (tmp_path / "rep" / "report.md").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().startswith("data error: runs folder")


def test_runs_are_grouped_by_their_config_not_their_folder_name(tmp_path):
    # folders of an older fedray (no hash in the name): the same name, two learning rates
    make_run(tmp_path, "fedavg", 0, {"final_accuracy": 0.5}, train={"lr": 0.1}, experiment="old")
    make_run(tmp_path, "fedavg", 1, {"final_accuracy": 0.6}, train={"lr": 0.1}, experiment="old")
    make_run(tmp_path, "fedavg", 0, {"final_accuracy": 0.9}, train={"lr": 0.01}, experiment="old",
             folder="fedavg-s0-r2")
    rows = {r["label"]: r for r in R.aggregate(R.find_runs(tmp_path / "old"))}
    assert set(rows) == {"fedavg (train.lr=0.1)", "fedavg (train.lr=0.01)"}
    assert rows["fedavg (train.lr=0.1)"]["values"]["final_accuracy"] == [0.5, 0.6]
    assert rows["fedavg (train.lr=0.01)"]["values"]["final_accuracy"] == [0.9]


def test_a_rerun_of_one_config_and_seed_counts_once(tmp_path):
    make_run(tmp_path, "fedavg", 0, {"final_accuracy": 0.5, "status": "completed"}, folder="fedavg-s0-0123abcd")
    make_run(tmp_path, "fedavg", 0, {"final_accuracy": 0.7, "status": "completed"}, folder="fedavg-s0-0123abcd-r2")
    make_run(tmp_path, "fedavg", 0, {"final_accuracy": 0.1, "status": "interrupted"},
             folder="fedavg-s0-0123abcd-r3")
    make_run(tmp_path, "fedavg", 1, {"final_accuracy": 0.6, "status": "completed"}, folder="fedavg-s1-0123abcd")
    recs = R.find_runs(tmp_path)
    assert [r.path.name for r in recs] == ["fedavg-s0-0123abcd-r2", "fedavg-s1-0123abcd"]
    (row,) = R.aggregate(recs)
    assert row["label"] == "fedavg" and row["values"]["final_accuracy"] == [0.7, 0.6]


def test_report_lists_every_clients_compact_model(tmp_path):
    big, small = {"flops": 2000, "params": 1000}, {"flops": 500, "params": 250}
    per = {"0": big, "1": small, "2": big}
    make_run(tmp_path, "cahfp", 0, {"final_accuracy": 0.5, "compact_by_client": per})
    make_run(tmp_path, "fedavg", 0, {"final_accuracy": 0.5})
    md = R.write_report(tmp_path / "exp")["markdown"].read_text()
    assert "| method | FLOPs | parameters | clients |" in md
    assert "| cahfp | 2 k | 1 k | 2: 0, 2 |" in md and "| cahfp | 500 | 250 | 1: 1 |" in md
    assert "| fedavg | " not in md.split("Compact model of every client")[1]
