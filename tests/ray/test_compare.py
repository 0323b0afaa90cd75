"""fedray compare on the shared local Ray: two methods x two seeds -> TensorBoard runs with the
same tags and HParams, a Markdown/CSV table equal to the runs' summary.json, and PNG plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedray import report as R
from fedray.cli import main
from fedray.metrics.recorder import TAGS
from tests.runkit import run_folder

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "experiments" / "compare_smoke.yaml")


from tensorboard.plugins.hparams import plugin_data_pb2


def tb_content(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return set(ea.Tags()["scalars"]), ea.PluginTagToContent("hparams")


def test_compare_two_methods_two_seeds(ray_session, tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["compare", SMOKE, "--out", str(out), "--quiet", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "server.rounds=4", "--storage", str(tmp_path / "store")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    exp = out / "compare_smoke"
    methods = yaml.safe_load(Path(SMOKE).read_text())["compare"]["methods"]
    assert methods == ["fedavg", "fedavg_deadline"]
    runs = {(m, s): run_folder(exp, m, s) for m in methods for s in (0, 1)}
    summaries = {k: json.loads((d / "summary.json").read_text()) for k, d in runs.items()}

    # same data split, devices and seeds: configs differ only in the method section
    for s in (0, 1):
        a, b = (yaml.safe_load((runs[(m, s)] / "config.yaml").read_text()) for m in methods)
        assert a.pop("method")["name"] == "fedavg" and b.pop("method")["name"] == "fedavg_deadline"
        assert a == b and a["seed"] == s

    # TensorBoard: the same tags in every run, plus an HParams session
    tag_sets = []
    for (m, s), d in runs.items():
        tags, hp = tb_content(d)
        assert set(TAGS) <= tags
        assert "hparams/final_accuracy" in tags
        assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hp)
        start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["method"].string_value == m and "method_name" not in start.hparams
        tag_sets.append(tags)
    assert all(t == tag_sets[0] for t in tag_sets)

    # the report: table numbers are the runs' summary.json values
    rep = exp / "report"
    for name in ("accuracy_vs_virtual_time.png", "accuracy_vs_bytes.png", "accuracy_vs_flops.png"):
        assert (rep / name).stat().st_size > 1000
    md = (rep / "report.md").read_text()
    rows = {r["label"]: r for r in csv.DictReader(open(rep / "report.csv"))}
    assert set(rows) == set(methods)
    for m in methods:
        line = next(line for line in md.splitlines() if line.startswith(f"| {m} |"))
        assert line in printed  # the CLI prints the same table
        for _, key, kind in R.COLUMNS:
            vals = [summaries[(m, s)].get(key) for s in (0, 1)]
            present = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if key == "time_to_target_s" and not present:
                continue
            if not present:
                assert rows[m][f"{key}_n"] == "0"
                continue
            assert float(rows[m][f"{key}_mean"]) == pytest.approx(np.mean(present), rel=1e-12, abs=1e-12)
            if len(present) == 2:
                assert float(rows[m][f"{key}_std"]) == pytest.approx(np.std(present, ddof=1), rel=1e-9, abs=1e-12)
            assert R.cell(vals, kind, target_known=True) in line
    # the experiment folder was copied to storage
    assert (tmp_path / "store" / "compare_smoke" / runs[("fedavg", 1)].name / "summary.json").is_file()
    assert (tmp_path / "store" / "compare_smoke" / "report" / "report.md").is_file()
    # the same compare again: every run is read back, none trained, no folder added
    before = sorted(p.name for p in exp.iterdir())
    assert main(args) == 0
    assert "4 of 4 runs were completed already and read back" in capsys.readouterr().out
    assert sorted(p.name for p in exp.iterdir()) == before
