"""``fedray compare CONFIG``: methods x seeds on the same data split, devices and seeds.

A compare config is a normal experiment config plus a ``compare:`` section::

    compare:
      methods: [fedavg, {name: fedbuff, K: 5}, {name: fedbuff, label: fedbuff-k10, K: 10}]
      seeds: [0, 1, 2]

Conventions:

- Each run is the base config with ``method`` *replaced* by the entry (the
  base's own method parameters do not carry over) and ``seed`` replaced by one
  of the seeds; everything else (data, partition, devices, model, training,
  server, cluster) is shared, so for one seed every method sees the same data
  split and device population.
- A method entry is a name or a mapping with ``name``, an optional ``label``
  and the method's parameters. The run folder is
  ``<out_dir>/<experiment>/<label>-s<seed>-<config hash>`` (label defaults to
  the name; the hash: :mod:`fedray.runs`); labels must be unique.
- Comparing again trains only what is missing: a run whose folder holds a
  completed run is read back, an interrupted one with a checkpoint resumes,
  ``rerun=True`` (``fedray compare --rerun``) trains every run afresh in new
  ``-r<n>`` folders.
- ``--set`` overrides apply to the whole file before it is split, so
  ``--set compare.seeds=[0]`` and ``--set server.rounds=5`` both work.
- Every run config is validated before the first run starts.
- Each run writes its TensorBoard HParams (:mod:`fedray.metrics.hparams`: the
  entry's label as ``method``); after the runs, the report of
  :mod:`fedray.report` in ``<out_dir>/<experiment>/report`` (of these runs only).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from fedray import config as C
from fedray import runs as RUNS
from fedray.errors import ConfigError
from fedray.params import seed_list

SECTION = "compare"
KNOWN_KEYS = ("methods", "seeds")


@dataclass(frozen=True)
class PlannedRun:
    label: str
    seed: int
    cfg: C.ExperimentConfig
    run_dir: Path  # its first folder (``-r<n>`` ones follow it, see fedray.runs)


@dataclass(frozen=True)
class ComparePlan:
    base: C.ExperimentConfig
    runs: tuple[PlannedRun, ...]

    @property
    def exp_dir(self) -> Path:
        return Path(self.base.runtime.out_dir) / self.base.experiment


def _method_entry(entry, i: int) -> tuple[str, dict]:
    where = f"compare.methods[{i}]"
    if isinstance(entry, str):
        return entry, {"name": entry}
    if not isinstance(entry, Mapping):
        raise ConfigError(where, f"must be a method name or a mapping with 'name', got {entry!r}")
    if "name" not in entry:
        raise ConfigError(where, "needs a 'name'")
    m = dict(entry)
    label = m.pop("label", None) or m["name"]
    if not isinstance(label, str):
        raise ConfigError(f"{where}.label", f"must be a string, got {label!r}")
    if "/" in label or label != label.strip() or not label:
        raise ConfigError(f"{where}.label", f"must be a plain folder name, got {label!r}")
    return label, m


def plan(path: str | Path, overrides=(), *, out: str | None = None) -> ComparePlan:
    """Validate a compare config into its list of runs (methods outer, seeds inner)."""
    base_raw, sec = C.read_sections(path, overrides, SECTION, KNOWN_KEYS, "methods, seeds")
    methods = sec.get("methods")
    if methods is None or (isinstance(methods, (list, tuple)) and len(methods) == 0):
        raise ConfigError("compare.methods", "must not be empty")
    if not isinstance(methods, (list, tuple)):
        raise ConfigError("compare.methods", f"must be a list of methods, got {methods!r}")
    if out is not None:
        C.set_path(base_raw, "runtime.out_dir", out)
    base = C.from_dict(base_raw)
    seeds = sec.get("seeds", [base.seed])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    seeds = seed_list(seeds, "compare.seeds")
    entries, labels = [], {}
    for i, e in enumerate(methods):
        label, m = _method_entry(e, i)
        if label in labels:
            raise ConfigError(f"compare.methods[{i}]", f"label {label!r} repeats compare.methods[{labels[label]}]; "
                              "give each entry a distinct 'label'")
        labels[label] = i
        entries.append((i, label, m))
    runs = []
    exp_dir = Path(base.runtime.out_dir) / base.experiment
    for i, label, m in entries:
        for s in seeds:
            raw = copy.deepcopy(base_raw)
            raw["method"] = copy.deepcopy(m)
            raw["seed"] = s
            try:
                cfg = C.from_dict(raw)
            except ConfigError as e:
                raise ConfigError(f"compare.methods[{i}]", f"{e.field}: {e.message}") from None
            folder = RUNS.folder_name(label, s, RUNS.config_hash(C.to_dict(cfg)))
            runs.append(PlannedRun(label, s, cfg, exp_dir / folder))
    return ComparePlan(base, tuple(runs))


def run(p: ComparePlan, *, progress: bool = True, storage: str | None = None, rerun: bool = False) -> dict:
    """Run every planned run on one Ray instance (completed ones are read back, see the module
    doc), then the report.

    Returns ``{"summaries": [...], "report": <fedray.report.write_report result>, "stored": dest or None,
    "folders": [the run folders], "reused": how many runs were read back}``.
    """
    import ray

    from fedray import report as R
    from fedray import storage as S
    from fedray.runtime import cluster
    from fedray.runtime.progress import make_bar
    from fedray.runtime.runner import Runner

    if storage is not None:
        storage = S.normalize(storage)
    owns = None
    summaries, folders, reused = [], [], 0
    bar = make_bar(len(p.runs), f"compare {p.base.experiment}", "run", disable=not progress)
    try:
        for r in p.runs:
            bar.set_postfix_str(f"{r.label} s{r.seed}")
            action, folder, s = RUNS.choose_for(r.cfg, rerun, r.run_dir)
            if action == "completed":
                reused += 1
            else:
                if owns is None:
                    owns = cluster.connect(p.base.cluster)
                s = Runner(r.cfg, run_dir=folder, progress=False, resume=action == "resume").run()
            summaries.append(s)
            folders.append(folder)
            bar.set_postfix_str(f"{r.label} s{r.seed} {s['metric']}={s['final_' + s['metric']]:.3f}")
            bar.update(1)
    finally:
        bar.close()
        if owns and ray.is_initialized():
            ray.shutdown()
    rep = R.write_report(p.exp_dir, only=folders)
    stored = S.store_experiment(p.exp_dir, storage) if storage is not None else None
    return {"summaries": summaries, "report": rep, "stored": stored, "folders": folders, "reused": reused}
