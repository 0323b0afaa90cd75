"""Nothing lost and exact resume: rows on disk while a run goes on, Ctrl-C and SIGTERM end a run
with a checkpoint and a status, ``--resume`` continues bit-identically (sync, async, interval,
stateful methods), a crashed run says so, and a run whose every update is rejected stops."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from fedray.errors import Interrupted, RunStopped
from fedray.runtime.runner import Runner
from fedray import config as C
from fedray import runs
from tests.runkit import reference, small, stop_after, table

pytestmark = pytest.mark.ray
FEDRAY = Path(sys.executable).parent / "fedray"

RESUMED = {
    "fedavg": {}, "fedbuff": {"buffer_size": 3, "concurrency": 5, "server_momentum": 0.5},
    "prfl": {"interval_s": 2.0, "recompute_every": 2, "patience": 1}, "scaffold": {},
    "cahfp": {"score_every": 3, "scoring": "server"},  # planner, server and per-client store state
    "adaptive_masked_buff": {"buffer_size": 3, "concurrency": 5, "patience": 1, "rho_min": 0.1, "score_every": 3},
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_interrupt_and_resume_equals_one_run(ray_session, tmp_path, tmp_path_factory, monkeypatch, name):
    """N aggregations in one go == k, an interruption (the SIGTERM path), resume, N - k more:
    the same metrics table (wall columns aside) and the same model bytes."""
    method = {"name": name, **RESUMED[name]}
    straight = reference(tmp_path_factory, method)
    cfg = small(tmp_path, method, "b")
    with monkeypatch.context() as m:
        stop_after(m, 5, lambda run: setattr(run, "stopping", run.stopping or "SIGTERM"))
        with pytest.raises(Interrupted) as e:
            Runner(cfg).run()
    assert e.value.exit_code == 143 and e.value.checkpoint
    saved = json.loads((cfg.run_dir / "summary.json").read_text())
    assert saved["status"] == "interrupted" and 5 <= saved["version"] < 10
    assert len(table(cfg.run_dir)) > 0  # the rows up to the interruption are on disk
    resumed = Runner(cfg, resume=True).run()
    assert resumed["status"] == "completed" and resumed["version"] == 10
    assert resumed["model_sha256"] == straight["model_sha256"]
    assert table(resumed["run_dir"]).equals(table(straight["run_dir"]))


def test_a_crashed_run_says_so_and_keeps_its_rows(ray_session, tmp_path, monkeypatch):
    def boom(run):
        raise RuntimeError("boom\nsecond line")

    stop_after(monkeypatch, 4, boom)
    cfg = small(tmp_path, {"name": "fedavg"}, "c", **{"runtime.flush_s": 0.001})
    with pytest.raises(RuntimeError):
        Runner(cfg).run()
    saved = json.loads((cfg.run_dir / "summary.json").read_text())
    assert saved["status"] == "failed" and saved["error"] == "RuntimeError: boom"
    assert (table(cfg.run_dir).event == "aggregate").sum() >= 4 and (cfg.run_dir / "model.npz").is_file()


def test_a_run_whose_every_update_is_rejected_stops(ray_session, tmp_path):
    """``train.lr=1e30`` used to "succeed" with every update rejected and the initial model."""
    cfg = small(tmp_path, {"name": "fedavg"}, "d", **{"train.lr": 1e30, "server.max_rejected_rounds": 3,
                                                      "devices.dropout_prob": 0.0})
    with pytest.raises(RunStopped) as e:
        Runner(cfg).run()
    assert "server.max_rejected_rounds" in str(e.value) and "nonfinite" in str(e.value)
    saved = json.loads((cfg.run_dir / "summary.json").read_text())
    assert saved["status"] == "failed" and saved["version"] == 3


def _cli_config(tmp_path) -> Path:
    cfg = {"experiment": "sig", "method": {"name": "fedavg"}, "data": {"name": "digits", "num_clients": 20,
                                                                    "cache_dir": str(tmp_path / "cache")},
           "model": {"name": "mlp", "options": {"hidden": [32]}}, "train": {"local_epochs": 1, "batch_size": 16},
           "server": {"rounds": 400, "clients_per_round": 5, "eval_every": 10},
           "cluster": {"num_client_actors": 2},
           "runtime": {"progress": False, "tensorboard": True, "out_dir": str(tmp_path / "runs"), "flush_s": 0.2,
                       "checkpoint_every": 25}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    return env


def _interrupt_when_rows_exist(path: Path, run_dir: Path, sig) -> subprocess.CompletedProcess:
    """Start ``fedray run``, send ``sig`` once rows are on disk, wait for the end."""
    p = subprocess.Popen([str(FEDRAY), "run", str(path), "--quiet"], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if len(list((run_dir / "metrics.parquet").glob("part-*.parquet"))) >= 2:
            rows = len(pq.read_table(run_dir / "metrics.parquet"))  # readable while the run goes on
            assert rows > 0
            break
        time.sleep(0.2)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(sig)
    out, err = p.communicate(timeout=240)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.fixture(scope="module")
def straight_cli_run(ray_session, tmp_path_factory) -> Path:
    """The CLI config's run in one go (in this process: the reference both signals compare with)."""
    path = _cli_config(tmp_path_factory.mktemp("straight"))
    return Path(Runner(C.load(path, [f"runtime.out_dir={path.parent / 'straight'}"])).run()["run_dir"])


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signals_end_the_run_with_a_checkpoint_and_resume_is_exact(tmp_path, sig, code, straight_cli_run):
    path = _cli_config(tmp_path)
    run_dir = C.load(path).run_dir  # runs/sig/fedavg-s0-<config hash>
    r = _interrupt_when_rows_exist(path, run_dir, sig)
    assert r.returncode == code, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted by {signal.Signals(sig).name} after aggregation ")
    assert f"fedray run --resume {run_dir}" in last
    assert "Traceback" not in r.stderr and "SIGTERM received" not in r.stderr  # no stack dump
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["status"] == "interrupted" and 0 < saved["version"] < 400
    # the folder's config is the one its summary belongs to
    assert saved["config_hash"] == runs.config_hash(yaml.safe_load((run_dir / "config.yaml").read_text()))
    # --resume FOLDER, or the same command again: it finds the interrupted run of its config and resumes it
    again = ["--resume", str(run_dir)] if sig == signal.SIGTERM else [str(path)]
    resumed = subprocess.run([str(FEDRAY), "run", *again, "--quiet"], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ("resuming the interrupted run" in resumed.stderr) == (sig == signal.SIGINT)
    assert list(run_dir.parent.iterdir()) == [run_dir]
    if sig == signal.SIGINT:  # a third time: completed, reported, not trained again
        done = subprocess.run([str(FEDRAY), "run", str(path), "--quiet"], env=_env(), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.startswith(f"already run: {run_dir} holds a completed run")
        assert "not training again (--rerun" in done.stdout and list(run_dir.parent.iterdir()) == [run_dir]
    straight = straight_cli_run
    assert table(run_dir).equals(table(straight))
    a, b = json.loads((run_dir / "summary.json").read_text()), json.loads((straight / "summary.json").read_text())
    assert a["status"] == "completed" and a["model_sha256"] == b["model_sha256"]


def test_resources_the_cluster_cannot_hold_are_one_line(ray_session, tmp_path):
    """3 client actors x 2 CPUs used to wait forever for CPUs the cluster does not have."""
    import ray

    from fedray.errors import ConfigError

    have = ray.cluster_resources().get("CPU", 0)
    cfg = small(tmp_path, {"name": "fedavg"}, "e", **{"cluster.num_client_actors": 3,
                                                      "cluster.client_actor.num_cpus": have})
    t0 = time.time()
    with pytest.raises(ConfigError) as e:
        Runner(cfg).run()
    assert e.value.field == "cluster.num_client_actors"
    assert f"request {3 * have:g} CPU" in e.value.message and f"the cluster has {have:g}" in e.value.message
    assert time.time() - t0 < 60
