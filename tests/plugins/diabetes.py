"""A user data set: scikit-learn's bundled diabetes regression data (442 patients, 10
features, no download), standardised with the training split's statistics::

    data: {name: "diabetes:load"}
    task: {name: regression}
    model: {name: mlp, options: {hidden: [32]}}
"""
from __future__ import annotations

import numpy as np

from fedray.data.datasets import Dataset


def load(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    perm = np.random.default_rng([seed, 0xD1AB]).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    mx, sx = x[tr].mean(0), x[tr].std(0) + 1e-12
    my, sy = y[tr].mean(), y[tr].std()

    def xs(i):
        return np.ascontiguousarray((x[i] - mx) / sx, dtype=np.float32)

    def ys(i):
        return ((y[i] - my) / sy).astype(np.float32)

    return Dataset("diabetes", xs(tr), ys(tr), xs(te), ys(te), num_classes=1, input_shape=(x.shape[1],))
