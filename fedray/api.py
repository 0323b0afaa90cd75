"""The Python API, for notebooks and scripts: the same config, runs and comparisons as the CLI.

    import fedray
    cfg = fedray.load_config("configs/quickstart.yaml", overrides=["server.rounds=5"])
    res = fedray.run(cfg)
    res.summary["final_accuracy"], res.metrics.tail(), res.model()

``load_config`` takes a YAML path, a mapping (a config as a dict) or None (the quickstart);
``overrides`` are the CLI's ``--set`` strings (``"a.b=value"``) or a mapping ``{"a.b": value}``.
``run`` returns a :class:`Result`; ``compare`` runs a ``compare:`` file as ``fedray compare``
does and returns its summaries and report. Nothing heavy is imported until it is used.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping

from fedray.result import Result

__all__ = ["load_config", "run", "compare", "Result"]


def _overrides(overrides) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        import json

        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]  # JSON is YAML
    if isinstance(overrides, str):
        return [overrides]
    return list(overrides)


def load_config(source: str | Path | Mapping | None = None, overrides=None):
    """An :class:`~fedray.config.ExperimentConfig` from a YAML path, a mapping, or the quickstart (None)."""
    from fedray import config
    from fedray.cli import _default_config

    if isinstance(source, config.ExperimentConfig):
        return config.from_dict(config.to_dict(source), _overrides(overrides)) if overrides else source
    if isinstance(source, Mapping):
        return config.from_dict(source, _overrides(overrides))
    return config.load(source if source is not None else _default_config(), _overrides(overrides))


def run(cfg, *, progress: bool = False, out: str | Path | None = None, rerun: bool = False) -> Result:
    """Run one experiment (a config from :func:`load_config`, or anything it takes) on the
    local or configured Ray cluster; ``out`` replaces ``runtime.out_dir``. As ``fedray run``: a
    config with a completed run is not trained again (its Result is returned; ``rerun=True``
    trains it again in a new folder) and an interrupted one is resumed."""
    from fedray import config, runs
    from fedray.runtime.runner import run as run_one

    if not isinstance(cfg, config.ExperimentConfig):
        cfg = load_config(cfg)
    if out is not None:
        cfg = replace(cfg, runtime=replace(cfg.runtime, out_dir=str(out)))
    action, folder = runs.place(cfg, rerun)
    if action == "completed":
        return Result(summary=runs.load_summary(folder), run_dir=folder)
    summary = run_one(cfg, progress=progress, run_dir=folder, resume=action == "resume")
    return Result(summary=dict(summary), run_dir=Path(summary["run_dir"]))


def compare(path: str | Path, overrides=None, *, out: str | Path | None = None, progress: bool = False) -> dict:
    """``fedray compare``: ``{"summaries": [...], "report": {...}, "results": [Result, ...]}``."""
    from fedray import comparison

    p = comparison.plan(path, _overrides(overrides), out=str(out) if out is not None else None)
    res = comparison.run(p, progress=progress)
    return {**res, "results": [Result(summary=dict(s), run_dir=Path(s["run_dir"])) for s in res["summaries"]]}
