"""Configuration: YAML -> frozen dataclasses, overrides, one-line errors with exit code 2."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from fedray import cli, config
from fedray.errors import ConfigError


def write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_defaults_and_frozen():
    cfg = config.from_dict({})
    assert cfg.data.name == "digits" and cfg.method.name == "fedavg"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


def test_overrides_parse_yaml_values():
    cfg = config.from_dict({}, ["data.partition.kind=dirichlet", "data.partition.alpha=0.3", "train.lr=1e-3",
                                "model.options={hidden: [32, 16]}", "runtime.progress=false"])
    assert cfg.data.partition.kind == "dirichlet" and cfg.data.partition.alpha == 0.3
    assert cfg.train.lr == 1e-3 and cfg.model.options == {"hidden": [32, 16]} and cfg.runtime.progress is False


def test_resolved_config_round_trips(tmp_path):
    cfg = config.from_dict({"experiment": "x", "devices": {"tiers": "clamp"}}, ["server.rounds=7"])
    config.dump(cfg, tmp_path / "r.yaml")
    again = config.load(tmp_path / "r.yaml")
    assert again == cfg


@pytest.mark.parametrize("data, overrides, message", [
    ({"data": {"partition": {"kind": "dirichlet", "alpha": -1}}}, [],
     "config error: data.partition.alpha: must be > 0, got -1"),
    ({"data": {"nmae": "digits"}}, [], "config error: data.nmae: unknown key"),
    ({}, ["train.lr=fast"], "config error: train.lr: must be a number, got 'fast'"),
    ({}, ["server.rounds=2.5"], "config error: server.rounds: must be an integer, got 2.5"),
    ({}, ["data.test_fraction=1.5"], "config error: data.test_fraction: must be in (0, 1), got 1.5"),
    ({}, ["data.name=mnist9"], "config error: data.name: unknown data set 'mnist9'"),
    ({}, ["model.name=transformer"], "config error: model.name: unknown model 'transformer'"),
    ({}, ["method.name=fedmagic"], "config error: method.name: unknown method 'fedmagic'"),
    ({"data": {"name": "cifar10", "root": "/no/such/folder"}}, [],
     "config error: data.root: folder '/no/such/folder' does not exist"),
    ({}, ["server.clients_per_round=500"], "config error: server.clients_per_round: must be <= data.num_clients"),
    ({}, ["devices.tiers=warp"], "config error: devices.tiers: unknown preset 'warp'"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, data, overrides, message):
    path = write(tmp_path, data)
    args = ["run", path, "--quiet"]
    for o in overrides:
        args += ["--set", o]
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(message), err
    assert "\n" not in err and "Traceback" not in err


def test_missing_config_file(capsys):
    assert cli.main(["run", "/no/such.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "config error: config: file '/no/such.yaml' does not exist"


def test_malformed_yaml(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    assert cli.main(["run", str(p)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def test_error_carries_field():
    with pytest.raises(ConfigError) as e:
        config.from_dict({"server": {"eval_every": 0}})
    assert e.value.field == "server.eval_every"


def test_stop_at_target_needs_a_target():
    with pytest.raises(ConfigError) as e:
        config.from_dict({"server": {"stop_at_target": True}})
    assert e.value.field == "server.stop_at_target"


def test_clamp_family_is_on_the_published_defaults():
    """CLAMP / MA-CLAMP: 50 clients, 10 per round, Adam 1e-3, batch 64, depth 3 of 5, rho 0.5,
    speeds 10% 0.3-0.6x / 80% 0.8-1.4x / 10% 1.8-2.5x."""
    from fedray import comparison
    from fedray.devices.population import population
    from tests import kit

    runs = comparison.plan("configs/experiments/clamp_family.yaml").runs
    by_name = {r.cfg.method.name: r.cfg for r in runs if r.seed == 0}
    cfg = by_name["ma_clamp"]
    assert (cfg.data.num_clients, cfg.server.clients_per_round, cfg.train.optimizer, cfg.train.lr,
            cfg.train.batch_size) == (50, 10, "adam", 1e-3, 64)
    assert cfg.method.params.initial_depth == 3 and cfg.method.params.rho == 0.5
    assert by_name["clamp"].method.params.initial_depth == 3
    info, _ = kit.model_info(cfg.model.name, cfg.model.options)
    assert info.try_spec().L == 5
    tiers = [(t.fraction, t.speed_range) for t in population(cfg.devices).tiers]
    assert tiers == [(0.1, (0.3, 0.6)), (0.8, (0.8, 1.4)), (0.1, (1.8, 2.5))]
