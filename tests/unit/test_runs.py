"""fedray.runs: one folder per config (hash), re-runs detected, never overwritten (no Ray)."""
from __future__ import annotations

import json

import yaml

from fedray import config as C
from fedray import runs


def cfg(**over):
    return C.load(None, [f"{k}={v}" for k, v in over.items()])


def test_the_hash_follows_what_changes_results_only():
    base = cfg()
    assert base.run_name == f"fedavg-s0-{runs.config_hash(C.to_dict(base))}"
    same = [cfg(**{"runtime.out_dir": "elsewhere", "runtime.progress": False, "cluster.num_client_actors": 5,
                   "cluster.address": "127.0.0.1:6379", "experiment": "other"}), cfg(seed=3)]
    assert {runs.config_hash(C.to_dict(c)) for c in same} == {runs.config_hash(C.to_dict(base))}
    assert cfg(seed=3).run_name == base.run_name.replace("-s0-", "-s3-")
    for over in ({"train.lr": 0.5}, {"server.rounds": 7}, {"method": "fedbuff"}, {"runtime.device": "cpu"}):
        assert runs.config_hash(C.to_dict(cfg(**over))) != runs.config_hash(C.to_dict(base)), over


def test_the_hash_of_a_saved_config_yaml_is_the_runs(tmp_path):
    c = cfg(**{"method": "fedbuff", "devices.tiers": "clamp", "train.lr": 0.001})
    C.dump(c, tmp_path / "config.yaml")
    assert runs.config_hash(yaml.safe_load((tmp_path / "config.yaml").read_text())) == \
        runs.config_hash(C.to_dict(c))


def test_folder_names_parse_back():
    assert runs.parse("fedbuff-k10-s2-0123abcd-r3") == {"label": "fedbuff-k10", "seed": 2, "hash": "0123abcd",
                                                        "rerun": 3}
    assert runs.parse("fedavg-s0") == {"label": "fedavg", "seed": 0, "hash": None, "rerun": 1}
    assert runs.parse("run") is None


def _run(folder, status=None, checkpoint=False):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\n")
    if status:
        (folder / "summary.json").write_text(json.dumps({"status": status, "final_accuracy": 0.5}))
    if checkpoint:
        (folder / "checkpoint").mkdir()


def _choose(base, rerun=False):
    return runs.choose(base, rerun, lambda f: (f / "checkpoint").is_dir())


def test_a_config_runs_once_resumes_when_interrupted_and_reruns_in_a_new_folder(tmp_path):
    base = tmp_path / "fedavg-s0-0123abcd"
    assert _choose(base) == ("fresh", base, None)
    base.mkdir()  # a run that stopped before it started leaves an empty folder: it is reused
    assert _choose(base) == ("fresh", base, None)
    base.rmdir()
    _run(base, "interrupted", checkpoint=True)
    assert _choose(base)[:2] == ("resume", base)
    assert _choose(base, rerun=True) == ("fresh", base.with_name(base.name + "-r2"), None)
    _run(base.with_name(base.name + "-r2"), "completed")
    action, folder, s = _choose(base)
    assert (action, folder.name, s["final_accuracy"]) == ("completed", base.name + "-r2", 0.5)
    assert _choose(base, rerun=True)[1].name == base.name + "-r3"
    _run(base.with_name(base.name + "-r3"), "failed")  # failed, or interrupted before a checkpoint: a new folder
    assert _choose(base) == ("fresh", base.with_name(base.name + "-r4"), None)


def test_a_fresh_run_leaves_nothing_of_an_earlier_run_beside_its_own(tmp_path):
    """After Ctrl-C a folder held the new config.yaml beside the old summary.json (and old event
    files): a fresh run removes the earlier run's files first; a resumed run keeps them."""
    from fedray.metrics.recorder import Recorder

    d = tmp_path / "run"
    (d / "tb").mkdir(parents=True)
    for name in ("summary.json", "config.yaml", "model.npz", "tb/events.out.tfevents.1.old"):
        (d / name).write_text("{}")
    Recorder(d, tensorboard=False, resume_parts=0).close()
    assert (d / "summary.json").is_file() and (d / "tb" / "events.out.tfevents.1.old").is_file()
    Recorder(d, tensorboard=False).close()
    assert sorted(p.name for p in d.iterdir()) == ["metrics.parquet", "tb"] and not list((d / "tb").iterdir())
