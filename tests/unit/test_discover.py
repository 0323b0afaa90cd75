"""What a newcomer finds without making a mistake: ``fedray --version``, ``fedray list``,
``fedray describe``, plain-text help, and config messages that say what to do."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedray import config, discover
from fedray.cli import build_parser, main
from fedray.methods import registry

ROOT = Path(__file__).resolve().parents[2]
RST = re.compile(r"``|:(mod|func|class|meth|data|attr):`")


def fedray(*argv, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token"}
    return subprocess.run([sys.executable, "-m", "fedray.cli", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_version_list_describe_as_a_user_types_them(tmp_path):
    v = fedray("--version")
    assert v.returncode == 0 and re.fullmatch(r"fedray \d+\.\d+\.\d+\S*\n", v.stdout), v
    m = fedray("list", "methods")
    assert m.returncode == 0, m.stderr
    names = [line.split()[0] for line in m.stdout.splitlines() if line and not line.startswith("parameters")]
    assert names == registry.names()
    assert re.search(r"^clamp\s+sync\s+CLAMP", m.stdout, re.M) and re.search(r"^fedbuff\s+async\s", m.stdout, re.M)
    d = fedray("describe", "clamp")
    assert d.returncode == 0, d.stderr
    assert "paper: CLAMP" in d.stdout and "schedule: sync" in d.stdout
    assert re.search(r"method\.initial_depth\s+int\s+default 3\s+\(> 0\)\n\s+starting depth d", d.stdout), d.stdout
    assert re.search(r"method\.threshold_reference\s+str\s+default 'federation'\s+\(one of federation, own\)", d.stdout)
    assert "fedray/methods/clamp.py" in d.stdout
    assert not RST.search(d.stdout + m.stdout)
    bad = fedray("describe", "clampp")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("config error: describe: unknown method 'clampp'; choose from: adaptive_masked_buff, autoflip")


@pytest.mark.parametrize("kind, some", [("models", ["mlp", "cnn", "vgg11", "resnet18"]),
                                        ("datasets", ["digits", "synthetic", "cifar10", "femnist"]),
                                        ("defenses", ["mean", "median", "trimmed_mean", "krum", "geometric_median"])])
def test_list_reads_the_registries(kind, some):
    rows = dict(discover.entries(kind))
    assert set(some) <= set(rows) and all(rows.values())
    text = discover.list_text(kind)
    assert not RST.search(text)
    if kind == "models":
        assert "hidden" in rows["mlp"] and "batch_norm" in rows["vgg11"]
    if kind == "datasets":
        assert "reads data.root" in rows["cifar10"] and "reads data.root" not in rows["digits"]
    if kind == "defenses":
        assert "defense.beta" in rows["trimmed_mean"]


def test_list_and_describe_see_user_modules(tmp_path, monkeypatch, capsys):
    (tmp_path / "myalgos.py").write_text(
        "from dataclasses import dataclass\n"
        "from fedray.methods.fedavg import FedAvg\nfrom fedray.params import POS, _f\n"
        "class Mine(FedAvg):\n    '''My own FedAvg.'''\n    name = 'mine'\n    paper = 'Me et al. 2026'\n"
        "    @dataclass(frozen=True)\n    class Params:\n"
        "        k: int = _f(4, check=POS, doc='how many')\n")
    monkeypatch.chdir(tmp_path)
    assert main(["list", "methods", "--import", "myalgos"]) == 0
    assert re.search(r"^myalgos:Mine\s+sync\s+My own FedAvg\.", capsys.readouterr().out, re.M)
    assert main(["describe", "myalgos:Mine"]) == 0
    out = capsys.readouterr().out
    assert "paper: Me et al. 2026" in out and re.search(r"method\.k\s+int\s+default 4\s+\(> 0\)\n\s+how many", out)
    assert main(["list", "methods", "--import", "nosuchmodule_xyz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: --import: cannot import 'nosuchmodule_xyz'") and err.count("\n") == 1


def test_describe_a_config_section():
    text = discover.describe("defense")
    assert re.search(r"defense\.rule\s+str\s+default 'mean'\s+\(one of mean, median", text)
    assert "fedray list defenses" in text
    assert "default {}" in discover.describe("model")


def test_help_is_plain_text(capsys):
    parser = build_parser()
    texts = [parser.format_help()]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    texts += [p.format_help() for p in sub.choices.values()]
    for t in texts:
        assert not RST.search(t), t
    assert "list" in sub.choices and "describe" in sub.choices


def test_every_method_names_a_paper_and_no_missing_file():
    for name in registry.names():
        cls = registry.get(name)
        assert cls.paper and "ALGORITHMS.md" not in cls.paper, name
    for path in (ROOT / "fedray").rglob("*.py"):
        assert "ALGORITHMS.md" not in path.read_text(), path  # not in the project: point to docs/ or the paper
    assert discover.glossary_path().is_file()


def test_unknown_method_key_says_what_the_method_takes(capsys):
    """Regression: ``method.mu`` on FedAvg said ``unknown key (known: )``."""
    assert main(["run", "--set", "method.name=feddrop", "--set", "method.mu=0.1"]) == 2
    err = capsys.readouterr().err
    assert err == "config error: method.mu: unknown key: method 'feddrop' has no parameters of its own " \
                  "(fedray describe feddrop)\n"
    assert main(["run", "--set", "method.mu=0.1"]) == 2
    assert capsys.readouterr().err == "config error: method.mu: unknown key: method 'fedavg' takes: " \
                                      "server_momentum (fedray describe fedavg)\n"
    assert main(["run", "--set", "method.name=fedprox", "--set", "method.nu=1"]) == 2
    assert capsys.readouterr().err == "config error: method.nu: unknown key: method 'fedprox' takes: mu " \
                                      "(fedray describe fedprox)\n"


def test_switching_model_on_the_command_line_drops_the_other_models_options(caplog):
    """Regression: ``--set model.name=resnet18`` on the quickstart failed on its ``model.options.hidden``."""
    quick = ROOT / "configs" / "quickstart.yaml"
    with caplog.at_level(logging.WARNING, logger="fedray"):
        cfg = config.load(quick, ["model.name=resnet18", "model.options.width=0.25"])
    assert cfg.model.options == {"width": 0.25}  # an options override is the user's own: kept
    with caplog.at_level(logging.WARNING, logger="fedray"):
        cfg = config.load(quick, ["model.name=resnet18"])
    assert cfg.model.name == "resnet18" and cfg.model.options == {}
    assert "dropped the config file's model.options.hidden (options of 'mlp')" in caplog.text
    assert config.load(quick, ["model.name=cnn"]).model.options == {"hidden": [128]}  # cnn takes hidden too
    kept = config.load(quick, ["model.name=resnet18", "model.options.hidden=[64]"])  # set on purpose: the user's
    assert kept.model.options == {"hidden": [64]}


def test_switching_model_in_a_compare_config_drops_the_other_models_options(caplog):
    """Regression: ``fedray compare prfl_paper.yaml --set model.name=leaf_cnn`` failed on the
    file's ``model.options.channels``: the compare path applied its overrides without the hint."""
    from fedray import comparison

    with caplog.at_level(logging.WARNING, logger="fedray"):
        p = comparison.plan(ROOT / "configs" / "experiments" / "prfl_paper.yaml",
                            ["model.name=leaf_cnn", "compare.seeds=[0]"])
    assert {r.cfg.model.name for r in p.runs} == {"leaf_cnn"} and all(r.cfg.model.options == {} for r in p.runs)
    assert "dropped the config file's model.options.channels, model.options.hidden" in caplog.text
