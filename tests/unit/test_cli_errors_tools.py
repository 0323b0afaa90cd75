"""Bad input to tune / compare / submit / storage: one clear line, exit code 2 (no Ray started).

Also the pure helpers of those tools: search-space parsing, trial bundles, deferred
Tune reports, best-config YAML, job entrypoints, runtime env, storage copies.
"""
from __future__ import annotations

import math
import re
import socket
from pathlib import Path

import pytest
import yaml

from fedray import comparison as compare, runs, storage, submit
from fedray import config as C
from fedray import tune as T
from fedray.cli import main
from fedray.errors import ConfigError, FedrayError
from fedray.metrics import hparams

BASE = {"experiment": "x", "data": {"name": "digits", "num_clients": 20}, "server": {"rounds": 2, "clients_per_round": 4},
        "cluster": {"num_client_actors": 2, "client_actor": {"num_cpus": 0.5, "resources": {"device:edge": 1}}}}


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


RAY_WORKER_LOG = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|[^)]*pid=\d+)[^)]*\)")
"""A line that a Ray session streams from one of its processes ("(name pid=N) ...", "(raylet)
..."): when the test process holds the shared session, a worker of an earlier test may still be
printing."""


def one_line_exit_2(capsys, argv, starts):
    capsys.readouterr()
    assert main(argv) == 2
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if not RAY_WORKER_LOG.match(line))
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert err.startswith(starts), err
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- bad input, via the CLI


def test_empty_method_list(tmp_path, capsys):
    cfg = write(tmp_path, {**BASE, "compare": {"methods": [], "seeds": [0]}})
    one_line_exit_2(capsys, ["compare", cfg], "config error: compare.methods: must not be empty")
    cfg = write(tmp_path, {**BASE, "compare": {"seeds": [0]}})
    one_line_exit_2(capsys, ["compare", cfg], "config error: compare.methods: must not be empty")


def test_search_space_field_that_does_not_exist(tmp_path, capsys):
    cfg = write(tmp_path, {**BASE, "tune": {"space": {"train.lrr": {"grid": [0.1, 0.2]}}}})
    err = one_line_exit_2(capsys, ["tune", cfg], "config error: tune.space.train.lrr: not a config field")
    assert "lr" in err
    cfg = write(tmp_path, {**BASE, "tune": {"space": {"method.rho": {"uniform": [0.1, 0.9]}}}})
    one_line_exit_2(capsys, ["tune", cfg], "config error: tune.space.method.rho: not a config field")


def test_unreachable_address(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    err = one_line_exit_2(capsys, ["submit", "--address", url, "configs/quickstart.yaml"],
                          "error: cannot reach the Ray job server")
    assert url in err
    one_line_exit_2(capsys, ["submit", "--address", "127.0.0.1:8265", "configs/quickstart.yaml"],
                    "config error: --address: must look like http://HEAD:8265")


@pytest.mark.parametrize("section, expected", [
    ({"compare": {"methods": ["fedavg", "fedavg"]}}, "config error: compare.methods[1]: label 'fedavg' repeats"),
    ({"compare": {"methods": ["nosuch"]}}, "config error: compare.methods[0]: method.name: unknown method"),
    ({"compare": {"methods": ["fedavg"], "seeds": [0, 0]}}, "config error: compare.seeds: must not repeat"),
    ({"compare": {"methods": ["fedavg"], "runs": 3}}, "config error: compare.runs: unknown key"),
    ({"compare": {"methods": [{"label": "x"}]}}, "config error: compare.methods[0]: needs a 'name'"),
    ({"tune": {"space": {"train.lr": {"loguniform": [-1, 1]}}}}, "config error: tune.space.train.lr.loguniform"),
    ({"tune": {"space": {"train.lr": {"uniform": [0.0, 0.5]}}}}, "config error: tune.space.train.lr: must be > 0"),
    ({"tune": {"space": {"train.lr": {"normal": [0, 1]}}}}, "config error: tune.space.train.lr: unknown domain"),
    ({"tune": {"space": {}}}, "config error: tune.space: must map"),
    ({"tune": {"metric": "f1", "space": {"train.lr": {"grid": [0.1]}}}}, "config error: tune.metric"),
    ({"tune": {"scheduler": {"name": "asha", "time_attr": "round"}, "space": {"train.lr": {"grid": [0.1]}}}},
     "config error: tune.scheduler.time_attr"),
    ({"tune": {"scheduler": {"patience": 3}, "space": {"train.lr": {"grid": [0.1]}}}},
     "config error: tune.scheduler.patience: unknown key"),
    ({"tune": {"space": {"server.clients_per_round": {"choice": [4, 50]}}}},
     "config error: tune.space.server.clients_per_round: must be <= data.num_clients"),
    ({"tune": {"final_seeds": [3, 0], "space": {"train.lr": {"grid": [0.1]}}}},
     "config error: tune.final_seeds: must be held out: seed(s) [0] are tuning seeds"),
    ({"tune": {"final_seeds": [3, 4], "space": {"seed": {"grid": [1, 4]}}}},
     "config error: tune.final_seeds: must be held out: seed(s) [4] are tuning seeds"),
    ({"tune": {"final_seeds": [3, 3], "space": {"train.lr": {"grid": [0.1]}}}},
     "config error: tune.final_seeds: must not repeat"),
    ({"tune": {"final_seeds": [-1], "space": {"train.lr": {"grid": [0.1]}}}}, "config error: tune.final_seeds[0]"),
    ({"tune": {"final_seeds": 5, "space": {"train.lr": {"grid": [0.1]}}}}, "config error: tune.final_seeds: must be"),
])
def test_bad_sections(tmp_path, capsys, section, expected):
    cfg = write(tmp_path, {**BASE, **section})
    cmd = "tune" if "tune" in section else "compare"
    one_line_exit_2(capsys, [cmd, cfg], expected)


def test_bad_storage_and_outside_working_dir(tmp_path, capsys):
    one_line_exit_2(capsys, ["run", "configs/quickstart.yaml", "--storage", "nosuchfs://bucket/x"],
                    "config error: --storage: cannot use storage")
    cfg = write(tmp_path, BASE)
    one_line_exit_2(capsys, ["submit", "--address", "http://127.0.0.1:1", cfg],
                    "config error: config: ")


def test_resume_without_a_search(tmp_path, capsys):
    cfg = write(tmp_path, {**BASE, "tune": {"space": {"train.lr": {"grid": [0.1]}}}})
    one_line_exit_2(capsys, ["tune", cfg, "--resume", "--storage", str(tmp_path / "store")],
                    "config error: --resume: no search to resume at")


# ---------------------------------------------------------------- tune helpers


def test_domains_and_candidates():
    assert T.parse_domain("a", {"grid": [1, 2]}) == ("grid", (1, 2))
    assert T.parse_domain("a", {"randint": [1, 4]}) == ("randint", (1, 4))
    assert T.candidates("randint", (1, 4)) == [1, 3]
    assert T.candidates("loguniform", (0.001, 0.1)) == [0.001, 0.1]
    with pytest.raises(ConfigError, match="low must be < high"):
        T.parse_domain("a", {"uniform": [1, 1]})
    with pytest.raises(ConfigError, match="bounds must be integers"):
        T.parse_domain("a", {"randint": [1, 2.5]})


def test_bundles_follow_the_runtime_actor_resources():
    cfg = C.from_dict(BASE)
    assert T.bundles(cfg, 0.5) == [{"CPU": 0.5}, {"CPU": 0.5, "device:edge": 1.0}, {"CPU": 0.5, "device:edge": 1.0}]
    cfg = C.from_dict({**BASE, "cluster": {"num_client_actors": 1, "aggregator_cpus": 1, "client_actor": {"num_cpus": 0}}})
    assert T.bundles(cfg, 0.25) == [{"CPU": 0.25}, {"CPU": 1.0}]
    tiers = [{"name": "edge", "fraction": 0.5, "speed_range": [0.3, 0.6], "resources": {"device:edge": 1}, "num_cpus": 0.5},
             {"name": "server", "fraction": 0.5, "speed_range": [1.0, 2.0], "num_cpus": 0.25}]
    cfg = C.from_dict({**BASE, "devices": {"actor_per_tier": True, "placement": "spread", "tiers": tiers},
                       "cluster": {"num_client_actors": 4}})
    b = T.bundles(cfg, 0.5)
    assert b[0] == {"CPU": 0.5}
    assert sorted(map(str, b[1:])) == sorted(map(str, [{"CPU": 0.5, "device:edge": 1.0}] * 2 + [{"CPU": 0.25}] * 2))
    pgf = T.trial_resources(cfg, 0.5)
    assert pgf.strategy == "SPREAD" and pgf.bundles == b
    assert T.without_own_placement(cfg).devices.placement == "none"


def test_deferred_report_sends_last_evaluation_with_the_summary():
    sent = []
    rep = T.DeferredReport(sent.append)
    rep({"accuracy": 0.1, "version": 1})
    assert sent == []
    rep({"accuracy": 0.2, "version": 2})
    assert sent == [{"accuracy": 0.1, "version": 1}]
    rep.finish({"final_accuracy": 0.2, "bytes_up": 10, "sdir": None, "method": "fedavg"})
    assert sent[-1] == {"accuracy": 0.2, "version": 2, "final_accuracy": 0.2, "bytes_up": 10}


def test_best_yaml_is_a_runnable_config(tmp_path):
    cfg = write(tmp_path, {**BASE, "method": "fedavg",
                           "tune": {"space": {"train.lr": {"loguniform": [0.01, 0.1]}, "seed": {"choice": [1, 2]}}}})
    spec = T.load_spec(cfg, ["server.rounds=3"])
    text = T.best_yaml(spec, {"train.lr": 0.05, "seed": 2}, {"accuracy": 0.9})
    p = tmp_path / "best.yaml"
    p.write_text(text)
    best = C.load(p)
    assert best.train.lr == 0.05 and best.seed == 2 and best.server.rounds == 3 and best.method.name == "fedavg"
    assert "tune" not in yaml.safe_load(text)


def test_overrides_reach_the_tune_section(tmp_path):
    cfg = write(tmp_path, {**BASE, "tune": {"num_samples": 4, "space": {"train.lr": {"grid": [0.1]}}}})
    assert T.load_spec(cfg, ["tune.num_samples=2"]).num_samples == 2


# ---------------------------------------------------------------- compare helpers


def test_compare_plan_replaces_method_and_seed_only(tmp_path):
    cfg = write(tmp_path, {**BASE, "method": {"name": "fedavg"},
                           "compare": {"methods": ["fedavg", {"name": "fedavg", "label": "fedavg-b"}],
                                       "seeds": [0, 3]}})
    plan = compare.plan(cfg, ["server.rounds=5"], out=str(tmp_path / "o"))
    assert [(r.label, r.seed) for r in plan.runs] == [("fedavg", 0), ("fedavg", 3), ("fedavg-b", 0), ("fedavg-b", 3)]
    digest = runs.config_hash(C.to_dict(plan.runs[1].cfg))
    assert plan.runs[1].run_dir == tmp_path / "o" / "x" / f"fedavg-s3-{digest}"
    assert plan.runs[0].run_dir.name == f"fedavg-s0-{digest}"  # the seeds of one config share its hash
    for r in plan.runs:
        assert r.cfg.server.rounds == 5 and r.cfg.seed == r.seed and r.cfg.data == plan.base.data
    assert hparams.hparams_of(plan.runs[2].cfg, "fedavg-b")["method"] == "fedavg-b"


def test_hparams_name_each_field_once_and_every_metric():
    cfg = C.from_dict({"method": {"name": "fedbuff", "buffer_size": 4}})
    hp = hparams.hparams_of(cfg)
    assert hp["method"] == "fedbuff" and hp["method.buffer_size"] == 4 and "method_name" not in hp
    m = hparams.metrics_of({"final_accuracy": 0.5, "time_to_target_s": None, "sdir": True})
    assert list(m) == [f"hparams/{k}" for k in hparams.METRICS]  # the same columns for every run
    assert m["hparams/final_accuracy"] == 0.5 and all(math.isnan(v) for k, v in m.items() if "final_acc" not in k)


# ---------------------------------------------------------------- submit helpers


def test_submit_helpers(tmp_path):
    assert submit.detect_command("configs/quickstart.yaml") == "run"
    assert submit.detect_command(write(tmp_path, {**BASE, "compare": {"methods": ["fedavg"]}})) == "compare"
    ep = submit.entrypoint("run", "configs/quickstart.yaml", ["server.rounds=3", "a.b=x y"], "/tmp/r")
    assert ep == "fedray run configs/quickstart.yaml --set server.rounds=3 --set 'a.b=x y' --storage /tmp/r --quiet"
    ep = submit.entrypoint("run", "configs/quickstart.yaml", [], "/tmp/r", resume=True, run_path="/tmp/r/exp/fedavg-s0")
    assert ep == "fedray run --resume /tmp/r/exp/fedavg-s0 --storage /tmp/r --quiet"
    env = submit.runtime_env(".", "cluster/runtime_env.yaml")
    assert env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "120"  # ray job stop leaves a run time to checkpoint
    assert env["working_dir"] == str(Path(".").resolve())
    assert {".venv/", "runs/", ".git/"} <= set(env["excludes"])
    assert submit.is_local_address("http://127.0.0.1:8265") and submit.is_local_address("http://localhost:1")
    assert not submit.is_local_address("http://nonexistent.invalid:8265")


# ---------------------------------------------------------------- storage


def test_storage_copy_to_path_and_uri(tmp_path):
    run = tmp_path / "runs" / "exp" / "fedavg-s0"
    (run / "tb").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    (run / "tb" / "events").write_text("e")
    dest = storage.store_run(run, str(tmp_path / "store"))
    assert Path(dest) == tmp_path / "store" / "exp" / "fedavg-s0"
    assert (Path(dest) / "tb" / "events").read_text() == "e"
    uri = f"file://{tmp_path}/uri"
    dest = storage.store_experiment(run.parent, uri)
    assert dest == f"{uri}/exp"
    assert (tmp_path / "uri" / "exp" / "fedavg-s0" / "summary.json").is_file()
    assert storage.join("s3://b/p/", "exp", "run") == "s3://b/p/exp/run"
    assert storage.copy_dir(run, str(run)) == str(run)  # onto itself: no-op
    with pytest.raises(ConfigError, match="does not exist"):
        storage.copy_dir(tmp_path / "nope", str(tmp_path / "x"))


def test_a_port_with_403_in_it_is_not_an_http_403(monkeypatch):
    import ray.job_submission

    url = "http://127.0.0.1:40383"  # the suite drew this port once: 'cannot reach' was reported as 'refused'

    def unreachable(address):
        raise ConnectionError(f"Failed to connect to Ray at address: {address}.")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", unreachable)
    with pytest.raises(FedrayError, match="cannot reach the Ray job server"):
        submit.client(url)


def test_claims_reads_run_folders_with_their_config_hash(tmp_path):
    """Regression: tools/claims.py split ``<label>-s<seed>-<hash>`` at "-s" and crashed on the
    hash (int('0-1a2b3c4d')); it now reads every run folder fedray writes, layer-level SDIR included."""
    import json as _json
    import os
    import subprocess
    import sys

    exp = tmp_path / "clamp_family"
    rows = {"ma_clamp-s0-1a2b3c4d": (1500.0, 1.0), "clamp-s0-5e6f7a8b": (8000.0, 0.99)}
    for name, (t, layers) in rows.items():
        (exp / name).mkdir(parents=True)
        (exp / name / "summary.json").write_text(_json.dumps(
            {"time_to_target_s": t, "virtual_s": 12000.0, "sdir": 1.0, "sdir_layers": layers,
             "flops_per_accuracy_point": 1e8, "final_accuracy": 0.9}))
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(root / "tools" / "claims.py"), str(tmp_path)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr
    assert "| ma_clamp | 1500.0 | 1.000 | 1.000 |" in res.stdout
    assert "mean time to target 1500.0 vs 8000.0 s" in res.stdout and "layer-level SDIR 1.000 vs 0.990" in res.stdout
