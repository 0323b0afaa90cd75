"""Split a training set across clients: index arrays, seeded, cached as Parquet.

:func:`partition` returns ``list[np.ndarray]``: one sorted ``int64`` array of training
example indices per client (client id = list position); a run holds it as
:class:`Partitions` (one index array and per-client offsets, CSR). Partitions are
disjoint. ``iid``, ``dirichlet``, ``shards`` and ``classes`` cover every index; ``natural``
covers every example whose writer is assigned (all of them).

Every random draw uses ``np.random.default_rng([seed, PURPOSE])`` with a fixed
per-kind constant, so the same (labels, kind, parameters, seed) always gives
the same partition. Mistakes raise :class:`~fedray.errors.ConfigError` naming
the config field (``data.num_clients``, ``data.partition.*``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedray.errors import ConfigError, DataError

KINDS = ("iid", "dirichlet", "shards", "classes", "natural")

_PURPOSE = {"iid": 0x11D, "dirichlet": 0xD1C, "shards": 0x5A4D, "classes": 0xC1A5, "natural": 0x4A7}
_MAX_DIRICHLET_ATTEMPTS = 1000


class Partitions(Sequence):
    """A partition as one index array and offsets: client ``c`` holds
    ``index[offsets[c]:offsets[c + 1]]`` (``index=None``: the examples ``offsets[c]`` up to
    ``offsets[c + 1]``, for data stored client-major). Sixteen bytes per client plus eight per
    example, instead of an array object per client."""

    def __init__(self, offsets: np.ndarray, index: np.ndarray | None = None):
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.index = None if index is None else np.asarray(index, dtype=np.int64)

    @classmethod
    def from_list(cls, parts) -> "Partitions":
        if isinstance(parts, Partitions):
            return parts
        sizes = np.fromiter((len(p) for p in parts), np.int64, len(parts))
        index = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if len(parts) else np.empty(0, np.int64)
        return cls(np.concatenate([[0], np.cumsum(sizes)]), index)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, c):
        if isinstance(c, slice):
            return [self[i] for i in range(*c.indices(len(self)))]
        c = int(c)
        if c < 0:
            c += len(self)
        if not 0 <= c < len(self):
            raise IndexError(f"client {c} out of range ({len(self)} clients)")
        a, b = int(self.offsets[c]), int(self.offsets[c + 1])
        return np.arange(a, b, dtype=np.int64) if self.index is None else self.index[a:b]

    @property
    def sizes(self) -> np.ndarray:
        """Examples per client (computed once)."""
        if getattr(self, "_sizes", None) is None:
            self._sizes = np.diff(self.offsets)
            self._sizes.setflags(write=False)
        return self._sizes


def partition(
    labels: np.ndarray,
    num_clients: int,
    kind: str,
    *,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    writers: np.ndarray | None = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_clients`` parts of kind ``kind``.

    - ``iid``: a seeded permutation cut into ``num_clients`` nearly equal
      parts (sizes differ by at most one).
    - ``dirichlet``: the label-Dirichlet scheme of Hsu et al. (2019) as
      implemented in FedMA / NIID-Bench: for each class, shuffle its examples,
      draw proportions p ~ Dir(alpha * 1_N) over clients, zero the proportion
      of clients that already hold >= n / N examples (so sizes stay bounded),
      renormalise and cut the class at the cumulative proportions. The whole
      draw is repeated until every client holds >= ``min_size`` examples (at
      most 1,000 draws, then ``ConfigError`` on ``data.partition.alpha``).
    - ``shards``: McMahan et al. (2017) label shards: ``num_clients *
      classes_per_client`` shards, each client gets ``classes_per_client``
      of them at random. Our reading: shards never straddle two classes (each
      class is cut into a number of shards proportional to its size, at
      least one), so a client sees at most ``classes_per_client`` classes.
      Needs ``number of classes <= num_clients * classes_per_client <= n``.
    - ``classes``: exactly ``k = classes_per_client`` classes per client (the "#C=k" split
      of NIID-Bench, Li et al. 2022). Our reading, so that every example is used: a seeded
      permutation of the classes is dealt round-robin to the clients first (every class gets
      a holder), then each client draws its remaining classes at random among those it lacks;
      each class's shuffled examples are cut into nearly equal parts, one per holder.
      Needs ``num_classes <= num_clients * k`` and ``k <= num_classes``.
    - ``natural``: one part per writer (``writers[i]`` = writer of example
      i). With fewer clients than writers, the writers are shuffled (seeded)
      and cut into ``num_clients`` contiguous groups of nearly equal writer
      counts; more clients than writers is an error.

    ``min_size`` is the minimum number of examples per client; any kind that
    cannot meet it raises ``ConfigError``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-d, got shape {labels.shape}")
    if kind not in KINDS:
        raise ConfigError("data.partition.kind", f"unknown partition {kind!r}; choose from: {', '.join(KINDS)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError("data.num_clients", f"must be a positive integer, got {num_clients!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ConfigError("data.partition.min_size", f"must be an integer >= 0, got {min_size!r}")
    num_clients, min_size = int(num_clients), int(min_size)
    n = labels.shape[0]
    if kind != "natural" and n < num_clients * min_size:
        raise ConfigError(
            "data.num_clients",
            f"{num_clients} clients x {min_size} examples (data.partition.min_size) need more than "
            f"the {n} training examples",
        )
    rng = np.random.default_rng([int(seed), _PURPOSE[kind]])
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif kind == "dirichlet":
        parts = _dirichlet(labels, num_clients, float(alpha), min_size, rng)
    elif kind == "shards":
        parts = _shards(labels, num_clients, classes_per_client, rng)
    elif kind == "classes":
        parts = _classes(labels, num_clients, classes_per_client, rng)
    else:
        parts = _natural(writers, num_clients, n, rng)
    out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    small = [i for i, p in enumerate(out) if p.size < min_size]
    if small:
        raise ConfigError(
            "data.num_clients",
            f"{kind} partition gives client {small[0]} only {out[small[0]].size} examples "
            f"(data.partition.min_size is {min_size}); use fewer clients",
        )
    return out


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    if not alpha > 0 or not np.isfinite(alpha):
        raise ConfigError("data.partition.alpha", f"must be > 0, got {alpha!r}")
    n = labels.shape[0]
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    cap = n / num_clients
    for _ in range(_MAX_DIRICHLET_ATTEMPTS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * (sizes < cap)
            total = p.sum()
            p = p / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                buckets[client].append(chunk)
                sizes[client] += chunk.size
        if sizes.min() >= min_size:
            return [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]
    raise ConfigError(
        "data.partition.alpha",
        f"{_MAX_DIRICHLET_ATTEMPTS} Dirichlet(alpha={alpha}) draws never gave all {num_clients} clients "
        f">= {min_size} examples; raise alpha, lower data.num_clients or data.partition.min_size",
    )


def _shard_counts(class_sizes: np.ndarray, num_shards: int) -> np.ndarray:
    """Shards per class: proportional to class size, >= 1 and <= class size, summing to ``num_shards``."""
    n = class_sizes.sum()
    counts = np.clip(np.floor(class_sizes * num_shards / n).astype(np.int64), 1, class_sizes)
    while counts.sum() < num_shards:  # give one more to the class with the biggest shards
        room = np.where(counts < class_sizes, class_sizes / counts, -1.0)
        counts[int(np.argmax(room))] += 1
    while counts.sum() > num_shards:  # take one from the class with the smallest shards
        room = np.where(counts > 1, class_sizes / counts, np.inf)
        counts[int(np.argmin(room))] -= 1
    return counts


def _shards(labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    if isinstance(classes_per_client, bool) or not isinstance(classes_per_client, (int, np.integer)) or classes_per_client < 1:
        raise ConfigError("data.partition.classes_per_client", f"must be a positive integer, got {classes_per_client!r}")
    classes, class_sizes = np.unique(labels, return_counts=True)
    num_shards = num_clients * int(classes_per_client)
    if num_shards < classes.size:
        raise ConfigError(
            "data.partition.classes_per_client",
            f"{num_clients} clients x {classes_per_client} shards cannot cover all {classes.size} classes; raise it",
        )
    if num_shards > labels.shape[0]:
        raise ConfigError(
            "data.partition.classes_per_client",
            f"{num_shards} shards are more than the {labels.shape[0]} training examples; lower it or data.num_clients",
        )
    counts = _shard_counts(class_sizes, num_shards)
    shards: list[np.ndarray] = []
    for c, k in zip(classes, counts):
        shards.extend(np.array_split(rng.permutation(np.flatnonzero(labels == c)), int(k)))
    order = rng.permutation(num_shards)
    return [np.concatenate([shards[s] for s in order[i * classes_per_client : (i + 1) * classes_per_client]]) for i in range(num_clients)]


def _classes(labels: np.ndarray, num_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError("data.partition.classes_per_client", f"must be a positive integer, got {k!r}")
    classes, class_sizes = np.unique(labels, return_counts=True)
    n_cls, k = classes.size, int(k)
    if k > n_cls or num_clients * k < n_cls:
        raise ConfigError("data.partition.classes_per_client",
                          f"{num_clients} clients x {k} classes each cannot cover the {n_cls} classes exactly "
                          f"(needs {n_cls} <= clients x k and k <= {n_cls})")
    held = [[] for _ in range(num_clients)]
    for s, c in enumerate(rng.permutation(n_cls)):  # every class first gets one holder
        held[s % num_clients].append(int(c))
    for h in held:  # then each client fills up to k with classes it lacks
        h.extend(int(c) for c in rng.choice(np.setdiff1d(np.arange(n_cls), h), k - len(h), replace=False))
    held_arr = np.array(held, dtype=np.int64)  # (clients, k)
    holders = [np.flatnonzero((held_arr == c).any(axis=1)) for c in range(n_cls)]
    crowded = [c for c in range(n_cls) if len(holders[c]) > class_sizes[c]]
    if crowded:
        raise ConfigError("data.partition.classes_per_client", f"class {classes[crowded[0]]} has "
                          f"{class_sizes[crowded[0]]} examples for {len(holders[crowded[0]])} clients; lower it or data.num_clients")
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(n_cls):
        chunks = np.array_split(rng.permutation(np.flatnonzero(labels == classes[c])), len(holders[c]))
        for i, chunk in zip(holders[c], chunks):
            buckets[i].append(chunk)
    return [np.concatenate(b) for b in buckets]


def _natural(writers: np.ndarray | None, num_clients: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    if writers is None:
        raise ConfigError("data.partition.kind", "'natural' needs a data set with writers (femnist, synthetic)")
    writers = np.asarray(writers)
    if writers.shape != (n,):
        raise ValueError(f"writers must have one entry per example ({n}), got shape {writers.shape}")
    ids, inverse = np.unique(writers, return_inverse=True)
    if num_clients > ids.size:
        raise ConfigError(
            "data.num_clients",
            f"the 'natural' partition (data.partition.kind) has only {ids.size} writers, "
            f"fewer than {num_clients} clients",
        )
    group_of_writer = np.empty(ids.size, dtype=np.int64)
    for g, members in enumerate(np.array_split(rng.permutation(ids.size), num_clients)):
        group_of_writer[members] = g
    group = group_of_writer[inverse]
    order = np.argsort(group, kind="stable")
    return np.split(order, np.cumsum(np.bincount(group, minlength=num_clients))[:-1])


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """``(clients, classes)`` int64 matrix: entry [i, c] = examples of class c held by client i."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes})")
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, p in enumerate(parts):
        out[i] = np.bincount(labels[p], minlength=num_classes)
    return out


# ---------------------------------------------------------------- cache


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (tuple, set, frozenset)):
        return sorted(v) if isinstance(v, (set, frozenset)) else list(v)
    raise TypeError(f"partition cache key holds a {type(v).__name__}, which is not JSON-serialisable")


def cache_key_hash(key: dict) -> str:
    """sha256 hex digest of ``json.dumps(key, sort_keys=True)`` (compact separators)."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_path(cache_dir: str, key: dict) -> str:
    return os.path.join(cache_dir, f"partition-{cache_key_hash(key)}.parquet")


def cached_partition(cache_dir: str, key: dict, compute: Callable[[], list[np.ndarray]]) -> Partitions:
    """Return the partition stored for ``key`` in ``cache_dir``, computing and storing it if absent.

    ``key`` should hold everything the partition depends on (data set name
    and sizes, kind, parameters, seed). The file
    ``<cache_dir>/partition-<sha256(key)>.parquet`` has columns
    ``client: int32`` and ``index: int64`` (client-major, indices sorted) and
    keeps the number of clients and the key JSON in its schema metadata, so
    empty clients survive a round trip and a key mismatch is detected. Files
    are written to a temporary name in the same folder and moved into place
    with ``os.replace``, so concurrent runs never read a half-written file.
    """
    path = cache_path(cache_dir, key)
    key_json = json.dumps(key, sort_keys=True, separators=(",", ":"), default=_json_default)
    if os.path.isfile(path):
        return _read_cache(path, key_json)
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in compute()]
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.cache_dir: cannot create folder '{cache_dir}' ({e.strerror})") from None
    sizes = [p.size for p in parts]
    table = pa.table(
        {
            "client": pa.array(np.repeat(np.arange(len(parts), dtype=np.int32), sizes), pa.int32()),
            "index": pa.array(np.concatenate(parts) if parts else np.empty(0, np.int64), pa.int64()),
        }
    ).replace_schema_metadata({"fedray.num_clients": str(len(parts)), "fedray.key": key_json})
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=cache_dir)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return Partitions.from_list(parts)


def _read_cache(path: str, key_json: str) -> Partitions:
    try:
        table = pq.read_table(path)
        meta = table.schema.metadata or {}
        num_clients = int(meta[b"fedray.num_clients"])
        stored_key = meta[b"fedray.key"].decode("utf-8")
        client = table.column("client").to_numpy().astype(np.int64)
        index = table.column("index").to_numpy().astype(np.int64)
    except (OSError, KeyError, ValueError, pa.ArrowException) as e:
        raise DataError(f"data.cache_dir: partition cache '{path}' is unreadable ({' '.join(str(e).split())}); delete it") from None
    if stored_key != key_json:
        raise DataError(f"data.cache_dir: partition cache '{path}' was written for another key; delete it")
    if client.size and (client.min() < 0 or client.max() >= num_clients):
        raise DataError(f"data.cache_dir: partition cache '{path}' has client ids outside [0, {num_clients}); delete it")
    order = np.lexsort((index, client))
    return Partitions(np.concatenate([[0], np.cumsum(np.bincount(client, minlength=num_clients))]), index[order])
