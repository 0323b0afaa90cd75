"""FedProx synthetic data for millions of users, generated per user when it is read.

``synthetic`` with ``lazy: true`` holds no examples: :class:`SyntheticUsers` keeps each
user's example count (and the offsets of its examples in the client-major training set)
and draws user ``k``'s distribution and examples from its own generator,
``default_rng([seed, PURPOSE, k])``, when a worker reads them. The driver of a run with ten
million users holds three integer arrays; a client actor generates the few users it trains
(and caches the last ones). The same seed gives the same examples, whoever reads them and
in whatever order.

Per user ``k`` (the FedProx recipe of :func:`fedray.data.datasets.synthetic_users`, one
generator per user): ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)^dim``,
``W_k ~ N(u_k, 1)`` and ``b_k ~ N(u_k, 1)`` (``iid``: one shared ``W, b ~ N(0, 1)`` from
``default_rng([seed, PURPOSE, 'global'])`` and ``v_k = B_k``), then its training rows, then
its test rows, ``x ~ N(v_k, diag(j^-1.2))``, ``y = argmax(x W_k + b_k)``. Counts: the
eager loader's (``int(lognormal(4, 2)) + 50`` or ``samples_per_user``, drawn for every user
at once) and the same per-user test share; the test set is the test rows of ``test_users``
users spread evenly over the ids.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

__all__ = ["SyntheticUsers", "UserColumn"]

PURPOSE = 0x5E7D
_CACHE = 64  # users kept generated per process


class SyntheticUsers:
    def __init__(self, seed: int, *, alpha: float, beta: float, num_users: int, dim: int, num_classes: int,
                 samples_per_user: int | None, iid: bool, test_fraction: float):
        self.seed, self.alpha, self.beta, self.dim, self.num_classes = int(seed), alpha, beta, dim, num_classes
        self.iid = iid
        rng = np.random.default_rng([self.seed, PURPOSE])
        if samples_per_user is None:
            total = rng.lognormal(4.0, 2.0, num_users).astype(np.int64) + 50
        else:
            total = np.full(num_users, samples_per_user, dtype=np.int64)
        n_test = np.minimum(total - 1, np.maximum(1, np.round(test_fraction * total).astype(np.int64)))
        self.train_counts = (total - n_test).astype(np.int32)
        self.test_counts = n_test.astype(np.int32)
        self.offsets = np.concatenate([[0], np.cumsum(self.train_counts, dtype=np.int64)])
        self.std_x = np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2) ** 0.5
        self._cache: OrderedDict = OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    @property
    def num_users(self) -> int:
        return len(self.train_counts)

    def user(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """User ``k``'s ``(x_train, y_train, x_test, y_test)``."""
        k = int(k)
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        rng = np.random.default_rng([self.seed, PURPOSE, k])
        u, big_b = rng.normal(0.0, self.alpha), rng.normal(0.0, self.beta)
        if self.iid:
            g = np.random.default_rng([self.seed, PURPOSE, 0x61])  # 'global'
            w, b = g.normal(0.0, 1.0, (self.dim, self.num_classes)), g.normal(0.0, 1.0, self.num_classes)
            mean = np.full(self.dim, big_b)
        else:
            mean = rng.normal(big_b, 1.0, self.dim)
            w, b = rng.normal(u, 1.0, (self.dim, self.num_classes)), rng.normal(u, 1.0, self.num_classes)
        out = []
        for n in (int(self.train_counts[k]), int(self.test_counts[k])):
            x = mean + self.std_x * rng.standard_normal((n, self.dim))
            out += [x.astype(np.float32), np.argmax(x @ w + b, axis=1).astype(np.int64)]
        self._cache[k] = hit = tuple(out)
        if len(self._cache) > _CACHE:
            self._cache.popitem(last=False)
        return hit

    def rows(self, idx: np.ndarray, column: int) -> np.ndarray:
        """Training examples ``idx`` (client-major global ids) of column 0 (x) or 1 (y)."""
        idx = np.asarray(idx, dtype=np.int64)
        users = np.searchsorted(self.offsets, idx, side="right") - 1
        if idx.size and users[0] == users[-1] and (users == users[0]).all():  # one user's batch
            k = int(users[0])
            return self.user(k)[column][idx - self.offsets[k]]
        first = self.user(int(users[0]))[column] if idx.size else np.empty((0, self.dim), np.float32)
        out = np.empty((idx.size, *first.shape[1:]), dtype=first.dtype)
        for k in np.unique(users):
            sel = users == k
            out[sel] = self.user(int(k))[column][idx[sel] - self.offsets[k]]
        return out

    def test_set(self, test_users: int) -> tuple[np.ndarray, np.ndarray]:
        """The test rows of ``test_users`` users spread evenly over the ids."""
        ids = np.unique(np.linspace(0, self.num_users - 1, min(test_users, self.num_users)).astype(np.int64))
        parts = [self.user(int(k)) for k in ids]
        return (np.ascontiguousarray(np.concatenate([p[2] for p in parts])),
                np.concatenate([p[3] for p in parts]))


class UserColumn:
    """The training ``x`` (column 0) or ``y`` (column 1) of :class:`SyntheticUsers` as a
    read-only array-like: ``col[indices]``, ``col[a:b]``, ``len``, ``shape``, ``dtype``."""

    def __init__(self, users: SyntheticUsers, column: int, flip: int | None = None):
        self.users, self.column, self.flip = users, column, flip
        self.dtype = np.dtype(np.float32 if column == 0 else np.int64)
        n = int(users.offsets[-1])
        self.shape = (n, users.dim) if column == 0 else (n,)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            key = np.arange(*key.indices(len(self)))
        out = self.users.rows(np.atleast_1d(np.asarray(key)), self.column)
        if self.flip is not None:  # label flipping (the attack): class c becomes flip - c
            out = (self.flip - out).astype(out.dtype, copy=False)
        return out[0] if np.ndim(key) == 0 else out

    def flipped(self, num_classes: int) -> "UserColumn":
        return UserColumn(self.users, self.column, num_classes - 1)
