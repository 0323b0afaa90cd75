"""Cluster connection mistakes are one line naming the field, exit code 2, and come fast
(before this check, ``ray.init`` retried an address with nothing listening for over ten minutes)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedray.errors import ConfigError
from fedray.runtime.cluster import probe

ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_with_nothing_at_cluster_address_is_one_line(tmp_path):
    port = closed_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", PYTHONPATH=str(ROOT))
    # the bound is the subprocess timeout: the old code was still retrying when it expired
    r = subprocess.run([sys.executable, "-m", "fedray.cli", "run", str(ROOT / "configs" / "quickstart.yaml"),
                        "--set", f"cluster.address=127.0.0.1:{port}", "--out", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip()
    assert err == (f"config error: cluster.address: nothing listens at 127.0.0.1:{port} (connection refused): "
                   f"start the head there with `ray start --head --port={port}` or correct the address"), err
    assert not list(tmp_path.rglob("config.yaml"))  # nothing started, nothing written


@pytest.mark.parametrize("address", ["127.0.0.1", "head:port", "ray://nohost"])
def test_malformed_address(address):
    with pytest.raises(ConfigError, match="cluster.address: .* is not HOST:PORT"):
        probe(address, "cluster.address")


def test_listening_address_passes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        probe(f"127.0.0.1:{s.getsockname()[1]}", "cluster.address")
        probe(f"ray://127.0.0.1:{s.getsockname()[1]}", "cluster.address")
    probe("auto", "cluster.address")


def test_a_run_inside_a_ray_job_without_storage_is_stored_durably(tmp_path, monkeypatch, capsys):
    """A Ray job's working directory is deleted with the job: its runs/ would be lost."""
    from argparse import Namespace

    from fedray.cli import _storage
    from fedray.storage import JOB_ENV

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(JOB_ENV, raising=False)
    assert _storage(Namespace(storage=None, out=None)) is None  # not in a job: runs/ as configured
    monkeypatch.setenv(JOB_ENV, "{}")
    assert _storage(Namespace(storage=None, out=None)) == str(tmp_path / "fedray-runs")
    assert f"results are stored in {tmp_path / 'fedray-runs'}" in capsys.readouterr().err
    assert _storage(Namespace(storage=None, out="/shared/runs")) is None  # --out: the user chose
    assert _storage(Namespace(storage=str(tmp_path / "s"))) == str(tmp_path / "s")


@pytest.mark.parametrize("device, own, gpus, actors, want", [
    ("auto", 0.0, 1.0, 2, 0.3333),   # split over 2 client actors + the aggregator
    ("auto", 0.0, 4.0, 2, 1.0),      # at most one GPU each
    ("cuda", 0.0, 1.0, 3, 0.25),
    ("auto", 0.0, 0.0, 2, 0.0),      # no GPU: CPU, as before
    ("auto", 0.5, 1.0, 2, 0.5),      # cluster.client_actor.num_gpus set: as set, none for the aggregator
    ("cpu", 0.0, 1.0, 2, 0.0),
])
def test_auto_device_asks_ray_for_a_gpu_share_where_there_is_a_gpu(monkeypatch, device, own, gpus, actors, want):
    from fedray.config import from_dict
    from fedray.runtime import cluster

    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": gpus} if gpus else {"CPU": 16.0})
    cfg = from_dict({"runtime": {"device": device},
                     "cluster": {"num_client_actors": actors, "client_actor": {"num_gpus": own}}})
    assert cluster.gpu_share(cfg) == want
    assert all(o["num_gpus"] == want for _, o in cluster.actor_specs(cfg, None))
    assert cluster.requested(cfg, None).get("GPU", 0.0) == pytest.approx(want * (actors + (not own)))


def test_cuda_on_a_cluster_without_gpu_is_a_config_error(monkeypatch):
    from fedray.config import from_dict
    from fedray.runtime import cluster

    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {"CPU": 16.0})
    with pytest.raises(ConfigError, match="runtime.device"):
        cluster.gpu_share(from_dict({"runtime": {"device": "cuda"}}))


def test_embedded_ray_never_attaches_to_a_ray_start_head_on_the_machine(monkeypatch):
    """Regression: without ``cluster.address`` fedray called a bare ``ray.init()``, which attaches
    to the latest ``ray start`` head of the machine (``/tmp/ray/ray_current_cluster``): a sweep
    started beside a test session's head ran its actors there and lost them when the tests
    killed that head's workers. ``address="local"`` always starts fedray's own instance."""
    from fedray import config as C
    from fedray.runtime import cluster

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kw: calls.append(kw))
    assert cluster.connect(C.from_dict({}).cluster) is True
    assert calls and calls[0]["address"] == "local"


@pytest.mark.parametrize("over,field", [({"method": {"name": "fedbuff"}}, "cluster.num_client_actors"),
                                        ({"devices": {"actor_per_tier": True}}, "devices.actor_per_tier"),
                                        ({"devices": {"placement": "spread"}}, "devices.placement")])
def test_no_client_actors_is_for_what_the_aggregator_can_train_itself(over, field):
    from fedray.config import from_dict
    from fedray.methods import registry
    from fedray.runtime.cluster import trains_in_aggregator

    cfg = from_dict({"cluster": {"num_client_actors": 0}, **over})
    with pytest.raises(ConfigError) as e:
        trains_in_aggregator(cfg, cfg.method.name, registry.get(cfg.method.name).schedule)
    assert e.value.field == field
    ok = from_dict({"cluster": {"num_client_actors": 0}})
    assert trains_in_aggregator(ok, "fedavg", "sync") and not trains_in_aggregator(from_dict({}), "fedavg", "sync")


def test_an_asynchronous_method_without_client_actors_is_one_line_before_ray_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "fedray.cli", "run", str(ROOT / "configs" / "quickstart.yaml"),
                        "--set", "cluster.num_client_actors=0", "--set", "method.name=fedasync", "--out", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == ("config error: cluster.num_client_actors: 0 (the aggregator trains the clients) runs "
                                "synchronous methods; fedasync is async"), r.stderr
    assert "Ray" not in r.stdout + r.stderr
