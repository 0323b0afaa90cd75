"""The reference accumulation behind every aggregation rule (numpy only).

:class:`Contribution` is one client's input to an aggregation; :class:`MaskedAccumulator`
keeps the per-coordinate weighted sums of masked contributions; :func:`mix` is server
mixing. The conventions are those of :mod:`fedray.aggregation.rules`; the fast kernels
(:mod:`fedray.aggregation.kernels`, behind :func:`fedray.aggregation.merge.merge`) reproduce
these sums bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from fedray.submodel.masks import Mask, Params

__all__ = ["Contribution", "MaskedAccumulator", "mix"]


@dataclass(frozen=True)
class Contribution:
    """One client's input to an aggregation.

    ``values``: full-shape arrays with at least every key the mask covers.
    ``mask``: which coordinates were trained (absent key = not covered).
    ``weight``: non-negative, typically ``n_i`` x staleness factor.
    """

    values: Params
    mask: Mask
    weight: float


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating)


def _copy(params: Mapping[str, np.ndarray]) -> Params:
    return {k: np.array(v, copy=True) for k, v in params.items()}


def _check_known(params: Mapping[str, np.ndarray], global_params: Mapping[str, np.ndarray]) -> None:
    extra = sorted(params.keys() - global_params.keys())
    if extra:
        raise ValueError(f"unknown parameter key {extra[0]!r} (not in the global model)")


def _check_weight(weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"contribution weight must be finite and >= 0, got {weight!r}")
    return w


def _sentinel_min(dtype: np.dtype):
    if dtype == np.bool_:
        return False
    return np.iinfo(dtype).min


class MaskedAccumulator:
    """Incremental per-coordinate weighted sums of masked contributions.

    For every floating tensor it keeps ``acc_w = sum_i w_i * v_i`` and
    ``acc_m = sum_i w_i`` over the contributions covering each coordinate;
    for integer/bool tensors the element-wise max of the covering values.
    Two read-outs share these sums:

    - :meth:`mean`: ``acc_w / acc_m`` where ``acc_m > 0``, else the global
      value (MaskFedAvg / HeteroFL / CA-HFP / the layer rules).
    - :meth:`apply_delta`: ``global + eta_g * acc_w / K`` with ``K`` the
      number of contributions added (FedBuff; contributions are deltas and an
      uncovered coordinate counts as a zero delta).

    Buffers are allocated lazily for the keys that some contribution covers.
    ``acc_m`` stays a scalar per key while every contribution covered that key
    fully (dense layers, depth submodels); it becomes an array at the first
    partial mask. The buffered aggregator keeps one accumulator per buffer
    and adds updates as they arrive, in virtual-time order.
    """

    def __init__(self, template: Mapping[str, np.ndarray], acc_dtype=np.float64):
        self.acc_dtype = np.dtype(acc_dtype)
        if not _is_float(self.acc_dtype):
            raise ValueError(f"acc_dtype must be a floating dtype, got {self.acc_dtype}")
        self._shapes = {k: tuple(np.shape(v)) for k, v in template.items()}
        self._dtypes = {k: np.asarray(v).dtype for k, v in template.items()}
        self._acc_w: dict[str, np.ndarray] = {}
        self._acc_m: dict[str, float | np.ndarray] = {}
        self._max: dict[str, np.ndarray] = {}
        self._scratch: np.ndarray | None = None
        self.count = 0
        self.total_weight = 0.0

    # ------------------------------------------------------------------ input
    def add(self, contribution: Contribution, *, keys: Iterable[str] | None = None,
            masked: bool = True) -> None:
        """Add one contribution.

        ``keys`` restricts which tensors are taken (default: all covered
        ones); ``masked=False`` treats every taken key present in ``values``
        as fully covered (plain FedAvg / BN statistics).
        """
        c = contribution
        if masked:
            taken = c.mask.keys() if keys is None else [k for k in keys if k in c.mask]
            coverage = {k: c.mask[k] for k in taken}
        else:
            taken = c.values.keys() if keys is None else [k for k in keys if k in c.values]
            coverage = {k: None for k in taken}
        self._add(c.values, coverage, c.weight)

    def _add(self, values: Mapping[str, np.ndarray],
             coverage: Mapping[str, np.ndarray | None], weight: float) -> None:
        """``coverage[k]`` is a bool mask or ``None`` for full coverage."""
        w = _check_weight(weight)
        checked = []  # validate everything first: a bad contribution changes nothing
        for k, m in coverage.items():
            if k not in self._shapes:
                raise ValueError(f"unknown parameter key {k!r} (not in the global model)")
            shape = self._shapes[k]
            if m is not None:
                m = np.asarray(m)
                if m.dtype != np.bool_:
                    raise ValueError(f"mask for {k!r} must be bool, got {m.dtype}")
                if m.shape != shape:
                    raise ValueError(f"mask for {k!r} has shape {m.shape}, expected {shape}")
                n_cov = int(np.count_nonzero(m))
                if n_cov == 0:
                    continue
                if n_cov == m.size:
                    m = None
            if k not in values:
                raise ValueError(f"values lack covered key {k!r}")
            v = np.asarray(values[k])
            if v.shape != shape:
                raise ValueError(f"values for {k!r} have shape {v.shape}, expected {shape}")
            checked.append((k, v, m))
        for k, v, m in checked:
            if _is_float(self._dtypes[k]):
                self._add_float(k, v, m, w)
            else:
                self._add_max(k, v, m)
        self.count += 1
        self.total_weight += w

    def _tmp(self, k: str) -> np.ndarray:
        """Scratch array shaped like ``k`` (one flat buffer shared by all keys)."""
        shape = self._shapes[k]
        size = math.prod(shape)
        if self._scratch is None or self._scratch.size < size:
            biggest = max(math.prod(s) for k, s in self._shapes.items() if _is_float(self._dtypes[k]))
            self._scratch = np.empty(max(size, biggest), self.acc_dtype)
        return self._scratch[:size].reshape(shape)

    def _add_float(self, k: str, v: np.ndarray, m: np.ndarray | None, w: float) -> None:
        shape, dt = self._shapes[k], self.acc_dtype
        acc_w = self._acc_w.get(k)
        if acc_w is None:
            acc_w = self._acc_w[k] = np.zeros(shape, dt)
            self._acc_m[k] = 0.0
        tmp = self._tmp(k)
        with np.errstate(all="ignore"):
            if m is None:  # product in acc_dtype, as on the masked branch below
                np.multiply(v, w, out=tmp, dtype=dt, casting="unsafe")
                np.add(acc_w, tmp, out=acc_w)
                acc_m = self._acc_m[k]
                if isinstance(acc_m, np.ndarray):
                    np.add(acc_m, w, out=acc_m)
                else:
                    self._acc_m[k] = acc_m + w
                return
            acc_m = self._acc_m[k]
            if not isinstance(acc_m, np.ndarray):
                acc_m = self._acc_m[k] = np.full(shape, acc_m, dt)
            # tmp = w on covered coordinates, 0 elsewhere: serves both sums.
            np.multiply(m, w, out=tmp)
            np.add(acc_m, tmp, out=acc_m)
            np.multiply(tmp, v, out=tmp, casting="unsafe")
            if not np.isfinite(tmp.sum()):
                # Non-finite junk outside the mask (inf * 0 = NaN): zero it.
                np.multiply(v, w, out=tmp, casting="unsafe")
                np.putmask(tmp, ~m, 0)
            np.add(acc_w, tmp, out=acc_w)

    def _add_max(self, k: str, v: np.ndarray, m: np.ndarray | None) -> None:
        dt = self._dtypes[k]
        cur = self._max.get(k)
        if cur is None:
            cur = self._max[k] = np.full(self._shapes[k], _sentinel_min(dt), dt)
        vv = v.astype(dt, copy=False)
        if m is None:
            np.maximum(cur, vv, out=cur)
        else:
            np.maximum(cur, vv, out=cur, where=m)

    # --------------------------------------------------------------- read-out
    def _check_global(self, global_params: Mapping[str, np.ndarray]) -> None:
        for k in self._acc_w.keys() | self._max.keys():
            if k not in global_params:
                raise ValueError(f"global model lacks accumulated key {k!r}")
            if np.shape(global_params[k]) != self._shapes[k]:
                raise ValueError(f"global {k!r} has shape {np.shape(global_params[k])}, "
                                 f"expected {self._shapes[k]}")

    def mean(self, global_params: Mapping[str, np.ndarray]) -> Params:
        """Per-coordinate weighted mean; zero-weight coordinates keep their value."""
        self._check_global(global_params)
        out: Params = {}
        for k, old in global_params.items():
            old = np.asarray(old)
            if k in self._acc_w:
                out[k] = self._float_mean(k, old)
            elif k in self._max:
                out[k] = np.maximum(old, self._max[k]).astype(old.dtype, copy=False)
            else:
                out[k] = np.array(old, copy=True)
        return out

    def _float_mean(self, k: str, old: np.ndarray) -> np.ndarray:
        acc_w, acc_m = self._acc_w[k], self._acc_m[k]
        if not isinstance(acc_m, np.ndarray):
            if acc_m > 0:
                return (acc_w / acc_m).astype(old.dtype, copy=False)
            return np.array(old, copy=True)
        covered = acc_m > 0
        q = self._tmp(k)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(acc_w, acc_m, out=q)
        res = np.array(old, copy=True)
        np.copyto(res, q, where=covered, casting="unsafe")
        return res

    def apply_delta(self, global_params: Mapping[str, np.ndarray], eta_g: float) -> Params:
        """``global + eta_g * (sum_i w_i delta_i) / K``, K = contributions added."""
        self._check_global(global_params)
        eta = float(eta_g)
        if not math.isfinite(eta):
            raise ValueError(f"eta_g must be finite, got {eta_g!r}")
        out: Params = {}
        for k, old in global_params.items():
            old = np.asarray(old)
            if k in self._acc_w and self.count > 0:
                step = self._acc_w[k] * (eta / self.count)
                out[k] = np.add(old, step, dtype=self.acc_dtype).astype(old.dtype, copy=False)
            elif k in self._max and old.dtype != np.bool_:
                inc = np.maximum(self._max[k], 0).astype(old.dtype, copy=False)
                out[k] = (old + inc).astype(old.dtype, copy=False)
            else:
                out[k] = np.array(old, copy=True)
        return out


def mix(global_params: Mapping[str, np.ndarray], new_params: Mapping[str, np.ndarray],
        eta: float) -> Params:
    """FedAsync / server mixing ``x <- (1 - eta) x + eta x_new``, eta in [0, 1].

    Keys absent from ``new_params`` keep their value; integer/bool tensors
    take ``max(x, x_new)``.
    """
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"mixing rate eta must be in [0, 1], got {eta!r}")
    _check_known(new_params, global_params)
    out: Params = {}
    for k, x in global_params.items():
        x = np.asarray(x)
        if k not in new_params:
            out[k] = np.array(x, copy=True)
            continue
        xn = np.asarray(new_params[k])
        if xn.shape != x.shape:
            raise ValueError(f"{k!r}: new shape {xn.shape} != global shape {x.shape}")
        if _is_float(x.dtype):
            r = np.multiply(x, 1.0 - eta, dtype=np.float64)
            r += np.multiply(xn, eta, dtype=np.float64)
            out[k] = r.astype(x.dtype, copy=False)
        else:
            out[k] = np.maximum(x, xn.astype(x.dtype, copy=False))
    return out
