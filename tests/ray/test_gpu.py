"""The GPU path (skipped without a GPU in the Ray cluster): ``runtime.device: auto`` trains on
the GPU in client actors that ask for a fraction of one, vectorised training included."""
from __future__ import annotations

import pytest

from fedray.config import from_dict

pytestmark = pytest.mark.ray


def gpus(ray) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def test_client_actors_with_a_gpu_fraction_train_on_it(ray_session, tmp_path):
    if gpus(ray_session) < 1:
        pytest.skip("no GPU in the Ray cluster")
    from fedray.client.actor import ClientActor
    from fedray.runtime.runner import run

    base = {"experiment": "gpu", "data": {"num_clients": 20, "cache_dir": str(tmp_path / "cache")},
            "model": {"name": "cnn", "options": {"channels": [8, 16], "hidden": [32]}},
            "server": {"rounds": 4, "clients_per_round": 10, "eval_every": 2},
            "cluster": {"num_client_actors": 2, "client_actor": {"num_gpus": 0.5}},
            "runtime": {"device": "auto", "progress": False, "out_dir": str(tmp_path / "runs")}}
    cfg = from_dict(base)
    shares = [ClientActor.options(num_cpus=0, num_gpus=0.5).remote(cfg, (1, 8, 8), 10) for _ in range(2)]
    assert ray_session.get([a.device.remote() for a in shares]) == ["cuda", "cuda"]
    for a in shares:
        ray_session.kill(a)
    out = {v: run(from_dict(base, [f"train.vectorise={v}", f"runtime.out_dir={tmp_path / str(v)}"]))
           for v in (1, 16)}
    for s in out.values():
        assert s["status"] == "completed" and s["rounds"] == 4
    assert abs(out[1]["final_accuracy"] - out[16]["final_accuracy"]) <= 0.05


def test_auto_finds_the_gpu_without_a_configured_share(ray_session, tmp_path):
    if gpus(ray_session) < 1:
        pytest.skip("no GPU in the Ray cluster")
    from fedray.runtime import cluster
    from fedray.runtime.runner import run

    cfg = from_dict({"experiment": "gpu_auto", "data": {"num_clients": 20, "cache_dir": str(tmp_path / "cache")},
                     "server": {"rounds": 2, "clients_per_round": 10},
                     "cluster": {"num_client_actors": 2},
                     "runtime": {"device": "auto", "progress": False, "out_dir": str(tmp_path / "runs")}})
    assert 0 < cluster.gpu_share(cfg) <= 1 and cluster.gpu_share(cfg, aggregator=True) == cluster.gpu_share(cfg)
    assert run(cfg)["status"] == "completed"
