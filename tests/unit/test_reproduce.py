"""tools/reproduce.py: every reproduction command of docs/results.md plans as a valid compare config."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import reproduce  # noqa: E402

from fedray import comparison  # noqa: E402
from fedray.models.zoo import build_zoo_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _sets(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]


def test_every_reproduction_plans_and_each_setting_has_its_own_experiment(tmp_path):
    cmds = reproduce.commands(list(reproduce.SETTINGS), None, str(tmp_path), [])
    assert len(cmds) == len(reproduce.EXPERIMENTS) * len(reproduce.SETTINGS)
    experiments = set()
    for cmd in cmds:
        plan = comparison.plan(ROOT / cmd[4], _sets(cmd), out=str(tmp_path))
        base = plan.base
        experiments.add(base.experiment)
        if base.experiment.endswith("_mnist5k"):
            assert base.data.name == "mnist_5k"
            assert base.model.name in ("leaf_cnn", "mlp")
            build_zoo_model(base.model.name, (1, 28, 28), 10, base.model.options)  # options fit the model
        else:
            assert base.data.name == "digits"
    assert len(experiments) == len(cmds)  # two settings' runs never share a folder


def test_list_prints_the_commands_and_unknown_names_are_one_line(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "reproduce.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(tool + ["--list", "--only", "prfl_paper", "--setting", "mnist_5k"], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("fedray compare configs/experiments/prfl_paper.yaml") for line in lines)
    assert "experiment=prfl_paper_iid_mnist5k" in res.stdout and "model.name=leaf_cnn" in res.stdout
    one = subprocess.run(tool + ["--list", "--only", "prfl_paper_iid", "--setting", "mnist_5k"], capture_output=True,
                         text=True, env=env)  # one split of a claim
    assert one.returncode == 0 and one.stdout.count("\n") == 1 and "experiment=prfl_paper_iid_mnist5k" in one.stdout
    bad = subprocess.run(tool + ["--only", "prfl"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_python_dash_m_fedray_is_the_fedray_command():
    """reproduce.py runs ``python -m fedray compare`` (the interpreter it runs under, no PATH lookup)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "fedray", "describe", "fedavg"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "fedavg" in res.stdout, res.stderr


def test_bench_gpu_runs_prfl_paper_on_vgg11_unchanged_but_for_data_and_model(tmp_path):
    """tools/bench_gpu.py step 4 (the GPU machine's PR-FL setup on VGG-11) plans from the shipped config."""
    import bench_gpu

    plan = bench_gpu.prfl_plan(True, 600.0, str(tmp_path))
    assert [(r.label, r.seed) for r in plan.runs] == [("prfl", 0), ("fedasync", 0)]
    cfg = plan.runs[0].cfg
    assert (cfg.data.name, cfg.model.name, cfg.runtime.device, cfg.devices.population) == \
        ("mnist_5k", "vgg11", "auto", "prfl_paper")
    assert cfg.cluster.client_actor.num_gpus == 0.5 and cfg.server.max_virtual_s == 600.0
    build_zoo_model("vgg11", (1, 28, 28), 10, cfg.model.options)
