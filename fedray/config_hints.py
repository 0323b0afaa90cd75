"""Friendlier config messages, and what a command-line override implies beyond the key it sets.

- ``method.<key>`` that the method does not take names the method, its parameters (or that it
  has none) and ``fedray describe <method>``, where the meaning of each is.
- ``--set model.name=X`` over a config file whose ``model.options`` belong to another model
  drops the options X does not take, with a note (the quickstart's ``hidden`` does not make
  ``--set model.name=vgg11`` fail).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Mapping

from fedray.errors import ConfigError
from fedray.params import build

__all__ = ["method_params", "drop_foreign_model_options"]

log = logging.getLogger("fedray")


def method_params(spec, name: str, params: Mapping):
    """``spec.Params`` built from ``params`` (the ``method:`` section without ``name``)."""
    try:
        return build(spec.Params, params, "method")
    except ConfigError as e:
        if not e.message.startswith("unknown key"):
            raise
        known = sorted(f.name for f in dataclasses.fields(spec.Params))
        own = f"takes: {', '.join(known)}" if known else "has no parameters of its own"
        raise ConfigError(e.field, f"unknown key: method {name!r} {own} (fedray describe {name})") from None


def drop_foreign_model_options(before, data: dict, keys: list[str]) -> None:
    """``--set model.name=X`` over a file whose ``model.options`` were written for another model:
    the options model X does not take are dropped, with a one-line note on stderr (the
    overrides that set ``model.options`` themselves, or all of ``model``, are left alone)."""
    if "model.name" not in keys or any(k in ("model", "model.options") for k in keys):
        return
    if not isinstance(before, Mapping) or not isinstance(before.get("options"), Mapping) or not before["options"]:
        return
    old, new = before.get("name", "mlp"), data["model"].get("name")
    if new == old or not isinstance(new, str):
        return
    from fedray import plugins
    from fedray.models.zoo import _COMMON_OPTIONS, OPTIONS

    takes = () if plugins.is_import_path(new) else OPTIONS.get(new, ()) + _COMMON_OPTIONS
    mine = {k.split(".")[2] for k in keys if k.startswith("model.options.")}  # set on the command line: kept
    dropped = [k for k in before["options"] if k not in takes and k not in mine]
    if dropped:
        data["model"]["options"] = {k: v for k, v in data["model"]["options"].items() if k not in dropped}
        log.warning(
            f"note: model.name={new} on the command line: dropped the config file's "
            f"{', '.join('model.options.' + k for k in dropped)} (options of {old!r}); "
            f"set {new}'s own with --set model.options.KEY=VALUE (fedray list models)")
