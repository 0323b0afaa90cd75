"""What this fedray has: ``fedray --version``, ``fedray list KIND`` and ``fedray describe NAME``.

Everything is read from the registries themselves (methods, zoo models, data sets, robust
rules), so a method added to the registry or a user module given with ``--import`` (which may
call ``fedray.methods.registry.register`` / ``fedray.data.register``, or define
:class:`~fedray.methods.base.Method` subclasses used by import path) shows up without an edit
here. A parameter's type, default, check and meaning come from its ``Params`` dataclass field
(:func:`fedray.params._f`): the same metadata that validates ``method.<name>`` in a config.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import typing
from pathlib import Path

from fedray.errors import ConfigError

__all__ = ["KINDS", "version", "plain", "entries", "list_text", "describe", "glossary_path"]

KINDS = ("methods", "models", "datasets", "defenses")

# what each zoo model is (its options come from fedray.models.zoo.OPTIONS)
_MODEL_TEXT = {
    "mlp": "Flatten, Linear + ReLU per hidden size, output Linear (any input)",
    "cnn": "conv3x3 + ReLU + maxpool per channel entry, Linear + ReLU per hidden size (image inputs)",
    "leaf_cnn": "LEAF FEMNIST CNN: conv5x5 32, conv5x5 64 (each + ReLU + maxpool), Linear 2048, output (image inputs)",
    "vgg11": "VGG-11, CIFAR configuration, optional batch norm (image inputs; under 32x32, e.g. 28x28, "
             "the pools that would leave less than 1x1 are skipped)",
    "resnet18": "ResNet-18, CIFAR variant (3x3 stem, no max-pool; image inputs)",
}
# the robust rule behind each defense.rule name (fedray.aggregation.robust), "mean": none
_RULE_FUNCS = {"median": "coordinate_median", "trimmed_mean": "trimmed_mean", "krum": "krum_scores",
               "multi_krum": "multi_krum", "geometric_median": "geometric_median",
               "centered_clipping": "centered_clipping"}
_RULE_PARAMS = {"trimmed_mean": "beta", "krum": "f", "multi_krum": "f, m", "geometric_median": "nu, iters",
                "centered_clipping": "tau, iters"}


def version() -> str:
    """The installed distribution's version (``pyproject.toml``'s, for a source checkout)."""
    from importlib import metadata

    try:
        return metadata.version("fedray")
    except metadata.PackageNotFoundError:
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
        return re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)


_ROLE = re.compile(r":(?:mod|func|class|meth|data|attr|exc):`~?([^`]+)`")


def plain(text: str) -> str:
    """reStructuredText roles and literals as plain text: ``:func:`~a.b``` -> ``b``, ````x```` -> ``x``."""
    text = _ROLE.sub(lambda m: m.group(1), text)
    return text.replace("``", "")


def _first_line(obj, sentence: bool = False) -> str:
    """The first paragraph of ``obj``'s own docstring as one plain line (its first sentence)."""
    doc = obj.__doc__ or ""
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and doc.startswith(obj.__name__ + "("):
        return ""  # the signature dataclasses writes for a class without a docstring
    text = plain(" ".join(inspect.cleandoc(doc).split("\n\n")[0].split()))
    if sentence and ". " in text:
        text = text.split(". ")[0] + "."
    return text


def glossary_path() -> Path:
    """``docs/metrics.md``, the glossary of every metric fedray reports."""
    return Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


# ---------------------------------------------------------------- lists


def _import_modules(modules) -> list:
    from fedray import plugins

    out = []
    for name in modules or ():
        plugins._ensure_cwd_on_path()  # a module next to the config imports, as for a run
        try:
            out.append(importlib.import_module(name))
        except Exception as e:
            raise ConfigError("--import", f"cannot import {name!r}: {type(e).__name__}: {e}") from None
    return out


def _user_methods(modules) -> list[tuple[str, object]]:
    from fedray.methods.base import Method

    found = []
    for mod in modules:
        for attr, obj in sorted(vars(mod).items()):
            if (isinstance(obj, type) and issubclass(obj, Method) and obj is not Method
                    and obj.__module__ == mod.__name__):
                found.append((f"{mod.__name__}:{attr}", obj))
    return found


def entries(kind: str, imports=()) -> list[tuple[str, str]]:
    """(name, one-line description) of every ``kind`` (one of :data:`KINDS`), sorted by name;
    ``imports``: user modules imported first (their registrations and Method classes count)."""
    if kind not in KINDS:
        raise ConfigError("list", f"unknown kind {kind!r}; choose from: {', '.join(KINDS)}")
    modules = _import_modules(imports)
    if kind == "methods":
        from fedray.methods import registry

        rows = [(n, registry.get(n)) for n in registry.names()]
        rows += [(n, c) for n, c in _user_methods(modules) if c not in dict(rows).values()]
        return [(n, f"{c.schedule:8s} {_first_line(c, True)}") for n, c in rows]
    if kind == "models":
        from fedray.models.zoo import MODELS, OPTIONS

        return [(n, f"{_MODEL_TEXT.get(n, _first_line(MODELS[n]))}; model.options: "
                    f"{', '.join(OPTIONS.get(n, ()) + ('widths', 'width_ratio'))}") for n in sorted(MODELS)]
    if kind == "datasets":
        from fedray.data.datasets import DATASETS

        return [(n, _first_line(e.loader, True) + (" (reads data.root)" if e.needs_root else ""))
                for n, e in sorted(DATASETS.items())]
    from fedray.aggregation import robust
    from fedray.security import RULES

    out = []
    for rule in RULES:
        if rule == "mean":
            out.append((rule, "the method's own mean (no robust rule; the default)"))
            continue
        extra = f" [defense.{_RULE_PARAMS[rule]}]" if rule in _RULE_PARAMS else ""
        out.append((rule, _first_line(getattr(robust, _RULE_FUNCS[rule]), True) + extra))
    return out


def list_text(kind: str, imports=()) -> str:
    rows = entries(kind, imports)
    width = max(len(n) for n, _ in rows)
    lines = [f"{n:<{width}}  {d}" for n, d in rows]
    tail = {"methods": "parameters: fedray describe METHOD; your own: method.name: 'package.module:Class'",
            "models": "your own: model.name: 'package.module:Net' (called as Net(input_shape, num_outputs, "
                      "**model.options))",
            "datasets": "your own: data.name: 'package.module:load'",
            "defenses": "set defense.rule (and defense.clip, defense.norm_guard): fedray describe defense"}[kind]
    return "\n".join(lines + ["", tail]) + "\n"


# ---------------------------------------------------------------- describe


def _type_text(tp) -> str:
    if tp is type(None):
        return "null"
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(map(repr, args))
    if args and origin is not None and origin not in (tuple, list, dict):
        return " | ".join(_type_text(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_text(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def _default_text(f) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        return "(required)"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if dataclasses.is_dataclass(v):
        return "(section)"
    return repr(v) if isinstance(v, str) else str(v)


def fields_text(cls, prefix: str) -> list[str]:
    """One line per field of dataclass ``cls``: ``prefix.name  type  default=..  [check]  meaning``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        meta = f.metadata or {}
        rule = ""
        if meta.get("choices"):
            rule = "one of " + ", ".join(map(str, meta["choices"]))
        elif meta.get("check"):
            rule = str(meta["check"][1])
        rows.append((f"{prefix}.{f.name}", _type_text(hints[f.name]), f"default {_default_text(f)}", rule,
                     plain(meta.get("doc") or "")))
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    out = []
    for r in rows:
        out.append("  " + "  ".join(f"{c:<{w}}" for c, w in zip(r[:3], widths)) + (f"  ({r[3]})" if r[3] else ""))
        if r[4]:
            out.append("      " + r[4])
    return out


def _sections() -> dict:
    from fedray.config import ExperimentConfig

    hints = typing.get_type_hints(ExperimentConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(ExperimentConfig)
            if dataclasses.is_dataclass(hints[f.name]) and f.name != "method"}


def _devices_hint() -> list[str]:
    from fedray.devices.profile import POPULATIONS, TIER_PRESETS

    return ["", f"tier presets (devices.tiers): {', '.join(TIER_PRESETS)}",
            "named populations (devices.population; they set tiers, links and compute):",
            *(f"  {n}: {_first_line(f, True)}" for n, f in POPULATIONS.items())]


def describe(name: str) -> str:
    """A method's parameters (types, defaults, checks, meaning), schedule and paper; or the fields
    of a config section (``describe train``, ``describe defense``)."""
    from fedray.methods import registry

    sections = _sections()
    if name in sections:
        cls = sections[name]
        head = f"{name}: a section of the config" + (f" ({_first_line(cls)})" if _first_line(cls) else "")
        hint = {"model": ["", "models and their options: fedray list models"],
                "data": ["", "data sets: fedray list datasets"],
                "defense": ["", "robust rules: fedray list defenses"],
                "devices": _devices_hint()}.get(name, [])
        return "\n".join([head, f"fields (set with --set {name}.FIELD=VALUE):", *fields_text(cls, name), *hint]) + "\n"
    try:
        cls = registry.get(name)
    except ConfigError as e:
        raise ConfigError("describe", f"{e.message}; or a config section: {', '.join(sections)}") from None
    module = inspect.getmodule(cls)
    source = getattr(module, "__file__", None)
    params = fields_text(cls.Params, "method")
    lines = [f"{name}: {_first_line(cls)}",
             f"paper: {plain(getattr(cls, 'paper', '') or 'none given')}",
             f"schedule: {cls.schedule}" + ("  (needs the model's layer structure: zoo models)"
                                            if getattr(cls, "needs_spec", False) else ""), ""]
    if params:
        lines += [f"parameters (set with --set method.NAME=VALUE or under method: in the config):", *params]
    else:
        lines += [f"parameters: none of its own (local training is the train: section: fedray describe train)"]
    if source and (module.__doc__ or "").strip():
        where = Path(source)
        try:
            where = where.resolve().relative_to(Path(__file__).resolve().parent.parent)
        except ValueError:
            pass
        lines += ["", f"how we read the paper, and our choices where it is ambiguous: {where} (module docstring)"]
    return "\n".join(lines) + "\n"
