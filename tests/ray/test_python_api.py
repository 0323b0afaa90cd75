"""The notebook-style example ``examples/python_api.py`` runs as documented in the README, and
its run's TensorBoard text summary and report link the metric glossary."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runkit import run_folder

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ray


def test_python_api_example(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token"}
    out = tmp_path / "runs"
    p = subprocess.run([sys.executable, "examples/python_api.py", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert re.search(r"final accuracy 0\.\d+ after 3 rounds \(completed\)", p.stdout), p.stdout
    assert re.search(r"^MLP \d+ parameters$", p.stdout, re.M)
    assert re.search(r"^fedavg: final accuracy", p.stdout, re.M) and re.search(r"^fedprox: final", p.stdout, re.M)
    report = (out / "python_api_compare" / "report" / "report.md").read_text()
    assert "docs/metrics.md" in report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_folder(out / "python_api", "fedavg") / "tb"), size_guidance={"tensors": 0}).Reload()
    texts = [t.tensor_proto.string_val[0].decode() for tag in tb.Tags()["tensors"] if tag.startswith("summary")
             for t in tb.Tensors(tag)]
    assert any("docs/metrics.md" in t and "| sdir |" in t for t in texts), texts


def test_import_fedray_is_cheap_and_the_api_is_there():
    code = ("import sys, fedray; heavy = [m for m in ('torch', 'ray', 'pandas') if m in sys.modules]; "
            "assert not heavy, heavy; assert callable(fedray.run) and callable(fedray.load_config); "
            "import fedray.comparison; assert callable(fedray.compare) and fedray.comparison.plan; "
            "cfg = fedray.load_config({'server': {'rounds': 2}}, overrides={'seed': 3}); "
            "assert (cfg.server.rounds, cfg.seed) == (2, 3); print(fedray.__version__)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
