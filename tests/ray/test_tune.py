"""fedray tune on the shared local Ray: a 4-trial ASHA search whose best config runs with
`fedray run`, and a search interrupted with Ctrl+C (SIGINT) that resumes with --resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedray import config as C
from fedray import tune as T
from fedray.cli import main
from tests.runkit import run_folder

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tune" / "tiny_asha.yaml")


def trial_dirs(exp: Path) -> list[Path]:
    return sorted(d for d in exp.iterdir() if d.is_dir() and (d / "params.json").is_file())


def reports(trial: Path) -> list[dict]:
    p = trial / "result.json"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def test_asha_search_writes_a_runnable_best_config(ray_session, tmp_path, capfd):
    spec = T.load_spec(TINY, [f"data.cache_dir={tmp_path / 'cache'}"])
    assert spec.scheduler is not None and spec.scheduler.name == "asha"
    capfd.readouterr()
    res = T.search(spec, storage=str(tmp_path / "store"))
    out, err = capfd.readouterr()
    lines = out.splitlines()  # one line per trial, no Tune status tables (there were 143 lines)
    assert len(lines) == 4 and all(ln.startswith(f"trial {i}/4 done: accuracy ") for i, ln in enumerate(lines, 1))
    # fedray's own stderr: warnings and lines that name its source (a torch warning raised in
    # fedray/models/info.py printed 8 lines, one pair per client actor). A trial that ASHA stops may
    # make Ray's workers print their own teardown messages, intermittently: those are not counted
    ours = [ln for ln in err.splitlines() if "/fedray/" in ln or "Warning" in ln]
    assert len(ours) <= 2, err
    assert res["trials"] == 4 and res["finished"] == 4 and res["errors"] == 0 and not res["interrupted"]
    exp = Path(res["path"])
    assert exp == tmp_path / "store" / "tune_tiny" / "tune"
    trials = trial_dirs(exp)
    assert len(trials) == 4
    finals = {}
    for t in trials:
        rows = reports(t)
        assert rows, t
        assert [r["version"] for r in rows] == sorted(r["version"] for r in rows)  # reported after each aggregation
        assert (t / "run" / "tb").is_dir() and (t / "run" / "config.yaml").is_file()
        if rows[-1]["version"] == spec.cfg.server.rounds:  # ran to its end: the full run folder came back
            s = json.loads((t / "run" / "summary.json").read_text())
            assert s["final_accuracy"] == pytest.approx(rows[-1]["accuracy"])
            assert rows[-1]["bytes_up"] == s["bytes_up"]
        params = json.loads((t / "params.json").read_text())
        finals[(params["train.lr"], params["server.clients_per_round"])] = rows[-1]["accuracy"]
    assert len(finals) == 4  # 2 grid values x 2 samples of a 2-value choice: every combination once
    assert res["best_metrics"]["accuracy"] == pytest.approx(max(finals.values()))
    # TensorBoard sees fedray's runs only: no event files of Tune's own logger in the trial folders
    events = sorted(exp.rglob("events.out.tfevents.*"))
    assert len({p.parent for p in events}) == 4
    assert all(p.parent.name == "tb" and p.parent.parent.name == "run" for p in events), events
    best_path = Path(res["best_path"])
    best = C.load(best_path)
    assert best.train.lr == res["best_values"]["train.lr"]
    assert best.server.clients_per_round == res["best_values"]["server.clients_per_round"]
    assert (exp / "results.csv").is_file()

    out = tmp_path / "rerun"
    assert main(["run", str(best_path), "--quiet", "--out", str(out)]) == 0
    s = json.loads((run_folder(out / "tune_tiny", "fedavg") / "summary.json").read_text())
    assert s["rounds"] == best.server.rounds
    if res["best_metrics"]["version"] == best.server.rounds:  # the best trial was not cut short: same run
        assert s["final_accuracy"] == pytest.approx(res["best_metrics"]["accuracy"])


def test_interrupted_search_resumes(ray_session, tmp_path):
    store = tmp_path / "store"
    sets = ["--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "tune.num_samples=1",
            "--set", "tune.max_concurrent_trials=1", "--set", "tune.scheduler=fifo",
            "--set", f"cluster.address={ray_session.get_runtime_context().gcs_address}"]
    exp = store / "tune_tiny" / "tune"
    cmd = [str(Path(sys.executable).parent / "fedray"), "tune", TINY, "--storage", str(store), "--quiet", *sets]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    deadline = time.time() + 240
    first = None
    while time.time() < deadline and proc.poll() is None:
        done = list(exp.glob("*/run/summary.json")) if exp.is_dir() else []
        if done:
            first = done[0].parent.parent
            proc.send_signal(signal.SIGINT)  # Ctrl+C while the second trial runs
            break
        time.sleep(0.2)
    out, err = proc.communicate(timeout=240)
    assert first is not None, err[-2000:]
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err
    assert not (exp / "best.yaml").exists()
    n_first = len(reports(first))
    assert n_first == 4  # eval_every=1, 4 rounds

    assert main(["tune", TINY, "--storage", str(store), "--quiet", "--resume", *sets[:-2]]) == 0
    trials = trial_dirs(exp)
    assert len(trials) == 2
    assert all((t / "run" / "summary.json").is_file() for t in trials)
    assert len(reports(first)) == n_first  # the finished trial was kept, not run again
    assert (exp / "best.yaml").is_file()
    assert C.load(exp / "best.yaml").train.lr in (0.02, 0.2)


def test_final_seeds_rerun_the_best_and_the_defaults_on_held_out_seeds(ray_session, tmp_path, capfd):
    """``tune.final_seeds``: after a 2-trial search on seed 0, the best config and the config as
    written each run on seeds 5 and 6, and ``fedray tune`` prints both."""
    out = tmp_path / "out"
    sets = ["--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"runtime.out_dir={out}",
            "--set", "tune.num_samples=1", "--set", "tune.scheduler=fifo", "--set", "server.rounds=2",
            "--set", "tune.space={train.lr: {grid: [0.02, 0.3]}}", "--set", "tune.final_seeds=[5, 6]"]
    capfd.readouterr()
    assert main(["tune", TINY, "--quiet", "--storage", str(tmp_path / "store"), *sets]) == 0
    lines = capfd.readouterr().out.splitlines()
    best = C.load(tmp_path / "store" / "tune_tiny" / "tune" / "best.yaml").train.lr
    held = out / "tune_tiny" / "heldout"
    got = {}
    for label in ("tuned", "default"):
        for seed in (5, 6):
            s = json.loads((run_folder(held, label, seed) / "summary.json").read_text())
            cfg = C.load(run_folder(held, label, seed) / "config.yaml")
            assert s["status"] == "completed" and cfg.seed == seed
            got.setdefault(label, []).append((cfg.train.lr, s["final_accuracy"]))
    assert {lr for lr, _ in got["tuned"]} == {best}
    assert {lr for lr, _ in got["default"]} == {T.load_spec(TINY).cfg.train.lr}  # the base config as written
    for label in ("tuned", "default"):
        line = next(ln for ln in lines if ln.startswith(f"held-out seeds [5, 6] {label}: accuracy "))
        mean = sum(a for _, a in got[label]) / 2
        assert f"accuracy {mean:.4f} +- " in line and "time to target" in line
