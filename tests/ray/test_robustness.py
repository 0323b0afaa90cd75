"""Poisoned updates on the quickstart (digits, 100 IID clients, 10 a round), short runs: 20% of
the clients send their update scaled by 1e6.

- plain FedAvg and FedBuff with only the default norm guard stay within 10 points of the
  honest run; FedAvg with the guard switched off collapses;
- FedAvg + trimmed mean, FedAvg + multi-Krum, FedBuff + clipping and a robust rule, and the two
  masked methods (HeteroFL + median, AutoFLIP + trimmed mean), each with the default guard, stay
  within 3 points of the honest run's final accuracy;
- the malicious clients are in ``metrics.parquet`` and their updates are rejected as ``norm``.

(``docs/results.md`` has the same rows on the full-length runs, and the rules alone.)"""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from fedray.config import load
from fedray.runtime.runner import Runner

pytestmark = pytest.mark.ray

ATTACK = ["attack.kind=scale", "attack.fraction=0.2", "attack.scale=1e6"]
FEDBUFF = ["method.name=fedbuff", "method.buffer_size=10", "method.concurrency=10"]
HETEROFL = ["method.name=heterofl"]
AUTOFLIP = ["method.name=autoflip"]
_HONEST: dict = {}


def run(tmp_path, name, over):
    cfg = load("configs/quickstart.yaml", ["runtime.progress=false", "runtime.tensorboard=false",
                                           f"runtime.out_dir={tmp_path / name}", "server.target_accuracy=null",
                                           "server.rounds=30",
                                           f"data.cache_dir={tmp_path / 'cache'}", *over])
    return Runner(cfg).run()


def honest(tmp_path_factory, key, over):
    if key not in _HONEST:
        _HONEST[key] = run(tmp_path_factory.mktemp("honest"), "honest", over)
    return _HONEST[key]


@pytest.mark.parametrize("key,method", [("fedavg", []), ("fedbuff", FEDBUFF)])
def test_the_default_guard_alone_keeps_fedavg_and_fedbuff_within_10_points(ray_session, tmp_path, tmp_path_factory,
                                                                           key, method):
    ref = honest(tmp_path_factory, key, method)
    hit = run(tmp_path, "guard", method + ATTACK)
    assert ref["rejected_by_reason"] == {}  # the guard never rejects an honest update here
    assert hit["rejected_by_reason"]["norm"] > 0 and hit["final_accuracy"] >= ref["final_accuracy"] - 0.10
    t = pq.read_table(f"{hit['run_dir']}/metrics.parquet").to_pandas()
    sent = t[t.event.isin(["update", "reject"])]
    assert (sent[sent.malicious == True].event == "reject").all()  # noqa: E712 (a nullable column)
    assert (sent[sent.reason == "norm"].malicious == True).all()  # noqa: E712
    assert hit["malicious_clients"] == 20


def test_fedavg_without_the_guard_collapses(ray_session, tmp_path):
    hit = run(tmp_path, "off", ATTACK + ["defense.norm_guard=null"])
    assert hit["rejected_by_reason"] == {} and hit["final_accuracy"] < 0.3


@pytest.mark.parametrize("key,method,defense", [
    ("fedavg", [], ["defense.rule=trimmed_mean", "defense.beta=0.2"]),
    ("fedavg", [], ["defense.rule=multi_krum", "defense.f=1"]),  # f=2: -4.2 points (docs/results.md)
    ("fedbuff", FEDBUFF, ["defense.clip=adaptive", "defense.rule=trimmed_mean", "defense.beta=0.2"]),
    ("heterofl", HETEROFL, ["defense.rule=median"]),
    ("autoflip", AUTOFLIP, ["defense.rule=trimmed_mean", "defense.beta=0.2"]),
], ids=["fedavg-trimmed_mean", "fedavg-multi_krum", "fedbuff-clip-trimmed_mean", "heterofl-median",
        "autoflip-trimmed_mean"])
def test_a_robust_rule_stays_within_3_points_of_the_honest_run(ray_session, tmp_path, tmp_path_factory, key, method,
                                                               defense):
    ref = honest(tmp_path_factory, key, method)
    hit = run(tmp_path, "rule", method + ATTACK + defense)
    assert hit["final_accuracy"] >= ref["final_accuracy"] - 0.03, (hit["final_accuracy"], ref["final_accuracy"])


def test_dp_fedavg_reports_the_accountants_epsilon_and_stops_at_the_target(ray_session, tmp_path):
    from fedray.privacy import accountant

    dp = ["privacy.noise_multiplier=1.0", "privacy.clip=1.0"]
    s = run(tmp_path, "dp", dp + ["server.target_epsilon=3.0"])
    q = 10 / 100
    assert s["version"] < 30  # stopped by the budget
    assert s["epsilon"] == accountant.epsilon(s["version"], 1.0, q, 1e-5) <= 3.0
    assert accountant.epsilon(s["version"] + 1, 1.0, q, 1e-5) > 3.0  # one more would have passed it
    t = pq.read_table(f"{s['run_dir']}/metrics.parquet").to_pandas()
    assert t[t.event == "update"].shape[0] > 0 and s["status"] == "completed"


@pytest.mark.parametrize("name", ["fedavg", "fedbuff"])
def test_a_defended_attacked_run_resumes_exactly(ray_session, tmp_path, monkeypatch, name):
    """The defence's state (recent norms, the centered-clipping centre) and the attack's seeded
    noise survive an interruption: resume equals one run."""
    import pytest as _pytest

    from fedray.errors import Interrupted
    from tests.runkit import small, stop_after, table

    method = {"name": name, **({"buffer_size": 3, "concurrency": 5} if name == "fedbuff" else {})}
    over = {"attack.kind": "noise", "attack.fraction": 0.25, "defense.clip": "adaptive",
            "defense.rule": "centered_clipping", "defense.norm_guard": 5, "server.clients_per_round": 4}
    straight = Runner(small(tmp_path, method, "a", **over)).run()
    cfg = small(tmp_path, method, "b", **over)
    with monkeypatch.context() as m:
        stop_after(m, 5, lambda run: setattr(run, "stopping", run.stopping or "SIGTERM"))
        with _pytest.raises(Interrupted):
            Runner(cfg).run()
    resumed = Runner(cfg, resume=True).run()
    assert resumed["model_sha256"] == straight["model_sha256"]
    assert table(resumed["run_dir"]).equals(table(straight["run_dir"]))
