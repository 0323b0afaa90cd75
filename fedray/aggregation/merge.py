"""The merge: validated payloads kept encoded, merged by the tile kernels behind one ``merge()``.

The aggregator used to decode every admitted payload to full-shape values and
a full-shape mask and merge them with :class:`~fedray.aggregation.accumulate.MaskedAccumulator`
(several passes over float64 arrays per update). Now :func:`lazy_decode`
wraps the validated payload (zero-copy views from the Ray object store) in two
read-only mappings, :class:`PayloadValues` and :class:`PayloadMask`, which are
what :func:`fedray.submodel.encode.decode` returned before -- same keys, same
full-shape arrays -- except that a tensor is decoded only when someone indexes
it (and then cached, read-only). A :class:`~fedray.aggregation.accumulate.Contribution`
built on them is a normal contribution for every method and rule.

The masked-mean family in :mod:`fedray.aggregation.rules`
(:func:`~fedray.aggregation.rules.masked_mean`,
:func:`~fedray.aggregation.rules.width_sliced_mean`,
:func:`~fedray.aggregation.rules.apply_delta_mean`,
:func:`~fedray.aggregation.rules.masked_mix`) detects contributions whose
all call :func:`merge`: contributions whose ``values`` are :class:`PayloadValues` go to
:func:`merge_contributions`, which hands the *encoded* entries to
:func:`fedray.aggregation.kernels.merge`; any other contribution to the numpy reference
:func:`merge_reference`.

Per key and contribution the piece given to the kernel is:

- the payload entry itself when the contribution's mask is the payload's
  :class:`PayloadMask` (what methods pass on unchanged: FedBuff, FedFix,
  PR-FL, CA-HFP, CLAMP's masked variant), or when a plain mask dict holds
  the very (cached, read-only) array that :class:`PayloadMask` decoded for that
  key (a method that filtered keys, like HeteroFL's static BN statistics);
- otherwise a ``"masked"`` piece of the decoded values and the given mask.

Integer/bool tensors and float dtypes other than float32/float64 go through
:class:`~fedray.aggregation.accumulate.MaskedAccumulator` (``accumulate.mix`` for the
mix mode; they are tiny), so
every convention of :mod:`fedray.aggregation.rules` holds unchanged; the
numerical contract of the float path is stated in
:mod:`fedray.aggregation.kernels` (float64 products and sums in contribution
order: the same bits as the numpy rules on the decoded contributions; FedAsync
mixing ``masked_mix`` is applied per contribution as in ``rules.mix``).
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

import numpy as np

from fedray.aggregation import kernels
from fedray.aggregation.accumulate import Contribution, MaskedAccumulator, _check_weight, _copy, mix
from fedray.submodel.encode import Payload, decode_entry
from fedray.submodel.masks import Params

__all__ = ["PayloadValues", "PayloadMask", "lazy_decode", "payload_backed", "merge", "merge_contributions"]


class _Source:
    """One validated payload, the shapes of its keys and the decoded cache."""

    def __init__(self, payload: Payload, shapes: Mapping[str, tuple[int, ...]]):
        missing = [k for k in payload.entries if k not in shapes]
        if missing:
            raise ValueError(f"no shape for payload key {missing[0]!r}")
        self.payload = payload
        self.shapes = {k: tuple(shapes[k]) for k in payload.entries}
        self._values: dict[str, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}

    def _decode(self, k: str) -> None:
        v, m = decode_entry(self.payload.entries[k], self.shapes[k])
        for a in (v, m):
            a.flags.writeable = False
        self._values[k], self._masks[k] = v, m

    def value(self, k: str) -> np.ndarray:
        if k not in self._values:
            self._decode(k)
        return self._values[k]

    def mask(self, k: str) -> np.ndarray:
        if k not in self._masks:
            self._decode(k)
        return self._masks[k]

    def cached_mask(self, k: str) -> np.ndarray | None:
        return self._masks.get(k)

    def __getstate__(self):  # checkpoints carry the compact payload, not decoded arrays
        return {"payload": self.payload, "shapes": self.shapes}

    def __setstate__(self, state):
        self.__init__(state["payload"], state["shapes"])


class _View(Mapping):
    __slots__ = ("source",)

    def __init__(self, source: _Source):
        self.source = source

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.payload.entries)

    def __len__(self) -> int:
        return len(self.source.payload.entries)

    def __contains__(self, k) -> bool:
        return k in self.source.payload.entries

    def __reduce__(self):
        return (type(self), (self.source,))


class PayloadValues(_View):
    """Full-shape values of a payload, decoded per key on first access (zeros
    outside the covered coordinates, read-only)."""

    def __getitem__(self, k: str) -> np.ndarray:
        if k not in self.source.payload.entries:
            raise KeyError(k)
        return self.source.value(k)


class PayloadMask(_View):
    """The coverage mask of a payload, decoded per key on first access (read-only)."""

    def __getitem__(self, k: str) -> np.ndarray:
        if k not in self.source.payload.entries:
            raise KeyError(k)
        return self.source.mask(k)


def lazy_decode(payload: Payload, shapes: Mapping[str, tuple[int, ...]]) -> tuple[PayloadValues, PayloadMask]:
    """Drop-in for :func:`fedray.submodel.encode.decode` that decodes nothing yet.

    ``payload`` must have passed :func:`fedray.aggregation.validate.check`
    (sorted unique in-range indices, matching lengths and dtypes).
    """
    src = _Source(payload, shapes)
    return PayloadValues(src), PayloadMask(src)


def payload_backed(contribs: Sequence[Contribution]) -> bool:
    """True when there is at least one contribution and all have :class:`PayloadValues`."""
    return bool(contribs) and all(isinstance(c.values, PayloadValues) for c in contribs)


def _piece(c: Contribution, k: str, shape: tuple[int, ...]):
    """The kernel piece for key ``k`` of ``c`` (None: covers nothing)."""
    src = c.values.source if isinstance(c.values, PayloadValues) else None
    if src is not None and isinstance(c.mask, PayloadMask) and c.mask.source is src:
        return src.payload.entries[k]
    m = c.mask[k]
    if src is not None and k in src.payload.entries and m is src.cached_mask(k):
        return src.payload.entries[k]
    m = np.asarray(m)
    if m.dtype != np.bool_:
        raise ValueError(f"mask for {k!r} must be bool, got {m.dtype}")
    if m.shape != shape:
        raise ValueError(f"mask for {k!r} has shape {m.shape}, expected {shape}")
    if k not in c.values:
        raise ValueError(f"values lack covered key {k!r}")
    v = np.asarray(c.values[k])
    if v.shape != shape:
        raise ValueError(f"values for {k!r} have shape {v.shape}, expected {shape}")
    return kernels.Piece("masked", v, (m,))


def merge_contributions(global_params: Mapping[str, np.ndarray], contribs: Sequence[Contribution],
                        mode: str, *, eta: float = 1.0, rates: Sequence[float] | None = None,
                        parallel: bool | None = None) -> Params:
    """The rules' masked-mean family over (typically payload-backed) contributions.

    ``mode``: ``"mean"`` (:func:`rules.masked_mean`), ``"delta"``
    (:func:`rules.apply_delta_mean` with ``eta_g = eta``) or ``"mix"``
    (:func:`rules.masked_mix` with one rate per contribution in ``rates``).
    Returns a new dict with every key of ``global_params``; inputs are not
    modified. ``parallel`` is passed to :func:`kernels.merge`.
    """
    if mode not in ("mean", "delta", "mix"):
        raise ValueError(f"unknown merge mode {mode!r}")
    if mode == "mix":
        if rates is None or len(rates) != len(contribs):
            raise ValueError("masked mix needs one rate per contribution")
        weights = [float(r) for r in rates]
        for r in weights:
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"mixing rate eta must be in [0, 1], got {r!r}")
    else:
        weights = [_check_weight(c.weight) for c in contribs]
    if mode == "delta" and not math.isfinite(float(eta)):
        raise ValueError(f"eta_g must be finite, got {eta!r}")

    shapes = {k: tuple(np.shape(v)) for k, v in global_params.items()}
    fast = {k for k, v in global_params.items() if np.asarray(v).dtype in kernels.DTYPES}
    slow_params = {k: v for k, v in global_params.items() if k not in fast}
    pieces: dict[str, tuple[list, list]] = {}
    slow = MaskedAccumulator(slow_params)
    slow_mixed = slow_params
    for c, w in zip(contribs, weights):
        coverage = {}
        for k in c.mask:
            if k not in shapes:
                raise ValueError(f"unknown parameter key {k!r} (not in the global model)")
            if k in fast:
                p = _piece(c, k, shapes[k])
                ps, ws = pieces.setdefault(k, ([], []))
                ps.append(p)
                ws.append(w)
            else:
                coverage[k] = c.mask[k]
        if mode == "mix":  # the reference rule, on the few non-kernel tensors
            target = {k: np.where(m, c.values[k], slow_mixed[k]) for k, m in coverage.items()}
            slow_mixed = mix(slow_mixed, target, w)
        else:  # one _add per contribution (even an empty one) keeps the count = K
            slow._add(c.values, coverage, w)

    if mode == "mix":
        slow_out = _copy(slow_mixed)
    elif mode == "delta":
        slow_out = slow.apply_delta(slow_params, eta)
    else:
        slow_out = slow.mean(slow_params)
    kmode = {"mean": kernels.MEAN, "delta": kernels.DELTA, "mix": kernels.MIX}[mode]
    scale = float(eta) / len(contribs) if contribs else 0.0
    merged: Params = {}
    for dt in kernels.DTYPES:  # one kernel call per dtype
        keys = [k for k in pieces if np.asarray(global_params[k]).dtype == dt]
        if keys:
            outs = kernels.merge_many([global_params[k] for k in keys], [pieces[k][0] for k in keys],
                                      [pieces[k][1] for k in keys], kmode, scale=scale, parallel=parallel,
                                      names=keys)
            merged.update(zip(keys, outs))
    out: Params = {}
    for k, old in global_params.items():
        if k not in fast:
            out[k] = slow_out[k]
        elif k in merged:
            out[k] = merged[k]
        else:
            out[k] = np.array(old, copy=True)
    return out


def merge(global_params: Mapping[str, np.ndarray], contribs: Sequence[Contribution], mode: str, *,
          eta: float = 1.0, rates: Sequence[float] | None = None, acc_dtype=np.float64) -> Params:
    """The one entry point of the masked-mean family: ``mode`` ``"mean"`` (masked mean),
    ``"delta"`` (``global + eta * sum w_i delta_i / K``) or ``"mix"`` (one mixing step per
    contribution, ``rates[i]``). Payload-backed contributions (what the aggregator buffers)
    with float64 accumulation go through the tile kernels; everything else through the numpy
    reference (:class:`~fedray.aggregation.accumulate.MaskedAccumulator` and
    :func:`~fedray.aggregation.accumulate.mix`), which the kernels reproduce bit for bit."""
    if np.dtype(acc_dtype) == np.float64 and payload_backed(contribs):
        return merge_contributions(global_params, contribs, mode, eta=eta, rates=rates)
    return merge_reference(global_params, contribs, mode, eta=eta, rates=rates, acc_dtype=acc_dtype)


def merge_reference(global_params: Mapping[str, np.ndarray], contribs: Sequence[Contribution], mode: str, *,
                    eta: float = 1.0, rates: Sequence[float] | None = None, acc_dtype=np.float64) -> Params:
    """The numpy reference of :func:`merge`."""
    if mode == "mix":
        if rates is None or len(rates) != len(contribs):
            raise ValueError(f"{len(contribs)} contributions but {0 if rates is None else len(rates)} mixing rates")
        theta: Params = _copy(global_params)
        for c, r in zip(contribs, rates):
            extra = sorted(c.mask.keys() - theta.keys())
            if extra:
                raise ValueError(f"unknown parameter key {extra[0]!r} (not in the global model)")
            target = {}
            for k, m in c.mask.items():
                if k not in c.values:
                    raise ValueError(f"values lack covered key {k!r}")
                m = np.asarray(m)
                if m.dtype != np.bool_ or m.shape != theta[k].shape:
                    raise ValueError(f"mask for {k!r} must be a bool array of shape {theta[k].shape}")
                target[k] = np.where(m, np.asarray(c.values[k]), theta[k]).astype(theta[k].dtype, copy=False)
            theta = mix(theta, target, r)
        return theta
    if mode not in ("mean", "delta"):
        raise ValueError(f"unknown merge mode {mode!r}")
    acc = MaskedAccumulator(global_params, acc_dtype)
    for c in contribs:
        acc.add(c)
    return acc.mean(global_params) if mode == "mean" else acc.apply_delta(global_params, eta)
