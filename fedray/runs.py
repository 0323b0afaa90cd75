"""Run folders: one per config, never overwritten.

A run lives in ``<out_dir>/<experiment>/<label>-s<seed>-<hash>`` where ``label`` is the method
name (its import path's colon a dot) or the ``label`` of a compare entry, and ``hash`` is
:func:`config_hash`: 8 hex digits of the resolved config *without* the fields that cannot change a
result (:data:`IGNORED`) and without the seed (it is in the name already), so the seeds of one
config share a hash and runs that differ in anything else (``--set train.lr=0.1``) do not share a
folder. ``fedray report`` and ``fedray compare`` group runs by that hash.

Running a config again finds its folder (:func:`previous`): a finished run is reported and not
trained again; an interrupted one with a checkpoint is resumed; ``--rerun`` (or a folder that holds
neither: a run that failed or stopped before its first checkpoint) trains a fresh run in the next
free folder ``<name>-r2``, ``<name>-r3``... -- the older folders stay as they are.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Mapping

from fedray.errors import ConfigError

__all__ = ["IGNORED", "config_hash", "folder_name", "parse", "attempts", "previous", "next_free", "load_summary",
           "choose", "choose_for", "place", "make_writable", "drop_empty"]

# fields that do not change a run's numbers: where it writes, how it reports, where Ray runs it,
# how many actors share the work (results are identical for any count) and how failures are retried
IGNORED: dict[str, tuple[str, ...]] = {
    "": ("experiment", "seed"),
    "runtime": ("out_dir", "progress", "tensorboard", "flush_s", "checkpoint_every", "checkpoint_dir"),
    "cluster": ("address", "num_client_actors", "client_actors", "actor_wait_s", "client_actor", "aggregator_cpus",
                "num_cpus", "max_restarts", "max_aggregator_restarts", "max_task_retries", "rounds_per_call"),
}

NAME = re.compile(r"^(?P<label>.+)-s(?P<seed>\d+)(?:-(?P<hash>[0-9a-f]{8}))?(?:-r(?P<rerun>\d+))?$")


def config_hash(cfg_dict: Mapping) -> str:
    """8 hex digits of a resolved config (``config.to_dict`` or a run's ``config.yaml``) without
    the :data:`IGNORED` fields."""
    body = {k: v for k, v in cfg_dict.items() if k not in IGNORED[""]}
    for section, keys in IGNORED.items():
        if section and isinstance(body.get(section), Mapping):
            body[section] = {k: v for k, v in body[section].items() if k not in keys}
    text = json.dumps(body, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def folder_name(label: str, seed: int, digest: str) -> str:
    return f"{label.replace(':', '.')}-s{seed}-{digest}"


def parse(name: str) -> dict | None:
    """``{"label", "seed", "hash" (None for folders of older fedray), "rerun"}`` of a run folder's
    name, or None when the name is not one."""
    m = NAME.match(name)
    if not m:
        return None
    return {"label": m["label"], "seed": int(m["seed"]), "hash": m["hash"], "rerun": int(m["rerun"] or 1)}


def attempts(base: Path) -> list[Path]:
    """The existing folders of a config: ``base``, ``base-r2``, ... in order."""
    found = [(1, base)] if base.is_dir() else []
    for p in base.parent.glob(f"{base.name}-r*") if base.parent.is_dir() else []:
        tail = p.name[len(base.name) + 2:]
        if p.is_dir() and tail.isdigit():
            found.append((int(tail), p))
    return [p for _, p in sorted(found)]


def next_free(base: Path) -> Path:
    """The folder a fresh run of this config goes to: ``base`` if unused, else ``base-r<n+1>``."""
    used = attempts(base)
    if not used:
        return base
    last = used[-1]
    if not (last / "config.yaml").exists() and not (last / "summary.json").exists():
        return last  # a run that stopped before it started (a mistake in its data, say) left it empty
    n = 1 if last == base else int(last.name[len(base.name) + 2:])
    return base.with_name(f"{base.name}-r{n + 1}")


def load_summary(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def previous(base: Path, checkpoint_exists) -> tuple[str, Path | None, dict | None]:
    """What the latest folder of a config holds: ``("completed", folder, summary)``, ``("resumable",
    folder, summary or None)`` (interrupted, with a checkpoint: ``checkpoint_exists(folder)``), or
    ``("none", None, None)`` (no folder, or one a fresh run cannot continue)."""
    used = attempts(base)
    if not used:
        return "none", None, None
    last = used[-1]
    s = load_summary(last)
    if s is not None and s.get("status") == "completed":
        return "completed", last, s
    if (s is None or s.get("status") == "interrupted") and checkpoint_exists(last):
        return "resumable", last, s
    return "none", None, None


def choose(base: Path, rerun: bool, checkpoint_exists) -> tuple[str, Path, dict | None]:
    """Where a run of the config whose first folder is ``base`` goes: ``("completed", folder,
    summary)`` (done already: nothing to train), ``("resume", folder, summary)`` or ``("fresh",
    folder, None)``; ``rerun`` always gives a fresh folder."""
    if not rerun:
        state, folder, summary = previous(base, checkpoint_exists)
        if state == "completed":
            return "completed", folder, summary
        if state == "resumable":
            return "resume", folder, summary
    return "fresh", next_free(base), None


def choose_for(cfg, rerun: bool, base: Path | None = None) -> tuple[str, Path, dict | None]:
    """:func:`choose` for a run of ``cfg`` whose first folder is ``base`` (default ``cfg.run_dir``),
    its checkpoints where ``cfg`` puts them."""
    from fedray.runtime import checkpoint

    return choose(base or cfg.run_dir, rerun, lambda f: checkpoint.exists(
        checkpoint.of_run(cfg.runtime.checkpoint_dir, f)))


def place(cfg, rerun: bool = False) -> tuple[str, Path]:
    """``(action, folder)`` of a run of ``cfg`` (:func:`choose`, with its checkpoint folder), with
    one line saying so when the config has a completed run (``"completed"``: stdout) or an
    interrupted one (``"resume"``: stderr). What ``fedray run`` and ``fedray.run`` do."""
    import sys

    action, folder, s = choose_for(cfg, rerun)
    if action == "completed":
        m = s.get("metric", "accuracy")
        got = s.get(f"final_{m}")
        res = f"final {m} {got:.4f}" if isinstance(got, (int, float)) else "completed"
        print(f"already run: {folder} holds a completed run of this config ({res}, {s.get('rounds')} rounds); "
              "not training again (--rerun: train it again in a new folder)")
    if action == "resume":
        print(f"resuming the interrupted run of this config in {folder} (--rerun: start afresh in a new folder)",
              file=sys.stderr)
    return action, folder


def make_writable(run_dir: Path) -> list[Path]:
    """Make the run folder and check it can be written (a :class:`ConfigError` on
    ``runtime.out_dir`` when not); returns the folders this made, innermost first, for
    :func:`drop_empty`."""
    run_dir = Path(run_dir)
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".fedray-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConfigError("runtime.out_dir", f"cannot write the run folder '{run_dir}': {why}") from None
    return made


def drop_empty(made) -> None:
    """Remove the folders :func:`make_writable` made, innermost first, while they are empty (a run
    that failed to start, e.g. on a model option only the model's builder checks, leaves none)."""
    for p in made:
        try:
            p.rmdir()
        except OSError:
            return
