"""``fedray tune CONFIG``: a Ray Tune search over any config field.

A tune config is a normal experiment config plus a ``tune:`` section::

    tune:
      metric: accuracy          # accuracy (max) or loss (min), as reported after each evaluation
      mode: max
      num_samples: 4            # samples of the other domains per grid point (Tune's rule); a space of
                                # grid/choice only draws distinct combinations (fedray.tune_space)
      max_concurrent_trials: 2  # optional
      driver_cpus: 0.5          # CPUs of the trial's driver loop (the first placement-group bundle)
      scheduler: {name: asha, time_attr: version, max_t: 20, grace_period: 2, reduction_factor: 2}
      final_seeds: [100, 101, 102]  # optional: best and defaults rerun on held-out seeds (fedray.tune_heldout)
      space:
        method.rho: {grid: [0.3, 0.5, 0.7]}
        train.lr: {loguniform: [0.001, 0.1]}
        server.clients_per_round: {choice: [5, 10]}
        train.local_epochs: {randint: [1, 4]}       # upper bound exclusive
        train.momentum: {uniform: [0.0, 0.9]}

Conventions:

- Every key of ``space`` is a dotted config field path (``method.<param>`` for
  method parameters). Before anything runs, the base config is built with
  each candidate (every grid/choice value, both bounds of a range) so an unknown
  field or an out-of-range bound is one ``config error: tune.space.<key>: ...``
  line.
- ``--set`` overrides apply to the whole file (``--set tune.num_samples=2``
  works too).
- A trial is one :class:`fedray.runtime.runner.Runner` run. Its resources are a
  ``PlacementGroupFactory`` sized from the trial's own config: bundle 0 = the
  driver loop (``driver_cpus``), one bundle for the aggregator when
  ``cluster.aggregator_cpus > 0``, and one per client actor with the resources
  the runtime gives it (``cluster.client_actor``, or each tier's resources with
  ``devices.actor_per_tier``: CPU, GPU, memory, custom resources such as
  ``device:edge``). Tune captures child actors in the trial's placement group,
  so the run's actors are scheduled inside it; the run then creates no
  placement group of its own (``devices.placement`` becomes the strategy of
  the trial's group, PACK for ``none``).
- Trials report ``accuracy, loss, version, virtual_s, wall_s`` after each
  evaluation (``tune.report``), one evaluation late so that a finished run's
  folder is complete before Tune may stop the trial (:class:`DeferredReport`);
  the last report adds the run's summary numbers. ASHA's ``time_attr`` is one
  of ``version``, ``virtual_s``, ``wall_s``, ``training_iteration``.
- Output: the Tune experiment at ``<storage>/<experiment>/tune`` where storage
  is ``--storage`` (a path or any ``pyarrow.fs`` URI) or ``runtime.out_dir``.
  Each trial folder holds ``run/`` (the run folder of a normal run, with its
  TensorBoard logs) next to Tune's own result files. ``best.yaml`` (the base
  config with the best trial's values; runnable with ``fedray run``) and
  ``results.csv`` are written into the experiment folder.
- Console: one line per finished trial and the best at the end (no Tune status tables;
  ``--quiet``: only the best).
- Best trial: best ``metric`` at the trial's last report (``scope="last"``).
- Held-out seeds: with ``final_seeds``, ``fedray tune`` then reruns the best config and the
  config as written on those seeds (none of them a tuning seed) and prints both
  (:mod:`fedray.tune_heldout`).
- Resume: ``--resume`` restores the experiment with ``Tuner.restore``; finished
  trials are kept, unfinished ones restart from their beginning (runs are not
  checkpointed mid-way).
"""
from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from fedray import config as C
from fedray import storage as S
from fedray import tune_space
from fedray.errors import ConfigError
from fedray.devices import population
from fedray.params import seed_list

SECTION = "tune"
KNOWN_KEYS = ("metric", "mode", "num_samples", "max_concurrent_trials", "driver_cpus", "scheduler", "space",
              "final_seeds")
METRICS = {"accuracy": "max", "loss": "min"}
TIME_ATTRS = ("version", "virtual_s", "wall_s", "training_iteration")
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULER_KEYS = ("name", "time_attr", "max_t", "grace_period", "reduction_factor")


@dataclass(frozen=True)
class SchedulerSpec:
    name: str = "asha"  # asha | fifo
    time_attr: str = "version"
    max_t: float = 100
    grace_period: float = 1
    reduction_factor: float = 2


@dataclass(frozen=True)
class TuneSpec:
    base: dict  # raw experiment mapping (tune section removed, overrides applied)
    cfg: C.ExperimentConfig  # the base, validated
    space: dict  # field path -> (domain kind, tuple of args)
    metric: str = "accuracy"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    driver_cpus: float = 0.5
    scheduler: SchedulerSpec | None = None
    final_seeds: tuple[int, ...] = ()  # held-out seeds (fedray.tune_heldout); (): none


# ---------------------------------------------------------------- parsing and validation


def _number(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(where, f"must be a finite number, got {v!r}")
    return v


def parse_domain(key: str, spec) -> tuple[str, tuple]:
    """``{grid: [...]}`` / ``{choice: [...]}`` / ``{uniform|loguniform|randint: [lo, hi]}`` -> (kind, args)."""
    where = f"tune.space.{key}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(where, f"must be one of {{{', '.join(f'{d}: ...' for d in DOMAINS)}}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in DOMAINS:
        raise ConfigError(where, f"unknown domain {kind!r} (known: {', '.join(DOMAINS)})")
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"{where}.{kind}", f"must be a non-empty list, got {args!r}")
    if kind in ("grid", "choice"):
        return kind, tuple(args)
    if len(args) != 2:
        raise ConfigError(f"{where}.{kind}", f"must be [low, high], got {args!r}")
    lo, hi = (_number(a, f"{where}.{kind}") for a in args)
    if not lo < hi:
        raise ConfigError(f"{where}.{kind}", f"low must be < high, got {list(args)}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}.{kind}", f"bounds must be > 0, got {list(args)}")
    if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise ConfigError(f"{where}.{kind}", f"bounds must be integers, got {list(args)}")
    if kind == "randint":
        return kind, (int(lo), int(hi))
    return kind, (float(lo), float(hi))


def candidates(kind: str, args: tuple) -> list:
    """The values validated up front: every listed value, or both ends of a range (randint: hi-1)."""
    if kind in ("grid", "choice"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [args[0], args[1]]


def with_values(base: Mapping, values: Mapping[str, Any]) -> dict:
    raw = copy.deepcopy(dict(base))
    for k, v in values.items():
        C.set_path(raw, k, _plain(v))
    return raw


def _plain(v):
    """numpy scalars (as Tune samples them) -> Python scalars, so configs and YAML stay plain."""
    if hasattr(v, "item") and not isinstance(v, (list, tuple, dict, str)):
        return v.item()
    return v


def check_space(base: Mapping, space: Mapping[str, tuple]) -> None:
    """Build the config with every candidate value of every key; one ConfigError line on failure."""
    for key, (kind, args) in space.items():
        for v in candidates(kind, args):
            try:
                C.from_dict(with_values(base, {key: v}))
            except ConfigError as e:
                if "unknown key" in e.message:
                    detail = f"not a config field ({e.field}: {e.message})"
                else:
                    detail = e.message if e.field == key else f"{e.field}: {e.message}"
                raise ConfigError(f"tune.space.{key}", detail) from None


def _final_seeds(raw, cfg: C.ExperimentConfig, space: Mapping[str, tuple]) -> tuple[int, ...]:
    """``tune.final_seeds``: distinct integers >= 0, none of them a tuning seed (the base ``seed``
    and, when the space searches ``seed``, its values)."""
    if raw is None:
        return ()
    seeds = seed_list(raw, "tune.final_seeds")
    tuning = {cfg.seed}
    if "seed" in space:
        kind, args = space["seed"]
        tuning |= set(range(*args)) if kind == "randint" else set(args)
    shared = sorted(tuning & set(seeds))
    if shared:
        raise ConfigError("tune.final_seeds", f"must be held out: seed(s) {shared} are tuning seeds")
    return seeds


def _scheduler(raw) -> SchedulerSpec | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError("tune.scheduler", f"must be a mapping, got {raw!r}")
    for k in raw:
        if k not in SCHEDULER_KEYS:
            raise ConfigError(f"tune.scheduler.{k}", f"unknown key (known: {', '.join(SCHEDULER_KEYS)})")
    name = raw.get("name", "asha")
    if name not in ("asha", "fifo"):
        raise ConfigError("tune.scheduler.name", f"must be one of asha, fifo, got {name!r}")
    if name == "fifo":
        return None
    s = SchedulerSpec()
    t = raw.get("time_attr", s.time_attr)
    if t not in TIME_ATTRS:
        raise ConfigError("tune.scheduler.time_attr", f"must be one of {', '.join(TIME_ATTRS)}, got {t!r}")
    vals = {}
    for k in ("max_t", "grace_period", "reduction_factor"):
        v = _number(raw.get(k, getattr(s, k)), f"tune.scheduler.{k}")
        if v <= 0:
            raise ConfigError(f"tune.scheduler.{k}", f"must be > 0, got {v!r}")
        vals[k] = v
    if vals["reduction_factor"] <= 1:
        raise ConfigError("tune.scheduler.reduction_factor", f"must be > 1, got {vals['reduction_factor']!r}")
    if vals["grace_period"] > vals["max_t"]:
        raise ConfigError("tune.scheduler.grace_period", f"must be <= max_t ({vals['max_t']}), got {vals['grace_period']}")
    return SchedulerSpec(name, t, **vals)


def load_spec(path: str | Path, overrides=()) -> TuneSpec:
    """Read and validate a tune config (base config, tune section, search space)."""
    base, sec = C.read_sections(path, overrides, SECTION, KNOWN_KEYS, "space, metric, scheduler")
    cfg = C.from_dict(base)
    metric = sec.get("metric", "accuracy")
    if metric not in METRICS:
        raise ConfigError("tune.metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
    mode = sec.get("mode", METRICS[metric])
    if mode not in ("max", "min"):
        raise ConfigError("tune.mode", f"must be max or min, got {mode!r}")
    n = sec.get("num_samples", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError("tune.num_samples", f"must be an integer >= 1, got {n!r}")
    mc = sec.get("max_concurrent_trials")
    if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
        raise ConfigError("tune.max_concurrent_trials", f"must be an integer >= 1, got {mc!r}")
    dc = _number(sec.get("driver_cpus", 0.5), "tune.driver_cpus")
    if dc <= 0:
        raise ConfigError("tune.driver_cpus", f"must be > 0, got {dc!r}")
    raw_space = sec.get("space")
    if not isinstance(raw_space, Mapping) or not raw_space:
        raise ConfigError("tune.space", "must map config field paths to domains and not be empty")
    space = {str(k): parse_domain(str(k), v) for k, v in raw_space.items()}
    check_space(base, space)
    return TuneSpec(base=base, cfg=cfg, space=space, metric=metric, mode=mode, num_samples=n,
                    max_concurrent_trials=mc, driver_cpus=float(dc), scheduler=_scheduler(sec.get("scheduler")),
                    final_seeds=_final_seeds(sec.get("final_seeds"), cfg, space))


# ---------------------------------------------------------------- Ray Tune pieces


def param_space(spec: TuneSpec) -> tuple[dict, int]:
    """The Tune ``param_space`` (flat, keyed by field path) and ``num_samples``: a categorical
    space is drawn without replacement (:mod:`fedray.tune_space`)."""
    return tune_space.param_space(spec.space, spec.num_samples, spec.cfg.seed)


def without_own_placement(cfg: C.ExperimentConfig) -> C.ExperimentConfig:
    """Inside a trial the trial's placement group reserves the client actors, so the run does not
    create a second one (``devices.placement`` becomes the trial group's strategy instead)."""
    return replace(cfg, devices=replace(cfg.devices, placement="none"))


def client_actor_options(cfg: C.ExperimentConfig) -> list[dict]:
    """The Ray options of every client actor the run will create, from the runtime's own
    :func:`fedray.runtime.cluster.create_client_actors` (no actor is created)."""
    from fedray.runtime import cluster

    profiles = []
    if cfg.devices.actor_per_tier:  # per-tier pools depend on which tiers have clients
        profiles = population.profiles(cfg)
    pools, _ = cluster.create_client_actors(without_own_placement(cfg), profiles, lambda opts: dict(opts))
    return [o for pool in pools.values() for o in pool]


def _bundle(opts: Mapping) -> dict:
    b = {"CPU": float(opts.get("num_cpus", 1.0) or 0), "GPU": float(opts.get("num_gpus") or 0)}
    if opts.get("memory"):
        b["memory"] = float(opts["memory"])
    b.update({k: float(v) for k, v in (opts.get("resources") or {}).items()})
    return {k: v for k, v in b.items() if v > 0}


def bundles(cfg: C.ExperimentConfig, driver_cpus: float) -> list[dict]:
    """Placement-group bundles of one trial: driver loop, aggregator (if it asks for CPUs or a GPU
    share), one per client actor with its resources (actors asking for nothing get no bundle)."""
    out = [{"CPU": float(driver_cpus)}]
    from fedray.runtime.cluster import gpu_share

    agg = {"CPU": float(cfg.cluster.aggregator_cpus), "GPU": gpu_share(cfg, aggregator=True)}
    if any(agg.values()):
        out.append({k: v for k, v in agg.items() if v})
    out += [b for b in (_bundle(o) for o in client_actor_options(cfg)) if b]
    return out


def trial_resources(cfg: C.ExperimentConfig, driver_cpus: float):
    """The trial's ``PlacementGroupFactory`` (strategy: ``devices.placement``, PACK when ``none``)."""
    from ray.tune import PlacementGroupFactory

    strategy = "PACK" if cfg.devices.placement == "none" else cfg.devices.placement.upper()
    return PlacementGroupFactory(bundles(cfg, driver_cpus), strategy=strategy)


def trial_base(spec: TuneSpec) -> dict:
    """The base mapping trials start from: local paths made absolute (trials run in their own folder)."""
    base = copy.deepcopy(spec.base)
    data = base.setdefault("data", {})
    data["cache_dir"] = str(Path(spec.cfg.data.cache_dir).resolve())
    if spec.cfg.data.root is not None:
        data["root"] = str(Path(spec.cfg.data.root).resolve())
    return base


SUMMARY_METRICS = ("final_accuracy", "best_accuracy", "bytes_up", "bytes_down", "train_flops", "sdir", "energy_j",
                   "time_to_target_s")


class DeferredReport:
    """Reports each evaluation to Tune one evaluation late, and the last one after the run has
    written its folder, together with the run's summary numbers.

    Why: Tune may stop a trial right after the report that reaches the scheduler's ``max_t``
    (or when ASHA cuts it); reporting the last evaluation only after ``Runner.run`` returned
    guarantees that a trial which runs to its end has its complete run folder (summary.json,
    metrics.parquet, model.npz) synced to storage. ASHA therefore decides one evaluation later
    than it could.
    """

    def __init__(self, report):
        self._report = report
        self.pending: dict | None = None

    def __call__(self, metrics: dict) -> None:
        if self.pending is not None:
            self._report(self.pending)
        self.pending = dict(metrics)

    def finish(self, summary: dict) -> None:
        final = dict(self.pending or {"accuracy": summary.get("final_accuracy"), "loss": summary.get("final_loss"),
                                      "version": summary.get("version"), "virtual_s": summary.get("virtual_s"),
                                      "wall_s": summary.get("wall_s")})
        for k in SUMMARY_METRICS:
            v = summary.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                final[k] = v
        self.pending = None
        self._report(final)


def make_trainable(spec: TuneSpec):
    """A function trainable; each trial's placement group is sized from its own config."""
    from ray import tune

    base = trial_base(spec)
    driver_cpus = spec.driver_cpus

    def fedray_trial(config):
        from ray import tune as _tune

        from fedray.runtime.runner import Runner

        cfg = C.from_dict(with_values(base, tune_space.field_values(config)))
        cfg = without_own_placement(replace(cfg, runtime=replace(cfg.runtime, progress=False)))
        rep = DeferredReport(_tune.report)
        runner = Runner(cfg, run_dir=Path.cwd() / "run", progress=False, report=rep)
        try:
            summary = runner.run()
        except BaseException:
            runner.shutdown()
            raise
        rep.finish(summary)

    def resources(config):
        return trial_resources(C.from_dict(with_values(base, tune_space.field_values(config))), driver_cpus)

    return tune.with_resources(fedray_trial, resources)


def experiment_path(spec: TuneSpec, storage: str | None = None) -> str:
    root = S.normalize(storage) if storage else str(Path(spec.cfg.runtime.out_dir).resolve())
    return S.join(root, spec.cfg.experiment, SECTION)


def best_yaml(spec: TuneSpec, values: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """Runnable YAML: the base config with the best values set (validated before it is returned)."""
    raw = with_values(spec.base, values)
    C.from_dict(raw)
    got = metrics.get(spec.metric)
    head = [f"# best trial of the fedray tune search on experiment {spec.cfg.experiment!r}",
            f"# {spec.metric} ({spec.mode}) = {got}",
            *[f"#   {k} = {_plain(v)!r}" for k, v in values.items()], ""]
    return "\n".join(head) + yaml.safe_dump(raw, sort_keys=False)


def _write_text(dest: str, text: str) -> None:
    fs, path = S.resolve(dest)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def search(spec: TuneSpec, *, storage: str | None = None, resume: bool = False, quiet: bool = False) -> dict:
    """Run (or resume) the search. Returns ``{"path", "best_path", "best_values", "best_metrics",
    "trials", "finished", "interrupted"}``; on interruption no best config is written."""
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    from fedray.runtime import cluster

    path = experiment_path(spec, storage)
    exists = tune.Tuner.can_restore(path)
    if resume and not exists:
        raise ConfigError("--resume", f"no search to resume at '{path}'")
    if not resume and exists:
        raise ConfigError("tune", f"a search already exists at '{path}'; pass --resume to continue it "
                          "or remove that folder")
    trainable = make_trainable(spec)
    owns = cluster.connect(spec.cfg.cluster)
    try:
        if resume:
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            sched = None
            if spec.scheduler is not None:
                s = spec.scheduler
                sched = ASHAScheduler(time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period,
                                      reduction_factor=s.reduction_factor)
            parent, name = path.rsplit("/", 1)
            space, samples = param_space(spec)
            lines = [] if quiet else [tune_space.trial_lines(
                list(spec.space), spec.metric, tune_space.trial_count(spec.space, spec.num_samples))]
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=samples,
                                            max_concurrent_trials=spec.max_concurrent_trials, scheduler=sched),
                run_config=tune.RunConfig(name=name, storage_path=parent, verbose=0,
                                          sync_config=tune.SyncConfig(sync_artifacts=True),
                                          callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), *lines]),
            )
        with tune_space.tune_environment():
            grid = tuner.fit()
    finally:
        if owns and ray.is_initialized():
            ray.shutdown()
    # Statuses as Tune last saved them: on Ctrl+C the state is saved *before* the running trials are
    # stopped (and then counted as terminated in ``grid``), so unfinished trials show up only here.
    statuses = [t.status for t in tune.ExperimentAnalysis(path).trials]
    finished = sum(st == "TERMINATED" for st in statuses)
    errors = sum(st == "ERROR" for st in statuses)
    out = {"path": path, "trials": len(statuses), "finished": finished, "errors": errors,
           "interrupted": finished + errors < len(statuses), "best_path": None, "best_values": None,
           "best_metrics": None}
    if out["interrupted"]:
        return out
    df = grid.get_dataframe()
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    _write_text(S.join(path, "results.csv"), buf.getvalue())
    try:
        best = grid.get_best_result(metric=spec.metric, mode=spec.mode, scope="last")
    except RuntimeError:
        best = None
    if best is None or not best.metrics or spec.metric not in best.metrics:
        return out
    values = {k: _plain(best.config[k]) for k in spec.space}
    out.update(best_values=values, best_metrics={k: best.metrics.get(k) for k in
                                                 ("accuracy", "loss", "version", "virtual_s", "wall_s")},
               best_path=S.join(path, "best.yaml"))
    _write_text(out["best_path"], best_yaml(spec, values, best.metrics))
    return out
