"""Configuration: YAML -> frozen dataclasses, validated, with dotted-path errors.

Configuration flows one way: ``load(path, overrides)`` reads YAML, applies
``--set a.b=value`` overrides, and builds an :class:`ExperimentConfig`. Every
mistake raises :class:`fedray.errors.ConfigError` naming the field path, e.g.
``config error: data.partition.alpha: must be > 0, got -1``. No other module
reads YAML or environment variables on its own.

Method-specific parameters live under ``method:`` next to ``name`` and are
validated against the method's own ``Params`` dataclass (see
:mod:`fedray.methods`), so ``method.rho`` is a field path like any other.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from fedray import config_hints, runs
from fedray.errors import ConfigError
from fedray.params import FRACTION, NONNEG, POS, UNIT, UNIT_POS, _f, build  # noqa: F401 (field helpers)
from fedray.security import AttackConfig, DefenseConfig, PrivacyConfig

# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class PartitionConfig:
    kind: str = _f("iid", choices=("iid", "dirichlet", "shards", "classes", "natural"))
    alpha: float = _f(0.5, check=POS, doc="Dirichlet concentration")
    classes_per_client: int = _f(2, check=POS, doc="shards: at most, classes: exactly this many classes per client")
    min_size: int = _f(1, check=NONNEG, doc="dirichlet: minimum examples per client")


@dataclass(frozen=True)
class DataConfig:
    name: str = _f("digits", doc="a registered data set or an import path 'package.module:load'")
    root: str | None = _f(None, doc="local folder for cifar/fashion_mnist/emnist/femnist")
    download: bool = _f(False, doc="let torchvision download into root")
    test_fraction: float = _f(0.2, check=FRACTION)
    num_clients: int = _f(100, check=POS)
    partition: PartitionConfig = _f(factory=PartitionConfig)
    cache_dir: str = ".fedray_cache"
    options: dict = _f(factory=dict, doc="loader options (synthetic alpha/beta, emnist split...)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("mlp", doc="a zoo model or an import path 'package.module:Net'")
    options: dict = _f(factory=dict, doc="builder options (hidden sizes, channels, batch_norm...)")


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = _f(1, check=NONNEG)
    local_steps: int | None = _f(None, check=POS, doc="if set, overrides local_epochs")
    batch_size: int = _f(16, check=POS)
    optimizer: str = _f("sgd", choices=("sgd", "adam"))
    lr: float = _f(0.05, check=POS)
    momentum: float = _f(0.0, check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    weight_decay: float = _f(0.0, check=NONNEG)
    vectorise: int = _f(16, check=POS, doc="dispatches d // vectorise of a sync round train together (torch.func, "
                        "where they can; CPU: models <= 6 MFLOP/example; 1: one by one; equal within float rounding)")


@dataclass(frozen=True)
class ServerConfig:
    rounds: int = _f(100, check=POS, doc="aggregations (rounds for sync methods)")
    clients_per_round: int = _f(10, check=POS)
    eval_every: int = _f(1, check=POS)
    target_accuracy: float | None = _f(None, check=UNIT_POS, doc="target of the task's primary metric (time to target)")
    max_virtual_s: float | None = _f(None, check=POS, doc="stop after this virtual time")
    stop_at_target: bool = _f(False, doc="end at the first evaluation that reaches target_accuracy (final = at target)")
    client_eval_every: int = _f(0, check=NONNEG, doc="evaluate the model on every client's own data every this "
                                "many aggregations (per-client spread; 0: never)")
    client_eval_clients: int | None = _f(None, check=POS, doc="clients in each per-client evaluation (null: all; "
                                         "else a seeded sample)")
    max_rejected_rounds: int = _f(5, check=NONNEG, doc="stop when every update of this many consecutive "
                                  "aggregations was rejected (0: never)")
    max_examples_weight: float | None = _f(None, check=POS, doc="cap on an update's example-count weight")
    target_epsilon: float | None = _f(None, check=POS, doc="DP: stop before the privacy loss passes this epsilon")


@dataclass(frozen=True)
class TaskConfig:
    name: str = _f("classification", doc="classification, regression or an import path 'package.module:Task'")
    options: dict = _f(factory=dict, doc="the task's constructor arguments")


@dataclass(frozen=True)
class ClientActorConfig:
    num_cpus: float = _f(1.0, check=NONNEG)
    num_gpus: float = _f(0.0, check=NONNEG)
    memory_mb: float | None = _f(None, check=POS)
    resources: dict = _f(factory=dict)


@dataclass(frozen=True)
class ClientActorsConfig:
    """An elastic pool: start with ``min`` client actors running, grow to ``max`` as room appears."""

    min: int = _f(1, check=POS, doc="client actors that must run before the run starts")
    max: int = _f(2, check=POS, doc="client actors the pool grows to when nodes join")


@dataclass(frozen=True)
class ClusterConfig:
    address: str | None = _f(None, doc="Ray address; None starts Ray embedded")
    num_client_actors: int = _f(2, check=NONNEG, doc="client actors (a fixed pool); 0: the aggregator trains (sync)")
    client_actors: ClientActorsConfig | None = _f(None, doc="an elastic pool {min, max} instead of a fixed one")
    actor_wait_s: float = _f(300.0, check=POS, doc="seconds to wait for client actors to run (start, replacements)")
    client_actor: ClientActorConfig = _f(factory=ClientActorConfig)
    aggregator_cpus: float = _f(0.0, check=NONNEG)
    torch_threads: int = _f(1, check=POS)
    num_cpus: int | None = _f(None, check=POS, doc="CPUs of an embedded Ray (default: all)")
    max_restarts: int = _f(3, check=(lambda v: v >= -1, ">= -1"), doc="Ray restarts of a crashed client actor (-1: always)")
    max_aggregator_restarts: int = _f(3, check=NONNEG, doc="times a lost aggregator is restored from the last "
                                      "checkpoint before the run fails")
    max_task_retries: int = _f(2, check=(lambda v: v >= -1, ">= -1"), doc="retries of a training call lost with its actor")
    rounds_per_call: int = _f(32, check=POS, doc="at most this many synchronous rounds planned ahead and run back "
                              "to back by the aggregator in one call, sized to about 0.25 s of rounds (methods "
                              "without feedback; results are identical for any value)")


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    out_dir: str = "runs"
    progress: bool = True
    tensorboard: bool = True
    flush_s: float = _f(2.0, check=POS, doc="seconds between writes of the event rows and TensorBoard to disk")
    checkpoint_every: int = _f(50, check=NONNEG, doc="aggregations between checkpoints (0: only when interrupted)")
    checkpoint_dir: str | None = _f(None, doc="where checkpoints go: a path or a pyarrow.fs URI "
                                    "(default: <run folder>/checkpoint)")


@dataclass(frozen=True)
class DevicesConfig:
    """Device population (see :mod:`fedray.devices.profile`) and how it is simulated.

    ``tiers``: a preset name (``homogeneous``, ``clamp``) or a list of tiers
    (``name, fraction, speed_range, download_bps_range, ...``); ``population``: a named one.
    """

    tiers: Any = "homogeneous"
    population: str | None = _f(None, doc="a named device population (prfl_paper) instead of tiers and links")
    reference_flops: float = _f(2e9, check=POS, doc="FLOP/s of a 1.0x device")
    link: str = _f("fixed", choices=("fixed", "lognormal"))
    bw_sigma: float = _f(0.3, check=NONNEG)
    link_means: str = _f("tier", choices=("tier", "linear", "random"))
    download_bps_range: tuple[float, ...] = _f((20e6, 1.5e6), check=POS)
    upload_bps_range: tuple[float, ...] = _f((5e6, 0.4e6), check=POS)
    cpu_load: float = _f(0.0, check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    load_sigma: float = _f(0.0, check=NONNEG)
    dropout_prob: float = _f(0.0, check=UNIT)
    availability: float = _f(1.0, check=UNIT)
    availability_cycle_s: float = _f(3600.0, check=POS)
    trace_path: str | None = None
    noise_sigma: float = _f(0.0, check=NONNEG, doc="extra log-normal jitter of durations")
    shared_server_bps: float | None = _f(None, check=POS)
    low_battery: float = _f(0.05, check=UNIT, doc="below this battery level a device is unavailable")
    mode: str = _f("simulated", choices=("simulated", "real"))
    placement: str = _f("none", choices=("none", "pack", "spread", "strict_pack", "strict_spread"))
    actor_per_tier: bool = _f(False, doc="one client actor per tier, with the tier's resources")


@dataclass(frozen=True)
class MethodConfig:
    name: str = "fedavg"
    params: Any = None  # the method's own frozen Params dataclass, filled by load()


@dataclass(frozen=True)
class ExperimentConfig:
    experiment: str = "default"
    seed: int = _f(0, check=NONNEG)
    method: MethodConfig = _f(factory=MethodConfig)
    data: DataConfig = _f(factory=DataConfig)
    model: ModelConfig = _f(factory=ModelConfig)
    task: TaskConfig = _f(factory=TaskConfig)
    train: TrainConfig = _f(factory=TrainConfig)
    server: ServerConfig = _f(factory=ServerConfig)
    devices: DevicesConfig = _f(factory=DevicesConfig)
    cluster: ClusterConfig = _f(factory=ClusterConfig)
    runtime: RuntimeConfig = _f(factory=RuntimeConfig)
    defense: DefenseConfig = _f(factory=DefenseConfig)
    attack: AttackConfig = _f(factory=AttackConfig)
    privacy: PrivacyConfig = _f(factory=PrivacyConfig)

    @property
    def run_name(self) -> str:  # <method>-s<seed>-<config hash> (fedray.runs)
        return runs.folder_name(self.method.name, self.seed, runs.config_hash(to_dict(self)))

    @property
    def run_dir(self) -> Path:
        return Path(self.runtime.out_dir) / self.experiment / self.run_name


# ---------------------------------------------------------------- building


def to_dict(obj) -> Any:
    """Plain YAML-able structure of a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(obj, MethodConfig) and f.name == "params":
                out.update(to_dict(v) if v is not None else {})
            else:
                out[f.name] = to_dict(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(text, "override must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(text, "override must look like key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_path(data: dict, dotted: str, value) -> None:
    node = data
    parts = dotted.split(".")
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is not a mapping, cannot set {dotted}")
        node = nxt
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", f"file '{p}' does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError("config", f"'{p}' is not UTF-8 text (is it a YAML file?)") from None
    except OSError as e:
        raise ConfigError("config", f"cannot read '{p}': {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("config", f"'{p}' is not valid YAML{where}") from None
    if data is None:
        raise ConfigError("config", f"'{p}' is empty (give at least one section, e.g. method: fedavg)")
    if not isinstance(data, dict):
        raise ConfigError("config", f"'{p}' must hold a mapping at the top level")
    return data


def from_dict(data: Mapping, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Validate a raw mapping (plus ``key=value`` overrides) into an ExperimentConfig."""
    raw, data, pairs = data, copy.deepcopy(dict(data)), [parse_override(t) for t in overrides]
    for key, value in pairs:
        set_path(data, key, value)
    config_hints.drop_foreign_model_options(raw.get("model"), data, [k for k, _ in pairs])
    method_raw = data.get("method", {}) or {}
    if isinstance(method_raw, str):
        method_raw = {"name": method_raw}
    if not isinstance(method_raw, Mapping):
        raise ConfigError("method", f"must be a mapping or a method name, got {method_raw!r}")
    data["method"] = {"name": method_raw.get("name", "fedavg")}
    cfg = build(ExperimentConfig, data)
    cfg = dataclasses.replace(cfg, method=_build_method(method_raw))
    _check_cross(cfg)
    return cfg


def _build_method(raw: Mapping) -> MethodConfig:
    from fedray.methods import registry

    name = raw.get("name", "fedavg")
    if not isinstance(name, str):
        raise ConfigError("method.name", f"must be a string, got {name!r}")
    spec = registry.get(name)
    params = {k: v for k, v in raw.items() if k != "name"}
    return MethodConfig(name=name, params=config_hints.method_params(spec, name, params))


def _check_cross(cfg: ExperimentConfig) -> None:
    """Checks that involve several fields or the registries."""
    from fedray import plugins
    from fedray.data.datasets import DATASETS, needs_root
    from fedray.models.zoo import MODELS
    from fedray import security
    from fedray.tasks import get_task

    if plugins.is_import_path(cfg.data.name):
        plugins.load_object(cfg.data.name, "data.name", kind="data set")
    elif cfg.data.name not in DATASETS:
        raise ConfigError("data.name", f"unknown data set {cfg.data.name!r}; choose from: {', '.join(sorted(DATASETS))} "
                                       "or an import path 'package.module:load'")
    if plugins.is_import_path(cfg.model.name):
        plugins.load_object(cfg.model.name, "model.name", kind="model")
    elif cfg.model.name not in MODELS:
        raise ConfigError("model.name", f"unknown model {cfg.model.name!r}; choose from: {', '.join(sorted(MODELS))} "
                                        "or an import path 'package.module:Net'")
    get_task(cfg.task.name, cfg.task.options)
    if not plugins.is_import_path(cfg.data.name) and needs_root(cfg.data.name):
        if cfg.data.root is None:
            raise ConfigError("data.root", f"data set {cfg.data.name!r} reads a local folder; set data.root")
        if not cfg.data.download and not Path(cfg.data.root).is_dir():
            raise ConfigError("data.root", f"folder '{cfg.data.root}' does not exist")
    if cfg.server.clients_per_round > cfg.data.num_clients:
        raise ConfigError("server.clients_per_round",
                          f"must be <= data.num_clients ({cfg.data.num_clients}), got {cfg.server.clients_per_round}")
    if cfg.server.stop_at_target and cfg.server.target_accuracy is None:
        raise ConfigError("server.stop_at_target", "needs server.target_accuracy")
    if cfg.data.partition.kind == "natural" and cfg.data.name in DATASETS and cfg.data.name not in ("femnist", "synthetic"):
        raise ConfigError("data.partition.kind", f"'natural' needs a data set with writers (femnist, synthetic), not {cfg.data.name!r}")
    if cfg.devices.trace_path is not None and not Path(cfg.devices.trace_path).is_file():
        raise ConfigError("devices.trace_path", f"file '{cfg.devices.trace_path}' does not exist")
    from fedray.devices.population import population

    population(cfg.devices, cfg.data.num_clients)  # validates tiers and ranges with field paths
    ca = cfg.cluster.client_actors
    if ca is not None:
        if ca.min > ca.max:
            raise ConfigError("cluster.client_actors.min", f"must be <= max ({ca.max}), got {ca.min}")
        if cfg.devices.placement != "none":
            raise ConfigError("cluster.client_actors", "an elastic pool cannot use a placement group "
                                                       "(devices.placement must be none)")
    if cfg.train.local_epochs == 0 and cfg.train.local_steps is None:
        raise ConfigError("train.local_epochs", "must be > 0 unless train.local_steps is set")
    security.check(cfg)


TOOL_SECTIONS = ("compare", "tune")


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config file (or defaults when ``path`` is None) and validate it for one run.

    The ``compare:`` and ``tune:`` sections belong to ``fedray compare`` / ``fedray tune``
    and are set aside here; a comparison file without a ``method:`` runs its first method.
    """
    data = read_yaml(path) if path is not None else {}
    tools = {k: data.pop(k) for k in TOOL_SECTIONS if k in data}
    methods = (tools.get("compare") or {}).get("methods") if isinstance(tools.get("compare"), Mapping) else None
    if "method" not in data and isinstance(methods, list) and methods:
        first = methods[0]
        data["method"] = ({k: v for k, v in first.items() if k != "label"} if isinstance(first, Mapping)
                          else {"name": first})
    return from_dict(data, [o for o in overrides if o.split("=", 1)[0].split(".")[0] not in TOOL_SECTIONS])


def read_sections(path: str | Path, overrides, section: str, known: tuple[str, ...], what: str) -> tuple[dict, Mapping]:
    """Read a YAML file, apply ``key=value`` overrides to all of it, and pop ``section``.

    Returns (base mapping, the section). The section must exist, be a mapping and use only
    ``known`` keys (``what`` names them in the error). A string ``method`` is normalised to
    ``{name: ...}`` so ``method.x`` paths can be set.
    """
    raw = read_yaml(path)
    before, pairs = copy.deepcopy(raw.get("model")), [parse_override(t) for t in overrides]
    for key, value in pairs:
        set_path(raw, key, value)
    config_hints.drop_foreign_model_options(before, raw, [k for k, _ in pairs])
    sec = raw.pop(section, None)
    if sec is None:
        raise ConfigError(section, f"'{path}' has no {section}: section ({what})")
    if not isinstance(sec, Mapping):
        raise ConfigError(section, f"must be a mapping ({what}), got {sec!r}")
    for k in sec:
        if k not in known:
            raise ConfigError(f"{section}.{k}", f"unknown key (known: {', '.join(known)})")
    if isinstance(raw.get("method"), str):
        raw["method"] = {"name": raw["method"]}
    return raw, sec


def dump(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
