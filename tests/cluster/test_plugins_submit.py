"""User plugins by import path through ``fedray submit`` to a real Ray head on 127.0.0.1.

A user's job folder holds their config and plugin modules (copies of ``tests/plugins``:
the trimmed-mean method and the Embedding + LayerNorm model, named ``trimmed:TrimmedMean``
and ``nets:TokenNet``); ``--working-dir`` uploads it and the job's driver and workers start
in it. The head is the one of ``tests/cluster/test_submit.py`` (same approach, own copy):
``ray start --head --block`` from this venv on free ports, its own temp dir and token
authentication, stopped by the pid of the process we started.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.runkit import run_folder

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLUGINS = ROOT / "tests" / "plugins"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _our_leftovers(temp_dir: str) -> list[int]:
    """Pids of processes whose command line names our unique temp dir (Linux /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if temp_dir.encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def head():
    assert (BIN / "ray").exists(), f"no ray command next to {sys.executable} (ray[default] is a dependency)"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if not env.get("RAY_AUTH_TOKEN") and not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                       capture_output=True, timeout=60)
    gcs, dash, client, agent, metrics = free_ports(5)
    temp_dir = tempfile.mkdtemp(prefix="frp", dir="/tmp")  # short: Ray puts unix sockets under it
    log = open(Path(temp_dir) / "ray_start.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=temp_dir, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        os.environ.setdefault("RAY_AUTH_MODE", "token")
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail("ray start exited: " + (Path(temp_dir) / "ray_start.log").read_text()[-3000:])
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1.0)
        yield url, env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for pid in _our_leftovers(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_folder(path: Path) -> Path:
    """A user's folder: the config next to the plugin modules it names."""
    path.mkdir()
    for name in ("trimmed.py", "nets.py", "diabetes.py"):
        shutil.copy(PLUGINS / name, path / name)
    cfg = {"experiment": "plugins_submit", "seed": 0,
           "method": {"name": "trimmed:TrimmedMean", "beta": 0.25},
           "data": {"name": "digits", "num_clients": 8, "partition": {"kind": "iid"}},
           "model": {"name": "nets:TokenNet", "options": {"dim": 8}},
           "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.1},
           "server": {"rounds": 2, "clients_per_round": 4, "eval_every": 1},
           "cluster": {"num_client_actors": 1},
           "runtime": {"progress": False, "tensorboard": False}}
    (path / "job.yaml").write_text(yaml.safe_dump(cfg))
    reg = {**cfg, "experiment": "plugins_regression", "method": {"name": "fedavg"},
           "data": {"name": "diabetes:load", "num_clients": 8}, "task": {"name": "regression"},
           "model": {"name": "mlp", "options": {"hidden": [16]}}, "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05}}
    (path / "regression.yaml").write_text(yaml.safe_dump(reg))
    return path


def test_submit_with_plugins_in_the_working_dir(head, tmp_path):
    """Submitted from another folder: the plugins (a method, a model, a data set with the
    regression task) are found in the working directory both when the config is validated here
    and when the job runs on the cluster."""
    url, env = head
    job = job_folder(tmp_path / "job")
    caller = tmp_path / "caller"  # not the job folder: `trimmed` is not importable from here
    caller.mkdir()
    store = tmp_path / "store"
    r = subprocess.run(
        [str(BIN / "fedray"), "submit", "--address", url, "--working-dir", str(job), str(job / "job.yaml"),
         "--storage", str(store)],
        cwd=caller, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout
    run = run_folder(store / "plugins_submit", "trimmed.TrimmedMean")  # an import path names its run folder with a dot
    s = json.loads((run / "summary.json").read_text())
    assert s["rounds"] == 2 and s["method"] == "trimmed:TrimmedMean" and s["metric"] == "accuracy"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["name"] == "nets:TokenNet" and saved["method"]["beta"] == 0.25
    # the user data set and the regression task travel the same way
    r = subprocess.run(
        [str(BIN / "fedray"), "submit", "--address", url, "--working-dir", str(job), str(job / "regression.yaml"),
         "--storage", str(store)],
        cwd=caller, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((run_folder(store / "plugins_regression", "fedavg") / "summary.json").read_text())
    assert s["metric"] == "r2" and s["final_r2"] == s["final_r2"] and s["rounds"] == 2
