"""Data set loaders: bundled digits, FedProx synthetic, and tiny files in the real formats."""

from __future__ import annotations

import gzip
import json
import pickle
import struct

import numpy as np
import pytest

from fedray.data import DATASETS, Dataset, load_dataset, needs_root
from fedray.errors import ConfigError, DataError

# ---------------------------------------------------------------- registry


def test_registry_names_and_needs_root():
    assert {"digits", "synthetic", "cifar10", "cifar100", "fashion_mnist", "emnist", "femnist"} <= set(DATASETS)
    assert not needs_root("digits") and not needs_root("synthetic")
    assert all(needs_root(n) for n in ("cifar10", "cifar100", "fashion_mnist", "emnist", "femnist"))


def test_unknown_name_is_config_error_listing_choices():
    with pytest.raises(ConfigError) as e:
        load_dataset("mnist3d")
    assert e.value.field == "data.name"
    assert "unknown data set 'mnist3d'" in str(e.value) and "digits" in str(e.value)
    with pytest.raises(ConfigError) as e:
        needs_root("nope")
    assert e.value.field == "data.name"


def test_unknown_option_and_bad_test_fraction():
    with pytest.raises(ConfigError) as e:
        load_dataset("digits", options={"colour": 1})
    assert e.value.field == "data.options.colour"
    with pytest.raises(ConfigError) as e:
        load_dataset("digits", test_fraction=1.0)
    assert e.value.field == "data.test_fraction"


# ---------------------------------------------------------------- digits


def test_digits_shapes_dtypes_range():
    d = load_dataset("digits")
    assert isinstance(d, Dataset) and d.name == "digits"
    assert d.x_train.shape == (1438, 1, 8, 8) and d.x_test.shape == (359, 1, 8, 8)  # 1797 * 0.2 = 359.4
    assert d.x_train.dtype == np.float32 and d.x_train.flags.c_contiguous
    assert d.y_train.dtype == np.int64 and d.num_classes == 10 and d.input_shape == (1, 8, 8)
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    assert d.writers is None
    assert set(np.unique(d.y_train)) == set(range(10))


def test_digits_split_deterministic_and_disjoint():
    from sklearn.datasets import load_digits

    a = load_dataset("digits", seed=3)
    b = load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_train, c.y_train)
    # train + test is exactly the original set (as a multiset of rows)
    full = load_digits().data.astype(np.float32) / 16
    both = np.concatenate([a.x_train.reshape(-1, 64), a.x_test.reshape(-1, 64)])
    assert both.shape == full.shape
    np.testing.assert_array_equal(np.unique(both, axis=0), np.unique(full, axis=0))
    half = load_dataset("digits", test_fraction=0.5)
    assert half.num_test == 898  # round(898.5) rounds half to even


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_shapes_writers():
    opts = {"alpha": 0.5, "beta": 0.5, "num_users": 8, "samples_per_user": 50}
    a = load_dataset("synthetic", seed=1, options=opts)
    b = load_dataset("synthetic", seed=1, options=opts)
    c = load_dataset("synthetic", seed=2, options=opts)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.input_shape == (60,) and a.x_train.shape == (8 * 40, 60) and a.x_test.shape == (8 * 10, 60)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(a.writers), np.full(8, 40))
    assert a.y_train.min() >= 0 and a.y_train.max() < 10


def test_synthetic_default_counts_follow_fedprox_lognormal():
    d = load_dataset("synthetic", options={"num_users": 5, "dim": 6, "num_classes": 3})
    per_user = np.bincount(d.writers)
    assert per_user.size == 5 and d.input_shape == (6,) and d.num_classes == 3
    # FedProx draws int(lognormal(4, 2)) + 50 >= 50 examples per user; 80% of each user's examples train
    assert per_user.min() >= 40 and len(set(per_user.tolist())) > 1
    assert d.num_test >= 5 * 10


def _mean_tv_to_global(d: Dataset) -> float:
    users = np.unique(d.writers)
    glob = np.bincount(d.y_train, minlength=d.num_classes) / d.num_train
    tvs = []
    for u in users:
        h = np.bincount(d.y_train[d.writers == u], minlength=d.num_classes)
        tvs.append(0.5 * np.abs(h / h.sum() - glob).sum())
    return float(np.mean(tvs))


def test_synthetic_is_non_iid_and_iid_option_is_less_so():
    base = {"num_users": 20, "samples_per_user": 200}
    noniid = load_dataset("synthetic", options={**base, "alpha": 1.0, "beta": 1.0})
    iid = load_dataset("synthetic", options={**base, "alpha": 0.0, "beta": 0.0, "iid": True})
    assert _mean_tv_to_global(noniid) > 0.4
    assert _mean_tv_to_global(iid) < _mean_tv_to_global(noniid) - 0.2


def test_synthetic_bad_option_names_field():
    with pytest.raises(ConfigError) as e:
        load_dataset("synthetic", options={"num_users": 0})
    assert e.value.field == "data.options.num_users"


# ---------------------------------------------------------------- CIFAR (python pickles)


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _write_cifar10(root, n=4, seed=0):
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _pickle(base / name, {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"filenames": [b"x.png"] * n,
        })
    _pickle(base / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072})
    return base


def test_cifar10_reads_real_pickle_layout(tmp_path):
    base = _write_cifar10(tmp_path)
    d = load_dataset("cifar10", root=str(tmp_path))
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert d.x_train.dtype == np.float32 and d.x_train.flags.c_contiguous
    assert d.num_classes == 10 and d.input_shape == (3, 32, 32)
    with open(base / "data_batch_1", "rb") as f:
        b1 = pickle.load(f)
    np.testing.assert_array_equal(d.y_train[:4], b1[b"labels"])
    # per-channel standardisation with training statistics: train channels have mean 0, std 1
    np.testing.assert_allclose(d.x_train.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(d.x_train.std(axis=(0, 2, 3)), 1.0, atol=1e-4)
    # first pixel of the red channel, standardised by hand
    raw = np.concatenate([pickle.load(open(base / f"data_batch_{i}", "rb"))[b"data"] for i in range(1, 6)])
    red = raw[:, :1024].astype(np.float64) / 255
    expect = (raw[0, 0] / 255 - red.mean()) / red.std()
    assert d.x_train[0, 0, 0, 0] == pytest.approx(expect, rel=1e-5)


def test_cifar100_reads_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for name, n in (("train", 6), ("test", 3)):
        _pickle(base / name, {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
        })
    _pickle(base / "meta", {b"fine_label_names": [b"x"] * 100, b"coarse_label_names": [b"y"] * 20})
    d = load_dataset("cifar100", root=str(tmp_path))
    assert d.num_classes == 100 and d.x_train.shape == (6, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(d.y_test, pickle.load(open(base / "test", "rb"))[b"fine_labels"])


def test_cifar_missing_folder_and_file_name_the_field(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "data.root" in msg and "nowhere" in msg and "cifar-10-batches-py" in msg and "\n" not in msg
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=str(tmp_path))  # folder exists, subfolder does not
    assert "data.root" in str(e.value) and "cifar-10-batches-py" in str(e.value)
    base = _write_cifar10(tmp_path)
    (base / "data_batch_3").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=str(tmp_path))
    assert "data_batch_3" in str(e.value) and "data.root" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_dataset("cifar10")
    assert e.value.field == "data.root"


def test_cifar_malformed_batch_is_data_error(tmp_path):
    base = _write_cifar10(tmp_path)
    _pickle(base / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=str(tmp_path))
    assert "test_batch" in str(e.value)


# ---------------------------------------------------------------- MNIST family (idx-ubyte through torchvision)


def _idx_images(imgs: np.ndarray) -> bytes:
    return struct.pack(">IIII", 2051, imgs.shape[0], 28, 28) + imgs.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, labels.shape[0]) + labels.astype(np.uint8).tobytes()


def _write_idx(raw, names, n_train=5, n_test=3, num_classes=10, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True)
    arrays = {}
    for (img_name, lab_name), n in zip(names, (n_train, n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n, dtype=np.uint8)
        for name, blob in ((img_name, _idx_images(imgs)), (lab_name, _idx_labels(labels))):
            if gz:
                with gzip.open(raw / (name + ".gz"), "wb") as f:
                    f.write(blob)
            else:
                (raw / name).write_bytes(blob)
        arrays[n] = (imgs, labels)
    return arrays[n_train], arrays[n_test]


FASHION = [("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    (imgs, labels), (timgs, tlabels) = _write_idx(tmp_path / "FashionMNIST" / "raw", FASHION, gz=gz)
    d = load_dataset("fashion_mnist", root=str(tmp_path))
    assert d.x_train.shape == (5, 1, 28, 28) and d.x_test.shape == (3, 1, 28, 28)
    assert d.x_train.dtype == np.float32 and d.num_classes == 10
    np.testing.assert_allclose(d.x_train[:, 0], imgs / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_train, labels)
    np.testing.assert_array_equal(d.y_test, tlabels)
    assert d.x_train.min() >= 0 and d.x_train.max() <= 1


def test_fashion_mnist_missing_file_and_bad_magic(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", root=str(tmp_path))
    assert "data.root" in str(e.value) and "FashionMNIST" in str(e.value)
    _write_idx(tmp_path / "FashionMNIST" / "raw", FASHION)
    (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", root=str(tmp_path))
    assert "t10k-labels-idx1-ubyte" in str(e.value)
    (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 9999, 3) + b"\0\0\0")
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", root=str(tmp_path))
    assert "fashion_mnist" in str(e.value)


def test_emnist_split_option(tmp_path):
    names = [(f"emnist-letters-{k}-images-idx3-ubyte", f"emnist-letters-{k}-labels-idx1-ubyte") for k in ("train", "test")]
    (_, labels), _ = _write_idx(tmp_path / "EMNIST" / "raw", names, num_classes=27)
    d = load_dataset("emnist", root=str(tmp_path), options={"split": "letters"})
    assert d.num_classes == 27 and d.x_train.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(d.y_train, labels)
    with pytest.raises(DataError) as e:  # default split is 'balanced', whose files are absent
        load_dataset("emnist", root=str(tmp_path))
    assert "emnist-balanced-train-images-idx3-ubyte" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_dataset("emnist", root=str(tmp_path), options={"split": "kanji"})
    assert e.value.field == "data.options.split"


# ---------------------------------------------------------------- FEMNIST (LEAF JSON)


def _leaf(users, rng):
    data = {}
    for u, n in users:
        data[u] = {"x": rng.random((n, 784)).round(3).tolist(), "y": rng.integers(0, 62, n).tolist()}
    return {"users": [u for u, _ in users], "num_samples": [n for _, n in users], "user_data": data}


def test_femnist_reads_leaf_json_with_writers(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    a = _leaf([("f_0001", 3), ("f_0002", 2)], rng)
    b = _leaf([("f_0003", 4)], rng)
    (tmp_path / "train" / "all_data_0_train.json").write_text(json.dumps(a))
    (tmp_path / "train" / "all_data_1_train.json").write_text(json.dumps(b))
    t = _leaf([("f_0001", 1), ("f_0003", 2)], rng)
    (tmp_path / "test" / "all_data_0_test.json").write_text(json.dumps(t))
    d = load_dataset("femnist", root=str(tmp_path))
    assert d.x_train.shape == (9, 1, 28, 28) and d.x_test.shape == (3, 1, 28, 28)
    assert d.num_classes == 62 and d.input_shape == (1, 28, 28) and d.x_train.dtype == np.float32
    np.testing.assert_array_equal(d.writers, [0, 0, 0, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(d.y_train[:3], a["user_data"]["f_0001"]["y"])
    np.testing.assert_allclose(d.x_train[5].ravel(), b["user_data"]["f_0003"]["x"][0], rtol=1e-6)


def test_femnist_missing_and_malformed(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("femnist", root=str(tmp_path))
    assert "data.root" in str(e.value) and "test" in str(e.value)
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("femnist", root=str(tmp_path))
    assert "*.json" in str(e.value)
    bad = {"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[0.0] * 10], "y": [1]}}}
    (tmp_path / "train" / "a.json").write_text(json.dumps(bad))
    (tmp_path / "test" / "a.json").write_text(json.dumps(bad))
    with pytest.raises(DataError) as e:
        load_dataset("femnist", root=str(tmp_path))
    assert "a.json" in str(e.value) and "784" in str(e.value)
