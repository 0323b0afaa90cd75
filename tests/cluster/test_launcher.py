"""``ray up`` / ``ray submit`` / ``ray exec`` / ``ray down`` with cluster/local.yaml (the launcher's
local SSH provider) against an sshd of our own on 127.0.0.1.

The test makes its own host and client keys, runs ``/usr/sbin/sshd -D`` on a free port (listening
on 127.0.0.1 only) and stops it by pid. cluster/local.yaml is rendered with the test's key, ports,
venv and temp folder (a text substitution; the launcher has no ssh port option, so a ProxyCommand
relays to the port). Its Ray is stopped by the pid its start command recorded, never by ``ray stop``
(which would stop every Ray of the machine, this session's and other users' too).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster.test_submit import _our_leftovers, free_ports
from tests.runkit import run_folder

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VENV = Path(sys.prefix)
SSHD = Path("/usr/sbin/sshd")
QUICK = ["--set", "server.rounds=2", "--set", "server.eval_every=1", "--quiet"]


def _run(cmd, env, timeout, cwd=ROOT):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{cmd[:3]}: rc {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture()
def sshd():
    if not SSHD.exists() or shutil.which("rsync") is None or shutil.which("ssh") is None:
        pytest.skip("needs openssh-server, openssh-client and rsync (installed by .ci/run)")
    d = Path(tempfile.mkdtemp(prefix="frl", dir="/tmp"))  # short: Ray puts unix sockets under it
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True, timeout=60)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port, = free_ports(1)
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        f"SetEnv FEDRAY_PYTHON={VENV / 'bin' / 'python'} FEDRAY_SRC={d / 'src'} RAY_AUTH_MODE=token\n")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation folder
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")], stdout=open(d / "sshd.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield d, port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        for pid in _our_leftovers(str(d)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(d, ignore_errors=True)


def render(d: Path, ssh_port: int) -> tuple[Path, int]:
    """cluster/local.yaml with this test's key, ssh port, venv, source folder, Ray temp folder and ports."""
    gcs, dash, client = free_ports(3)
    text = (ROOT / "cluster" / "local.yaml").read_text()
    for old, new in [("cluster_name: fedray-local", f"cluster_name: {d.name}"),
                     ("ssh_private_key: ~/.ssh/id_ed25519",
                      f"ssh_private_key: {d / 'client'}\n  ssh_proxy_command: "
                      f"{sys.executable} {ROOT / 'tests' / 'cluster' / 'tcp_relay.py'} 127.0.0.1 {ssh_port}"),
                     ("/opt/fedray/.venv", str(VENV)), ("~/fedray-src", str(d / "src")),
                     ("/tmp/fedray-local", str(d / "ray")), ("6379", str(gcs)), ("8265", str(dash)),
                     ("10001", str(client))]:
        assert old in text, old
        text = text.replace(old, new)
    out = d / "local.yaml"
    out.write_text(text)
    return out, gcs


def test_ray_up_submit_exec_down(sshd):
    d, ssh_port = sshd
    cfg, gcs = render(d, ssh_port)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    ray = str(BIN / "ray")
    runs = d / "runs"
    # what the launcher and ray submit leave in the SSH user's home (the same user here): removed after
    left = [Path.home() / n for n in ("ray_bootstrap_config.yaml", "ray_bootstrap_key.pem", "fedray_job.py")]
    left = [p for p in left if not p.exists()]
    at = ["--set", f"cluster.address=127.0.0.1:{gcs}", "--out", str(runs)]
    try:
        _run([ray, "up", "-y", "--no-config-cache", str(cfg)], env, 600)
        assert (d / "src" / "fedray" / "cli.py").is_file()  # file_mounts synced the repository
        _run([ray, "submit", str(cfg), str(ROOT / "cluster" / "fedray_job.py"), "run", "configs/quickstart.yaml",
              *QUICK, "--set", "experiment=launcher_submit", *at], env, 400)
        _run([ray, "exec", str(cfg), f"cd {d / 'src'} && {VENV / 'bin' / 'python'} -m fedray.cli run "
              f"configs/quickstart.yaml {' '.join(QUICK)} --set experiment=launcher_exec {' '.join(at)}"], env, 400)
        _run([ray, "rsync-down", str(cfg), f"{runs}/", str(d / "down")], env, 120)
        for exp in ("launcher_submit", "launcher_exec"):
            s = json.loads((run_folder(d / "down" / exp, "fedavg") / "summary.json").read_text())
            assert s["rounds"] == 2
    finally:
        pid_file = d / "ray" / "ray.pid"
        if pid_file.is_file():  # the config's own stop: the pid it started, nothing else
            subprocess.run([ray, "exec", str(cfg), f"kill $(cat {pid_file})"], cwd=ROOT, env=env,
                           capture_output=True, timeout=120)
            pid = int(pid_file.read_text())
            deadline = time.time() + 60
            while Path(f"/proc/{pid}").exists() and time.time() < deadline:
                time.sleep(0.5)
        subprocess.run([ray, "down", "-y", str(cfg)], cwd=ROOT, env=env, capture_output=True, timeout=300)
        for p in left:
            p.unlink(missing_ok=True)
