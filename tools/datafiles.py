"""Small data folders in the real formats of data sets that no machine here has: the loaders read
them as they would read the real ones (benchmarks and tests that need a CIFAR-10 or FEMNIST folder)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np


def write_cifar10(root: Path, per_batch: int = 60, seed: int = 0) -> Path:
    """The python pickle layout of cifar-10-batches-py, ``per_batch`` images per batch."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                         b"filenames": [b"x.png"] * per_batch}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, f)
    return root


def write_femnist(root: Path, writers: int = 60, per_writer: int = 6, seed: int = 0) -> Path:
    """LEAF's JSON layout (train/ and test/ folders of user shards), 62 classes."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_writer), ("test", 2)):
        (root / split).mkdir(parents=True)
        users = [f"f_{i:04d}" for i in range(writers)]
        data = {u: {"x": rng.random((n, 784)).round(3).tolist(), "y": rng.integers(0, 62, n).tolist()} for u in users}
        (root / split / f"all_data_0_{split}.json").write_text(
            json.dumps({"users": users, "num_samples": [n] * writers, "user_data": data}))
    return root
