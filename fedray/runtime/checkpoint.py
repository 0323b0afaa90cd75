"""Checkpoints: a run's whole state, written atomically, read back for an exact resume.

A checkpoint holds everything a run needs to continue as if it had never stopped:

- the aggregator's state (global model, version, buffer of admitted updates, de-duplication
  set, rejection counters, the server algorithm's state, the per-client store);
- the planner's state (PR-FL's FIFOs and densities, CLAMP's controllers, ...);
- the dispatcher's (next dispatch id, the version being planned, batteries and busy devices,
  the shared server link, the download pieces sent this version);
- the scheduler's (virtual clock, round counter, selection draws, and for asynchronous
  schedules the dispatches in flight with the model versions they started from);
- the totals, the run's progress (best score, time to target...) and the recorder's offset
  (how many parts of ``metrics.parquet`` belong to the checkpoint).

Every random draw is derived from (seed, purpose, keys) (:mod:`fedray.seeding`), so the
counters above are the RNG positions. Checkpoints go to ``runtime.checkpoint_dir`` (default:
``<run folder>/checkpoint``), a local path or any ``pyarrow.fs`` URI; a checkpoint is one
pickle written under a temporary name and renamed (object stores: one PUT), so a reader sees
the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from typing import Any, Mapping

from fedray import storage as S

__all__ = ["AggregatorLost", "dumps", "loads", "save", "load", "exists", "config_digest", "of_run", "FILE"]

FILE = "state.pkl"
FORMAT = 1


class AggregatorLost(Exception):
    """The aggregator actor is gone: the run restores a new one from its last checkpoint."""


def config_digest(cfg_dict: Mapping) -> str:
    """A digest of a run's resolved config (the runtime section aside: it may change on resume)."""
    body = {k: v for k, v in cfg_dict.items() if k != "runtime"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dumps(state: Mapping[str, Any]) -> bytes:
    """The checkpoint as bytes (a deep copy of the live state: the run can go on mutating it)."""
    return pickle.dumps({"format": FORMAT, **state}, protocol=pickle.HIGHEST_PROTOCOL)


def loads(blob: bytes) -> dict:
    state = pickle.load(io.BytesIO(blob))
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {state.get('format')!r} is not {FORMAT}")
    return state


def save(where: str, blob: bytes) -> int:
    """Write a checkpoint (:func:`dumps`) to ``where``/state.pkl atomically; returns its size."""
    fs, path = S.resolve(where, "runtime.checkpoint_dir")
    fs.create_dir(path, recursive=True)
    tmp, final = f"{path}/.{FILE}.tmp", f"{path}/{FILE}"
    with fs.open_output_stream(tmp) as f:
        f.write(blob)
    fs.move(tmp, final)
    return len(blob)


def of_run(checkpoint_dir: str | None, run_dir) -> str:
    """Where a run's checkpoints go: ``runtime.checkpoint_dir``, else ``<run folder>/checkpoint``."""
    return checkpoint_dir or str(run_dir / "checkpoint")


def exists(where: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = S.resolve(where, "runtime.checkpoint_dir")
    return fs.get_file_info(f"{path}/{FILE}").type == pafs.FileType.File


def load(where: str) -> dict:
    fs, path = S.resolve(where, "runtime.checkpoint_dir")
    with fs.open_input_stream(f"{path}/{FILE}") as f:
        return loads(f.read())
