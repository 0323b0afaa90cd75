"""The package's shape: no import cycles between fedray's modules (imports inside functions
count too), and no module over about 400 lines unless one cohesive algorithm needs it."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import imports  # noqa: E402


def test_no_import_cycles():
    assert imports.cycles(imports.graph()) == []


def test_former_cycles_stay_broken():
    g = imports.graph()
    assert "fedray.aggregation.rules" not in g["fedray.aggregation.merge"]
    assert "fedray.models.zoo" not in g["fedray.models.spec"] and "fedray.models.spec" not in g["fedray.models.zoo"]
    assert not {m for m in g["fedray.methods.base"] | g["fedray.methods.prfl"] if m == "fedray.config"}
    assert "fedray.comparison" not in g["fedray.tune"]
    # the trainer and the client worker know no method by name
    assert not {m for m in g["fedray.client.trainer"] | g["fedray.client.worker"]
                if m.startswith("fedray.methods.") and m not in ("fedray.methods.base", "fedray.methods.registry")}


def test_modules_stay_small():
    assert imports.oversized() == []
