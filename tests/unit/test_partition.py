"""Client partitions: iid, dirichlet, shards, natural; label histograms; the Parquet cache."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from fedray.data import cached_partition, label_histogram, partition
from fedray.data.partition import _shard_counts, cache_key_hash
from fedray.errors import ConfigError

# 10 classes of unequal size (50..95 examples), 725 in all, in a scrambled order
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), np.arange(50, 100, 5))).astype(np.int64)


def _check_disjoint_sorted(parts, n, *, cover=True):
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates inside a client
    allidx = np.concatenate(parts)
    assert np.unique(allidx).size == allidx.size  # disjoint across clients
    if cover:
        np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_partition_disjoint_covering_deterministic(kind):
    a = partition(LABELS, 12, kind, seed=7)
    b = partition(LABELS, 12, kind, seed=7)
    c = partition(LABELS, 12, kind, seed=8)
    assert len(a) == 12
    _check_disjoint_sorted(a, LABELS.size)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_equal_within_one():
    sizes = [p.size for p in partition(LABELS, 7, "iid", seed=0)]
    assert sum(sizes) == 725 and max(sizes) - min(sizes) <= 1  # 725 = 7 * 103 + 4


def _mean_max_share(parts):
    h = label_histogram(LABELS, parts, 10).astype(float)
    return float(np.mean(h.max(axis=1) / h.sum(axis=1)))


def test_dirichlet_small_alpha_more_skewed_than_large():
    skewed = _mean_max_share(partition(LABELS, 10, "dirichlet", seed=0, alpha=0.05))
    flat = _mean_max_share(partition(LABELS, 10, "dirichlet", seed=0, alpha=100.0))
    assert skewed > 0.6 and flat < 0.25 and skewed > flat + 0.3


def test_dirichlet_min_size_respected_and_impossible_is_clear_error():
    parts = partition(LABELS, 20, "dirichlet", seed=1, alpha=0.1, min_size=10)
    assert min(p.size for p in parts) >= 10
    tiny = np.arange(30) % 10
    with pytest.raises(ConfigError) as e:
        partition(tiny, 25, "dirichlet", seed=0, alpha=0.001, min_size=1)
    assert e.value.field == "data.partition.alpha" and "Dirichlet" in str(e.value)
    with pytest.raises(ConfigError) as e:
        partition(tiny, 4, "dirichlet", seed=0, min_size=10)  # 4 x 10 > 30
    assert e.value.field == "data.num_clients"
    with pytest.raises(ConfigError) as e:
        partition(tiny, 2, "dirichlet", seed=0, alpha=0.0)
    assert e.value.field == "data.partition.alpha"


@pytest.mark.parametrize("cpc", [1, 2, 3])
def test_shards_limit_classes_per_client(cpc):
    parts = partition(LABELS, 10, "shards", seed=2, classes_per_client=cpc)
    h = label_histogram(LABELS, parts, 10)
    assert (np.count_nonzero(h, axis=1) <= cpc).all()
    _check_disjoint_sorted(parts, LABELS.size)
    sizes = [p.size for p in parts]
    assert max(sizes) <= 2 * min(sizes)  # shards have nearly equal sizes


def test_shards_one_class_each_when_clients_equal_classes():
    parts = partition(LABELS, 10, "shards", seed=0, classes_per_client=1)
    h = label_histogram(LABELS, parts, 10)
    # 10 shards for 10 classes: every class is exactly one shard, i.e. one client
    assert sorted(h.max(axis=1).tolist()) == list(range(50, 100, 5))
    assert (np.count_nonzero(h, axis=0) == 1).all()


def test_shard_counts_hand_values():
    np.testing.assert_array_equal(_shard_counts(np.array([10, 10, 20]), 4), [1, 1, 2])
    np.testing.assert_array_equal(_shard_counts(np.array([1, 99]), 4), [1, 3])  # floor 0 -> 1, then 3 fits
    np.testing.assert_array_equal(_shard_counts(np.array([5, 5, 5]), 5), [2, 2, 1])  # ties: lowest class first
    np.testing.assert_array_equal(_shard_counts(np.array([2, 30]), 8), [1, 7])


def test_shards_errors_name_fields():
    with pytest.raises(ConfigError) as e:
        partition(LABELS, 3, "shards", seed=0, classes_per_client=2)  # 6 shards < 10 classes
    assert e.value.field == "data.partition.classes_per_client"
    with pytest.raises(ConfigError) as e:
        partition(LABELS, 3, "shards", seed=0, classes_per_client=0)
    assert e.value.field == "data.partition.classes_per_client"


WRITERS = np.repeat(np.arange(9), [3, 5, 2, 7, 1, 4, 6, 2, 3]).astype(np.int64)  # 33 examples, 9 writers


def test_natural_one_writer_per_client():
    labels = np.zeros(WRITERS.size, dtype=np.int64)
    parts = partition(labels, 9, "natural", seed=0, writers=WRITERS)
    _check_disjoint_sorted(parts, WRITERS.size)
    assert sorted(tuple(np.unique(WRITERS[p]).tolist()) for p in parts) == [(w,) for w in range(9)]


def test_natural_groups_writers_deterministically():
    labels = np.zeros(WRITERS.size, dtype=np.int64)
    a = partition(labels, 4, "natural", seed=5, writers=WRITERS)
    b = partition(labels, 4, "natural", seed=5, writers=WRITERS)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    _check_disjoint_sorted(a, WRITERS.size)
    groups = [set(np.unique(WRITERS[p]).tolist()) for p in a]
    assert sorted(len(g) for g in groups) == [2, 2, 2, 3]  # 9 writers in 4 nearly equal groups
    for g, p in zip(groups, a):  # every writer's examples stay together
        assert p.size == sum(int((WRITERS == w).sum()) for w in g)


def test_natural_errors():
    labels = np.zeros(WRITERS.size, dtype=np.int64)
    with pytest.raises(ConfigError) as e:
        partition(labels, 10, "natural", seed=0, writers=WRITERS)
    assert e.value.field == "data.num_clients" and "data.partition.kind" in str(e.value)
    with pytest.raises(ConfigError) as e:
        partition(labels, 2, "natural", seed=0)
    assert e.value.field == "data.partition.kind"


def test_unknown_kind_and_bad_num_clients():
    with pytest.raises(ConfigError) as e:
        partition(LABELS, 3, "pathological", seed=0)
    assert e.value.field == "data.partition.kind" and "dirichlet" in str(e.value)
    with pytest.raises(ConfigError) as e:
        partition(LABELS, 0, "iid", seed=0)
    assert e.value.field == "data.num_clients"


def test_label_histogram_hand_values():
    labels = np.array([0, 1, 1, 2, 2, 2])
    h = label_histogram(labels, [np.array([0, 1]), np.array([2, 3, 4, 5]), np.array([], dtype=np.int64)], 4)
    np.testing.assert_array_equal(h, [[1, 1, 0, 0], [0, 1, 3, 0], [0, 0, 0, 0]])
    assert h.dtype == np.int64


# ---------------------------------------------------------------- cache


def test_cache_round_trip_and_no_recompute(tmp_path):
    calls = []
    key = {"data": "digits", "kind": "dirichlet", "alpha": 0.5, "seed": 3, "num_clients": 6, "n": int(LABELS.size)}

    def compute():
        calls.append(1)
        return partition(LABELS, 6, "dirichlet", seed=3)

    first = cached_partition(str(tmp_path / "cache"), key, compute)
    path = tmp_path / "cache" / f"partition-{cache_key_hash(key)}.parquet"
    assert path.is_file() and calls == [1]
    assert [f for f in os.listdir(tmp_path / "cache")] == [path.name]  # no temp file left behind
    table = pq.read_table(path)
    assert str(table.schema.field("client").type) == "int32" and str(table.schema.field("index").type) == "int64"
    # key order does not matter
    second = cached_partition(str(tmp_path / "cache"), dict(reversed(list(key.items()))), compute)
    assert calls == [1]
    assert len(second) == len(first)
    for x, y in zip(first, second):
        assert y.dtype == np.int64
        np.testing.assert_array_equal(x, y)
    # a different key computes again into its own file
    cached_partition(str(tmp_path / "cache"), {**key, "seed": 4}, compute)
    assert calls == [1, 1] and len(os.listdir(tmp_path / "cache")) == 2


def test_cache_keeps_empty_clients(tmp_path):
    parts = [np.array([4, 1], dtype=np.int64), np.empty(0, dtype=np.int64), np.array([0], dtype=np.int64)]
    out = cached_partition(str(tmp_path), {"k": 1}, lambda: parts)
    again = cached_partition(str(tmp_path), {"k": 1}, lambda: pytest.fail("recomputed"))
    assert [a.tolist() for a in again] == [[1, 4], [], [0]] == [a.tolist() for a in out]


def test_cache_key_hash_is_sha256_of_sorted_json():
    import hashlib

    assert cache_key_hash({"b": 1, "a": [1, 2]}) == hashlib.sha256(b'{"a":[1,2],"b":1}').hexdigest()
    assert cache_key_hash({"a": np.int64(3)}) == cache_key_hash({"a": 3})
