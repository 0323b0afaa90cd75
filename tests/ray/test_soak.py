"""Flat driver memory (``tools/soak_memory.py``): the event rows are on disk, not in memory. The
driver used to grow by about 13 MiB per 1,000 rounds; from round 500 to round 2,500 of a quick
quickstart it now grows by less than 8 MiB (the 20,000-round soak is in docs/reliability.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.runkit import run_python

pytestmark = pytest.mark.slow
TOOL = Path(__file__).resolve().parents[2] / "tools" / "soak_memory.py"


def test_driver_memory_stays_flat(tmp_path):
    r = run_python([str(TOOL), "--rounds", "2500", "--from-round", "500", "--out", str(tmp_path),
                    "--set", "server.eval_every=100", "--set", "train.local_epochs=1",
                    "--set", "server.clients_per_round=5", "--set", "runtime.tensorboard=false", "--json"], prefix="")
    assert r["rounds"] == 2500
    assert r["growth_mib"] < 8.0, r
