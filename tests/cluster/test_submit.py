"""Job submission to a real Ray head on 127.0.0.1 with token authentication.

The head is `ray start --head --block` from this venv (so jobs find `fedray`), on free ports
and its own temp dir, so it does not touch the session Ray of tests/ray nor anyone else's
Ray. It is stopped by terminating the `ray start --block` process we started (which stops
the processes it launched); leftovers are found by our unique temp dir and killed by pid.
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

from tests.runkit import run_folder

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
QUICK = ["--set", "server.rounds=3", "--set", "server.eval_every=1"]


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
    temp_dir = tempfile.mkdtemp(prefix="frh", dir="/tmp")  # short: Ray puts unix sockets under it
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


def test_fedray_submit_brings_the_run_folder_back(head, tmp_path):
    url, env = head
    # the caller runs from tmp_path: its runs/ folder (the default storage for a local head) is tmp_path/runs
    r = subprocess.run(
        [str(BIN / "fedray"), "submit", "--address", url, "--working-dir", str(ROOT),
         str(ROOT / "configs" / "quickstart.yaml"), *QUICK, "--set", "experiment=submit_fedray"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout
    run = run_folder(tmp_path / "runs" / "submit_fedray", "fedavg")
    s = json.loads((run / "summary.json").read_text())
    assert s["rounds"] == 3
    assert (run / "metrics.parquet").exists() and (run / "tb").is_dir()
    assert "final accuracy" in r.stdout  # the job's own output was followed
    # Ray's job client logs (packaging, upload, closed log stream) stay quiet: fedray's one line
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("submitted raysubmit_"), r.stderr


def test_a_client_without_the_token_gets_the_whole_reason(head, tmp_path):
    url, env = head
    env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    r = subprocess.run([str(BIN / "fedray"), "submit", "--address", url, "--working-dir", str(ROOT),
                        str(ROOT / "configs" / "quickstart.yaml")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: the Ray cluster at {url} refused the request: "), err
    assert "Missing authentication token" in err and err.endswith("token-auth.html"), err  # whole, not cut


def test_no_auth_notice_when_ray_turns_token_auth_on(tmp_path):
    """With RAY_AUTH_MODE unset Ray turns token authentication on and says so on every
    command: what cluster/README.md asks for, so fedray drops exactly that line."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    r = subprocess.run([str(BIN / "fedray"), "run", str(ROOT / "configs" / "quickstart.yaml"), "--set",
                        "server.rounds=1", "--quiet", "--out", str(tmp_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Token authentication is enabled" not in r.stdout + r.stderr, r.stderr


def test_plain_ray_job_submit(head, tmp_path):
    url, env = head
    store = tmp_path / "store"
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".",
         "--runtime-env", "cluster/runtime_env.yaml", "--",
         "fedray", "run", "configs/quickstart.yaml", *QUICK, "--set", "experiment=plain_submit", "--quiet",
         "--storage", str(store)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    s = json.loads((run_folder(store / "plain_submit", "fedavg") / "summary.json").read_text())
    assert s["rounds"] == 3


def test_fedray_submit_runs_a_tune_search(head, tmp_path):
    url, env = head
    store = tmp_path / "store"
    r = subprocess.run(
        [str(BIN / "fedray"), "submit", "--address", url, "configs/tune/tiny_asha.yaml", "--storage", str(store),
         "--set", "tune.num_samples=1", "--set", "server.rounds=2", "--set", "tune.scheduler=fifo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "fedray tune configs/tune/tiny_asha.yaml" in r.stderr  # detected from the tune: section
    best = store / "tune_tiny" / "tune" / "best.yaml"
    assert best.is_file() and "train:" in best.read_text()


def test_a_stopped_job_resumes_with_fedray_submit_resume(head, tmp_path):
    """``ray job stop`` (SIGTERM) ends the run with a checkpoint and its folder stored;
    ``fedray submit --resume`` continues it to the model of a run that was never stopped."""
    from ray.job_submission import JobSubmissionClient

    url, env = head
    store, ck = tmp_path / "store", tmp_path / "ck"
    sets = ["--set", "server.rounds=400", "--set", "experiment=submit_resume", "--set", "runtime.tensorboard=false",
            "--set", "runtime.checkpoint_every=20", "--set", f"runtime.checkpoint_dir={ck}"]
    base = [str(BIN / "fedray"), "submit", "--address", url, "configs/quickstart.yaml", "--storage", str(store), *sets]
    r = subprocess.run([*base, "--no-wait"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job = r.stdout.split()[1]
    deadline = time.time() + 300
    while not (ck / "state.pkl").is_file():  # the run is under way
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    c = JobSubmissionClient(url)
    c.stop_job(job)
    while str(c.get_job_status(job)).split(".")[-1] not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.time() < deadline + 120
        time.sleep(0.5)
    run = run_folder(store / "submit_resume", "fedavg")
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["status"] == "interrupted" and 0 < stopped["version"] < 400, c.get_job_logs(job)[-3000:]
    r = subprocess.run([*base, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"fedray run --resume {run}" in r.stderr
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["version"] == 400
    straight = subprocess.run([str(BIN / "fedray"), "run", "configs/quickstart.yaml", *sets[:-2], "--quiet",
                               "--out", str(tmp_path / "straight")], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]
    ref = json.loads((run_folder(tmp_path / "straight" / "submit_resume", "fedavg") / "summary.json").read_text())
    assert resumed["model_sha256"] == ref["model_sha256"]
