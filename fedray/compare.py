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
  ``<out_dir>/<experiment>/<label>-s<seed>`` (label defaults to the name);
  labels must be unique.
- ``--set`` overrides apply to the whole file before it is split, so
  ``--set compare.seeds=[0]`` and ``--set server.rounds=5`` both work.
- Every run config is validated before the first run starts.
- After the runs: TensorBoard HParams summaries in each run's ``tb/`` folder
  (hparams ``method``, ``method_name``, ``seed`` and the method's scalar
  parameters; metrics under ``hparams/``), then the report of
  :mod:`fedray.report` in ``<out_dir>/<experiment>/report``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from fedray import config as C
from fedray.errors import ConfigError

SECTION = "compare"
KNOWN_KEYS = ("methods", "seeds")
HPARAM_METRICS = ("final_accuracy", "best_accuracy", "time_to_target_s", "virtual_s", "wall_s", "train_flops",
                  "bytes_up", "bytes_down", "sdir", "energy_j")


@dataclass(frozen=True)
class PlannedRun:
    label: str
    seed: int
    cfg: C.ExperimentConfig
    run_dir: Path


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
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ConfigError("compare.seeds", f"must be a non-empty list of seeds, got {seeds!r}")
    for j, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"compare.seeds[{j}]", f"must be an integer >= 0, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("compare.seeds", f"must not repeat a seed, got {list(seeds)}")
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
            runs.append(PlannedRun(label, s, cfg, exp_dir / f"{label}-s{s}"))
    return ComparePlan(base, tuple(runs))


def _scalar_params(cfg: C.ExperimentConfig) -> dict:
    out = {}
    p = cfg.method.params
    if p is not None and dataclasses.is_dataclass(p):
        for f in dataclasses.fields(p):
            v = getattr(p, f.name)
            if isinstance(v, (bool, int, float, str)):
                out[f"method.{f.name}"] = v
    return out


def hparams_for(run: PlannedRun) -> dict:
    """The HParams of one run (scalars only)."""
    c = run.cfg
    hp = {"method": run.label, "method_name": c.method.name, "seed": c.seed, "train.lr": c.train.lr,
          "server.clients_per_round": c.server.clients_per_round}
    hp.update(_scalar_params(c))
    return hp


def hparam_metrics(summaries: list[Mapping]) -> list[str]:
    """The ``HPARAM_METRICS`` keys that at least one run has as a number (the same list for every run)."""
    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

    return [k for k in HPARAM_METRICS if any(num(s.get(k)) for s in summaries)]


def write_hparams(run: PlannedRun, summary: Mapping, domains: Mapping[str, list], metric_keys: list[str]) -> None:
    """Write an HParams session into the run's ``tb/`` folder next to its scalars.

    Every run gets the same metrics (``hparams/<key>`` for ``metric_keys``); a value this run lacks
    (e.g. time to target when the target was not reached) is written as NaN, so the runs keep
    identical tags and HParams columns.
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    metrics = {}
    for k in metric_keys:
        v = summary.get(k)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        metrics[f"hparams/{k}"] = float(v) if ok else float("nan")
    hp = hparams_for(run)
    disc = {k: v for k, v in domains.items() if k in hp}
    exp, ssi, sei = hparams(hp, metrics, disc)
    with SummaryWriter(log_dir=str(run.run_dir / "tb")) as w:
        w.file_writer.add_summary(exp)
        w.file_writer.add_summary(ssi)
        w.file_writer.add_summary(sei)
        for k, v in metrics.items():
            w.add_scalar(k, v, 0)


def run(p: ComparePlan, *, progress: bool = True, storage: str | None = None) -> dict:
    """Run every planned run on one Ray instance, then HParams and the report.

    Returns ``{"summaries": [...], "report": <fedray.report.write_report result>, "stored": dest or None}``.
    """
    import ray

    from fedray import report as R
    from fedray import storage as S
    from fedray.runtime import cluster
    from fedray.runtime.progress import make_bar
    from fedray.runtime.runner import Runner

    if storage is not None:
        storage = S.normalize(storage)
    owns = cluster.connect(p.base.cluster)
    summaries = []
    bar = make_bar(len(p.runs), f"compare {p.base.experiment}", "run", disable=not progress)
    try:
        for r in p.runs:
            bar.set_postfix_str(f"{r.label} s{r.seed}")
            s = Runner(r.cfg, run_dir=r.run_dir, progress=False).run()
            summaries.append(s)
            bar.set_postfix_str(f"{r.label} s{r.seed} {s['metric']}={s['final_' + s['metric']]:.3f}")
            bar.update(1)
    finally:
        bar.close()
        if owns and ray.is_initialized():
            ray.shutdown()
    domains: dict[str, list] = {}
    for r in p.runs:
        for k, v in hparams_for(r).items():
            if isinstance(v, str) and v not in domains.setdefault(k, []):
                domains[k].append(v)
    keys = hparam_metrics(summaries)
    for r, s in zip(p.runs, summaries):
        write_hparams(r, s, {k: v for k, v in domains.items() if v}, keys)
    rep = R.write_report(p.exp_dir, only=[r.run_dir for r in p.runs])
    stored = S.store_experiment(p.exp_dir, storage) if storage is not None else None
    return {"summaries": summaries, "report": rep, "stored": stored}
