"""Copy result folders to a storage location: a local path or any ``pyarrow.fs`` URI.

A *storage* string is either a local path (relative paths are taken from the
current directory) or a URI that :meth:`pyarrow.fs.FileSystem.from_uri`
understands (``file:///abs``, ``s3://bucket/prefix``, ``gs://...``,
``hdfs://...``), the same convention as Ray Tune's ``storage_path``.

Layout convention: a storage location mirrors ``runtime.out_dir``, so a run
folder ``runs/<experiment>/<run>`` is stored at ``<storage>/<experiment>/<run>``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow.fs as pafs

from fedray.errors import ConfigError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray in the driver of every Ray job (``ray job submit``, ``fedray submit``)."""
JOB_STORAGE = "~/fedray-runs"
"""Where a run inside a Ray job without ``--storage`` or ``--out`` is stored, on the node running the
job: the job's working directory is a temporary folder that Ray deletes, so ``runs/`` there would be lost."""


def is_uri(storage: str) -> bool:
    """True for ``scheme://...`` strings, False for plain local paths."""
    return bool(_SCHEME.match(storage))


def join(storage: str, *parts: str) -> str:
    """Append path parts to a storage string (URI or path) with ``/``."""
    out = storage.rstrip("/") if is_uri(storage) and not storage.endswith("://") else storage
    for p in parts:
        p = str(p).strip("/")
        if not p:
            continue
        out = f"{out}/{p}" if is_uri(out) else str(Path(out) / p)
    return out


def normalize(storage: str, field: str = "--storage") -> str:
    """A local path becomes absolute; a URI is checked to be understood by pyarrow."""
    if not storage:
        raise ConfigError(field, "must not be empty")
    if is_uri(storage):
        resolve(storage, field)
        return storage
    return str(Path(storage).expanduser().resolve())


def resolve(storage: str, field: str = "--storage") -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a storage string; a bad URI is one ConfigError line."""
    if not is_uri(storage):
        return pafs.LocalFileSystem(), str(Path(storage).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(storage)
    except Exception as e:  # ArrowInvalid (unknown scheme), missing credentials, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(field, f"cannot use storage {storage!r}: {first}") from None
    return fs, path


def copy_dir(src: str | Path, dest: str, field: str = "--storage") -> str:
    """Recursively copy local folder ``src`` to storage location ``dest`` (created).

    Returns ``dest``. Copying a folder onto itself (same local path) is a no-op.
    """
    src = Path(src).resolve()
    if not src.is_dir():
        raise ConfigError(field, f"folder '{src}' to copy does not exist")
    fs, path = resolve(dest, field)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.realpath(path) == str(src):
        return dest
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(src), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return dest


def tail(storage: str, n: int) -> str:
    """The last ``n`` parts of a storage string's path, as a relative local path."""
    parts = [p for p in (storage.split("://", 1)[-1] if is_uri(storage) else storage).split("/") if p]
    return str(Path(*parts[-n:]))


def fetch_dir(src: str, dest: str | Path, field: str = "--storage") -> Path:
    """Copy storage folder ``src`` (URI or path) to local folder ``dest`` (created); returns it."""
    fs, path = resolve(src, field)
    if fs.get_file_info(f"{path}/config.yaml").type == pafs.FileType.NotFound:
        raise ConfigError(field, f"'{src}' is not a stored run folder (no config.yaml)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def store_run(run_dir: str | Path, storage: str) -> str:
    """Copy ``runs/<experiment>/<run>`` to ``<storage>/<experiment>/<run>``; returns the destination."""
    run_dir = Path(run_dir)
    return copy_dir(run_dir, join(storage, run_dir.parent.name, run_dir.name))


def store_experiment(exp_dir: str | Path, storage: str) -> str:
    """Copy ``runs/<experiment>`` to ``<storage>/<experiment>``; returns the destination."""
    exp_dir = Path(exp_dir)
    return copy_dir(exp_dir, join(storage, exp_dir.name))
