"""The channel: the one place where bytes between clients and the server are counted.

Both the cost of a dispatch (its virtual time) and the run's totals come from here, so they
agree by construction:

- :meth:`Channel.downlink_nbytes`: what a client receives: the encoding of the submodel's
  ``download`` mask (the whole model when None), or the sum of its shared ``pieces``, plus
  the arrays it ``receives`` beside the model;
- :meth:`Channel.uplink_nbytes`: what it sends: the encoding of the trained coordinates
  (:func:`fedray.submodel.encode.payload_nbytes`; a compact submodel whose channels the client
  picks is counted on a slice of the same sizes, which encodes to the same bytes) plus the
  declared extra arrays;
- :meth:`Channel.egress`: server egress of one download: unicast bytes, or the pieces of a
  model version not sent yet (each piece goes once to every client that needs it).

The client encodes through :meth:`Channel.encode` and the server checks through
:meth:`Channel.check`: a payload whose size differs from what its submodel declared, or
whose extra arrays are not the declared ones (name, dtype, length, index range), is rejected
with a reason (``size``, ``extras``) and never reaches a rule.

Stages (:class:`Stage`) plug in before and after encoding on the client and after the check
on the server: compression, differential-privacy noise or secure-aggregation masking change
the values or the payload there, and say how they change its size (``uplink_nbytes``), so
the costs stay exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from fedray.submodel.encode import Payload, encode, payload_nbytes
from fedray.submodel.submodel import Extra, Submodel

__all__ = ["Channel", "Stage", "Expected"]


class Stage:
    """A step of the channel (compression, DP noise, secure masking). Every hook defaults to
    doing nothing; ``uplink_nbytes`` must return the exact size after the stage."""

    def before_encode(self, values: dict, mask, info: Mapping) -> dict:
        return values

    def after_encode(self, payload: Payload, info: Mapping) -> Payload:
        return payload

    def uplink_nbytes(self, nbytes: int, submodel: Submodel) -> int:
        return nbytes

    def after_check(self, payload: Payload, info: Mapping) -> Payload:
        """Server side, after the payload passed the checks (e.g. undo a compression)."""
        return payload


@dataclass(frozen=True)
class Expected:
    """What the server expects of one update (made at dispatch): the payload's keys (None:
    any key of the model), its exact size in bytes and its extra arrays."""

    keys: tuple[str, ...] | None
    nbytes: int
    extras: tuple[Extra, ...] = ()


class Channel:
    """Bytes of submodels over the run's model (``like``: shapes and dtypes of its state)."""

    def __init__(self, like: Mapping[str, np.ndarray], stages: Sequence[Stage] = ()):
        self.like = like
        self.stages = tuple(stages)
        self._dense = payload_nbytes(like)
        self._masks: dict[int, tuple] = {}  # id(mask) -> (mask, nbytes): planners reuse their masks

    # ------------------------------------------------------------ sizes
    def mask_nbytes(self, mask) -> int:
        """Encoded bytes of the model under ``mask`` (None: dense), cached per mask object."""
        if mask is None:
            return self._dense
        hit = self._masks.get(id(mask))
        if hit is None or hit[0] is not mask:
            if len(self._masks) > 4096:
                self._masks.clear()
            hit = self._masks[id(mask)] = (mask, payload_nbytes(self.like, mask))
        return hit[1]

    def downlink_nbytes(self, submodel: Submodel) -> int:
        extra = self.extras_nbytes(submodel.receives, None)
        if submodel.pieces is not None:
            return int(sum(n for _, n in submodel.pieces)) + extra
        return self.mask_nbytes(submodel.download) + extra

    def sent_mask(self, submodel: Submodel, model=None):
        """The mask whose encoding the client sends (a slice of the same sizes for client-chosen widths)."""
        if submodel.widths is not None:
            return model.slice_mask(submodel.widths)
        return submodel.mask

    def uplink_nbytes(self, submodel: Submodel, model=None) -> int:
        mask = self.sent_mask(submodel, model)
        n = self.mask_nbytes(mask) + self.extras_nbytes(submodel.extras, mask)
        for s in self.stages:
            n = s.uplink_nbytes(n, submodel)
        return int(n)

    def extras_nbytes(self, extras: Sequence[Extra], mask) -> int:
        if not extras:
            return 0
        return sum(e.nbytes(lambda k: _covered(mask, self.like, k)) for e in extras)

    def expected(self, submodel: Submodel, nbytes: int, model=None) -> Expected:
        mask = self.sent_mask(submodel, model)
        keys = None if mask is None else tuple(k for k, v in mask.items() if v.any())
        return Expected(keys, int(nbytes), tuple(submodel.extras))

    @staticmethod
    def egress(pieces, client_bytes: int, version: int, sent: set) -> int:
        """Server egress of one download: ``client_bytes`` (unicast), or the pieces of model
        ``version`` not in ``sent`` yet (which it adds)."""
        if pieces is None:
            return int(client_bytes)
        out = 0
        for key, n in pieces:
            if (version, key) not in sent:
                sent.add((version, key))
                out += int(n)
        return out

    # ------------------------------------------------------------ client side
    def encode(self, values: dict, mask, extras: Mapping[str, np.ndarray], info: Mapping | None = None) -> Payload:
        info = info or {}
        for s in self.stages:
            values = s.before_encode(values, mask, info)
        payload = Payload(encode(values, mask).entries, {k: np.asarray(v) for k, v in extras.items()})
        for s in self.stages:
            payload = s.after_encode(payload, info)
        return payload

    # ------------------------------------------------------------ server side
    def check(self, payload: Payload, expected: Expected | None, covered) -> str | None:
        """``size`` or ``extras`` when the payload is not what was declared, else None.
        ``covered(key)``: coordinates of ``key`` the (validated) payload covers."""
        if expected is None:
            return None
        if payload.nbytes != expected.nbytes:
            return "size"
        declared = {e.name: e for e in expected.extras}
        if set(payload.aux) != set(declared):
            return "extras"
        for name, v in payload.aux.items():
            e = declared[name]
            v = payload.aux[name]
            if not isinstance(v, np.ndarray) or v.dtype != np.dtype(e.dtype):
                return "extras"
            want = e.shape if e.shape is not None else (covered(e.over),)
            if tuple(v.shape) != tuple(want):
                return "extras"
            if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
                return "extras"
            if e.bound is not None and (v.ndim != 1 or (v.size and (v[0] < 0 or v[-1] >= e.bound
                                                                  or np.any(np.diff(v) <= 0)))):
                return "extras"
        for s in self.stages:
            payload = s.after_check(payload, {})
        return None

    @staticmethod
    def expand(payload: Payload, expected: Expected | None, mask_of) -> dict[str, np.ndarray]:
        """The extra arrays as the server method sees them: ``over`` arrays scattered to full
        shape (zeros outside the mask, ``mask_of(key)``), the others as sent."""
        if not payload.aux:
            return {}
        declared = {e.name: e for e in expected.extras} if expected is not None else {}
        out = {}
        for name, v in payload.aux.items():
            e = declared.get(name)
            if e is not None and e.over is not None:
                m = mask_of(e.over)
                full = np.zeros(m.shape, dtype=v.dtype)
                full[m] = v
                out[name] = full
            else:
                out[name] = v
        return out


def _covered(mask, like, key: str) -> int:
    if mask is None:
        return int(np.size(like[key]))
    m = mask.get(key)
    return 0 if m is None else int(np.count_nonzero(m))
