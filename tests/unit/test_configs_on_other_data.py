"""Every reproduction config runs unchanged on CIFAR-10 and FEMNIST when a data folder is given
(``--set data.name=cifar10 --set data.root=...``): data, partition, model and, for the methods
that need one, the model's layer structure, for every method of every config, before Ray
starts. The folders hold small files in the real formats (no copy of either data set exists
here); ``tests/ray/test_mnist5k_runtime.py`` trains one config on the CIFAR-10 folder (``tools/datafiles.py``)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedray import comparison
from fedray import config as C
from fedray.methods import registry
from fedray.runtime.setup import prepare

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from datafiles import write_cifar10, write_femnist  # noqa: E402
CONFIGS = sorted(p.name for p in (ROOT / "configs" / "experiments").glob("*.yaml"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {"cifar10": write_cifar10(base / "cifar"), "femnist": write_femnist(base / "femnist")}


@pytest.mark.parametrize("data", ["cifar10", "femnist"])
@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_prepares_on_the_data_set_unchanged(config, data, folders, tmp_path):
    path = ROOT / "configs" / "experiments" / config
    sets = [f"data.name={data}", f"data.root={folders[data]}", f"data.cache_dir={tmp_path}"]
    if "compare" in yaml.safe_load(path.read_text()):
        cfgs = [r.cfg for r in comparison.plan(path, sets + ["compare.seeds=[0]"], out=str(tmp_path)).runs]
    else:  # a tune / grid config: what `fedray run` runs (its method section)
        cfgs = [C.load(path, sets)]
    shapes = {"cifar10": (3, 32, 32), "femnist": (1, 28, 28)}
    checked = set()
    for cfg in cfgs:
        s = prepare(cfg)
        assert s.dataset.input_shape == shapes[data] and len(s.partitions.sizes) == cfg.data.num_clients
        assert (s.partitions.sizes > 0).all()
        if registry.get(cfg.method.name).needs_spec and cfg.method.name not in checked:
            s.model.spec_for(cfg.method.name)  # the method can read the model's structure
            checked.add(cfg.method.name)
