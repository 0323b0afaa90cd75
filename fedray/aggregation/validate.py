"""Update validation: nothing touches the buffer before it passes here.

``check(header, payload, model, expected)`` returns ``None`` for a valid
update or a short reason code (counted per reason by the aggregator):

=================  ===============================================
``client_error``   the client reported an application error
``zero_examples``  example count <= 0
``missing_key``    a tensor the assignment trains is absent
``unknown_key``    a tensor that the model does not have / the assignment did not send
``shape``          a tensor or index block has the wrong shape
``dtype``          a tensor has a dtype other than the model's
``mask_mismatch``  indices out of range, duplicated, or not matching the values
                   (a bitmask of the wrong length, or whose count differs from the values)
``nonfinite``      NaN or Inf among the values
``stale``          older than the method's staleness cutoff
``size``           the payload's bytes differ from what its submodel declared (the channel)
``extras``         extra arrays other than the declared ones (name, dtype, length, indices)
``state``          a non-finite client state
=================  ===============================================
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from fedray.aggregation.kernels import DTYPES, all_finite, popcount, popcounts, strictly_increasing
from fedray.submodel.encode import Entry, Payload
from fedray.update import Update

# every reason the aggregator counts; "nonfinite_result": an aggregation that would have made the
# model non-finite is discarded with its updates
REASONS = ("duplicate", "stale", "client_error", "zero_examples", "missing_key", "unknown_key",
           "shape", "dtype", "mask_mismatch", "nonfinite", "size", "extras", "state", "nonfinite_result")


def _check_entry(e: Entry, ref: np.ndarray, finite: bool = True, count: int | None = None) -> str | None:
    """``count``: the set bits of a bitmask entry's mask, when counted already (:func:`_bit_counts`)."""
    if not isinstance(e, Entry) or not isinstance(e.values, np.ndarray):
        return "mask_mismatch"
    if e.values.dtype != ref.dtype:
        return "dtype"
    if e.kind == "dense":
        if e.values.shape != ref.shape:
            return "shape"
    elif e.kind == "slices":
        if len(e.index) != ref.ndim:
            return "shape"
        for ax, ix in enumerate(e.index):
            if ix.ndim != 1 or not np.issubdtype(ix.dtype, np.integer):
                return "mask_mismatch"
            if not strictly_increasing(ix, 0, ref.shape[ax]):
                return "mask_mismatch"
        if e.values.shape != tuple(len(ix) for ix in e.index):
            return "mask_mismatch"
    elif e.kind == "sparse":
        if len(e.index) != 1:
            return "mask_mismatch"
        ix = e.index[0]
        if ix.ndim != 1 or e.values.shape != ix.shape or not np.issubdtype(ix.dtype, np.integer):
            return "mask_mismatch"
        if not strictly_increasing(ix, 0, ref.size):
            return "mask_mismatch"
    elif e.kind == "bitmask":
        bits = e.index[0] if len(e.index) == 1 else None
        if bits is None or bits.dtype != np.uint8 or bits.ndim != 1 or len(bits) != -(-ref.size // 8):
            return "mask_mismatch"
        if e.values.ndim != 1 or (popcount(bits) if count is None else count) != len(e.values):
            return "mask_mismatch"
        if ref.size % 8 and bits[-1] >> (ref.size % 8):  # padding bits (the high ones) must be clear
            return "mask_mismatch"
    else:
        return "mask_mismatch"
    if np.issubdtype(e.values.dtype, np.floating) and (finite or e.values.dtype not in DTYPES) \
            and not all_finite(e.values):
        return "nonfinite"
    return None


def deferred_finite(payload: Payload) -> bool:
    """The check ``check(..., finite=False)`` leaves out: are the payload's float32/float64 values finite?"""
    return all(all_finite(e.values) for e in payload.entries.values() if e.values.dtype in DTYPES)


def check(header: Update, payload: Payload | None, model: Mapping[str, np.ndarray],
          expected: Iterable[str] | None = None, finite: bool = True) -> str | None:
    """Reason code if the update must be rejected, else None. ``finite=False`` leaves the
    finiteness of float32/float64 values (what the merge kernels read) to the caller."""
    if header.error is not None:
        return "client_error"
    if not header.num_examples or header.num_examples <= 0:
        return "zero_examples"
    if payload is None or not isinstance(payload, Payload):
        return "missing_key"
    keys = set(payload.entries)
    if expected is not None:
        exp = set(expected)
        if exp - keys:
            return "missing_key"
        if keys - exp:
            return "unknown_key"
    if keys - set(model):
        return "unknown_key"
    counts = _bit_counts(payload)
    for k, e in payload.entries.items():
        reason = _check_entry(e, model[k], finite, counts.get(k))
        if reason:
            return reason
    return None


def _bit_counts(payload: Payload) -> dict[str, int]:
    """Set bits of every well-formed packed mask of ``payload`` (uint8, 1-D), counted in one call."""
    keys = [k for k, e in payload.entries.items() if isinstance(e, Entry) and e.kind == "bitmask"
            and len(e.index) == 1 and isinstance(e.index[0], np.ndarray) and e.index[0].dtype == np.uint8
            and e.index[0].ndim == 1]
    return dict(zip(keys, popcounts([payload.entries[k].index[0] for k in keys]).tolist())) if keys else {}
