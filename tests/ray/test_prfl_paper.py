"""PR-FL's published setup end to end: ``configs/experiments/prfl_paper.yaml`` (the
``prfl_paper`` device population) runs every method of its compare on the same devices."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedray.cli import main
from tests.runkit import run_folder

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "experiments" / "prfl_paper.yaml"
TIERS = ["fast"] * 2 + ["mid"] * 2 + ["mid_slow"] * 2 + ["slow"] * 4


def test_every_method_of_prfl_paper_runs_on_the_published_devices(ray_session, tmp_path):
    out = tmp_path / "runs"
    args = ["compare", str(CONFIG), "--out", str(out), "--quiet", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "compare.seeds=[0]", "--set", "server.max_virtual_s=2", "--set", "model.name=mlp",
            "--set", "model.options={hidden: [16]}", "--set", "runtime.tensorboard=false",
            "--set", "cluster.num_client_actors=1"]
    assert main(args) == 0
    methods = [m if isinstance(m, str) else m["name"] for m in yaml.safe_load(CONFIG.read_text())["compare"]["methods"]]
    assert methods == ["prfl", "fedasync", "fedfix", "fedavg", "heterofl"]
    for m in methods:
        d = run_folder(out / "prfl_paper", m)
        assert yaml.safe_load((d / "config.yaml").read_text())["devices"]["population"] == "prfl_paper"
        summary = json.loads((d / "summary.json").read_text())
        t = pd.read_parquet(d / "metrics.parquet")
        ups = t[t.event == "update"]
        assert summary["version"] > 0 and summary["updates"] == len(ups) > 0, m
        for r in ups.itertuples():  # tiers by client id; SDIR's slow devices: the 0.2e12 MAC/s group
            assert r.tier == TIERS[int(r.client_id)] and bool(r.slow) == (r.client_id >= 6), (m, r)
        if m == "prfl":  # the published starting densities, before any communication time is known
            first = ups.sort_values("dispatch_id").groupby("client_id").density.first()
            assert first[0] == 1.0 and first[9] == pytest.approx(0.1, abs=0.02) and first[4] < first[2] < 1.0
