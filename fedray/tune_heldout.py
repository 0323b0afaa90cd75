"""Held-out seeds for a ``fedray tune`` search: the best config and the config as written, rerun
on seeds the search never saw, so the tuned numbers are not the tuning numbers.

``tune.final_seeds: [100, 101, 102]`` in a tune config (checked by :func:`fedray.tune.load_spec`):
after the search, for every final seed ``s``

- ``tuned``: the base config with the best trial's values and ``seed = s``;
- ``default``: the base config as written (the values the search started from: for a method
  parameter that the file does not set, the method's published default) with ``seed = s``.

The final seeds must differ from the tuning seeds (the base config's ``seed``, and the values of
``seed`` when the space searches it). Each run's folder is
``<runtime.out_dir>/<experiment>/heldout/<label>-s<seed>-<config hash>`` (:mod:`fedray.runs`:
a completed run there is read back, an interrupted one resumes). The result, per label: the
search's metric at the end of every run, its mean and sample standard deviation, and the time
to ``server.target_accuracy`` (mean over the runs that reached it).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from fedray import config as C
from fedray import runs as RUNS
from fedray.tune import TuneSpec, with_values

__all__ = ["LABELS", "plan", "run", "lines"]

LABELS = ("tuned", "default")


def plan(spec: TuneSpec, best_values: Mapping[str, Any]) -> list[tuple[str, int, C.ExperimentConfig, Path]]:
    """``(label, seed, config, first folder)`` of every held-out run: labels outer, seeds inner."""
    exp = Path(spec.cfg.runtime.out_dir) / spec.cfg.experiment / "heldout"
    out = []
    for label, values in zip(LABELS, (dict(best_values), {})):
        for s in spec.final_seeds:
            cfg = C.from_dict(with_values(spec.base, {**values, "seed": int(s)}))
            out.append((label, int(s), cfg, exp / RUNS.folder_name(label, int(s), RUNS.config_hash(C.to_dict(cfg)))))
    return out


def _stats(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def run(spec: TuneSpec, best_values: Mapping[str, Any]) -> dict:
    """Train (or read back) the held-out runs on one Ray instance. Returns ``{label: {"seeds",
    "values" (the metric per seed), "mean", "sd", "tta" (time to target per seed, None: not
    reached), "folders"}}``."""
    import ray

    from fedray.runtime import cluster
    from fedray.runtime.runner import Runner

    key = f"final_{spec.metric}"
    out = {label: {"seeds": [], "values": [], "tta": [], "folders": []} for label in LABELS}
    owns = None
    try:
        for label, seed, cfg, base in plan(spec, best_values):
            action, folder, s = RUNS.choose_for(cfg, False, base)
            if action != "completed":
                if owns is None:
                    owns = cluster.connect(spec.cfg.cluster)
                s = Runner(cfg, run_dir=folder, progress=False, resume=action == "resume").run()
            r = out[label]
            r["seeds"].append(seed)
            r["values"].append(float(s[key]))
            tta = s.get("time_to_target_s")
            r["tta"].append(float(tta) if isinstance(tta, (int, float)) and math.isfinite(tta) else None)
            r["folders"].append(str(folder))
    finally:
        if owns and ray.is_initialized():
            ray.shutdown()
    for r in out.values():
        r["mean"], r["sd"] = _stats(r["values"])
    return out


def lines(result: Mapping, metric: str) -> list[str]:
    """What ``fedray tune`` prints: one line per label."""
    out = []
    for label in LABELS:
        r = result[label]
        reached = [t for t in r["tta"] if t is not None]
        tta = f"{_stats(reached)[0]:.1f} virtual s ({len(reached)}/{len(r['tta'])} reached)" if reached \
            else f"not reached (0/{len(r['tta'])})"
        seeds = ", ".join(str(s) for s in r["seeds"])
        out.append(f"held-out seeds [{seeds}] {label}: {metric} {r['mean']:.4f} +- {r['sd']:.4f}, "
                   f"time to target {tta}")
    return out
