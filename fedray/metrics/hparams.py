"""The TensorBoard HParams of a run: what every run writes at its end (``fedray run``, each run of
``fedray compare``, each Tune trial), so its HParams dashboard lists runs of every kind alike.

Hparams (each once): ``method`` (the compare entry's label, else the method name), ``seed``,
``train.lr``, ``server.clients_per_round`` and the method's scalar parameters as ``method.<name>``.
Metrics: ``hparams/<key>`` for every key of :data:`METRICS`, NaN where the run has no number
(e.g. time to target when the target was not reached), so all runs have the same columns.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

__all__ = ["METRICS", "hparams_of", "metrics_of"]

METRICS = ("final_accuracy", "best_accuracy", "time_to_target_s", "virtual_s", "wall_s", "train_flops",
           "bytes_up", "bytes_down", "sdir", "energy_j")


def hparams_of(cfg, label: str | None = None) -> dict:
    """The hparams of a run of ``cfg`` (an ``ExperimentConfig``), scalars only."""
    hp = {"method": label or cfg.method.name, "seed": cfg.seed, "train.lr": cfg.train.lr,
          "server.clients_per_round": cfg.server.clients_per_round}
    p = cfg.method.params
    if p is not None and dataclasses.is_dataclass(p):
        for f in dataclasses.fields(p):
            v = getattr(p, f.name)
            if isinstance(v, (bool, int, float, str)):
                hp[f"method.{f.name}"] = v
    return hp


def metrics_of(summary: Mapping) -> dict[str, float]:
    out = {}
    for k in METRICS:
        v = summary.get(k)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        out[f"hparams/{k}"] = float(v) if ok else math.nan
    return out
