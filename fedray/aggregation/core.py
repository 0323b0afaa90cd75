"""The aggregator's core: validation, de-duplication, buffering, the server algorithm.

:class:`AggregatorCore` is plain Python (unit-testable, checkpointable); the Ray actor
(:mod:`fedray.aggregation.actor`) is a thin shell over it. An update reaches the method's
server only after :func:`fedray.aggregation.validate.check` (finite values, shapes, dtypes,
masks, keys), the staleness cutoff and the channel's check (its exact declared size and
extra arrays); every rejection is counted with its reason. The core owns the per-client
state store and keeps a valid update's new client state.

The finiteness check is fused into the merge where that is exact: when no defence reads the
values and the server merges every value it gets with a positive weight and no state
(:meth:`~fedray.methods.base.Server.fused_check`), an update aggregated in the call that
admits it is not scanned for NaN/Inf at admission -- its first read is the merge's, and a
non-finite value makes the merged model non-finite. Only then are the unscanned updates
checked; the non-finite ones are rejected (reason ``nonfinite``, as at admission) and the
aggregation is redone without them, or waits for the buffer to fill again, exactly as if
they had been rejected when they arrived. Updates still buffered when the call ends are
scanned then, so every update's verdict is final when :meth:`AggregatorCore.receive` returns.
The new model's own check (never publish a non-finite model) reads nothing again for the tensors
the merge kernel wrote: the kernel sums each tile times zero as it writes it
(:func:`~fedray.aggregation.kernels.finite_outputs`).
"""
from __future__ import annotations

import collections
import math
from typing import Mapping

import numpy as np

from fedray.aggregation import kernels, validate
from fedray.aggregation.accumulate import Contribution
from fedray.aggregation.defense import Defense
from fedray.aggregation.kernels import all_finite
from fedray.aggregation.merge import lazy_decode
from fedray.channel import Channel, Expected
from fedray.client.state import ClientStateStore
from fedray.submodel.encode import Payload
from fedray.methods.base import Aggregation, Entry, RoundRecord
from fedray.update import Update

__all__ = ["AggregatorCore"]


class AggregatorCore:
    def __init__(self, params: dict[str, np.ndarray], server, evaluator=None, channel: Channel | None = None,
                 defense: Defense | None = None, fuse_checks: bool = True):
        self.params = {k: np.array(v) for k, v in params.items()}
        self.server = server
        self.defense = defense
        self.evaluator = evaluator
        self.channel = channel if channel is not None else Channel(self.params)
        self.store = ClientStateStore()
        self.version = 0
        self.seen: set[int] = set()
        self.pending: list[Entry] = []
        self.rejected = collections.Counter()
        self.first_error: str | None = None  # the first application error a client reported
        self.applied = 0
        self.excluded: list[int] = []  # dispatch ids left out of an aggregation that did not happen
        self._window: list[int] = []  # clients resolved since the last aggregation (async record)
        self._dropped: list[int] = []
        self.fuse_checks = fuse_checks  # False: every update is scanned at admission (the reference)
        self._unscanned: set[int] = set()  # buffered dispatches whose finiteness the merge checks
        self._late: list[int] = []  # dispatches rejected after admission in this call (unscanned ones)
        self.message = server.start(self.params)  # for the planner, before the first dispatch

    # ------------------------------------------------------------ intake
    def admit(self, header: Update, payload, expected: Expected | None = None) -> str | None:
        """Validate one update and buffer it; returns the rejection reason or None."""
        reason, entry = self.validate(header, payload, expected)
        if entry is not None:
            self.buffer(entry)
        return reason

    def buffer(self, entry: Entry) -> None:
        if entry.state is not None:
            self.store.put(entry.client_id, entry.state)
        self.pending.append(entry)

    def validate(self, header: Update, payload, expected: Expected | None = None,
                 defer: bool = False) -> tuple[str | None, Entry | None]:
        """``(reason, None)`` for a rejected update, ``(None, entry)`` for a valid one (not buffered).
        ``defer``: leave the finiteness of float32/float64 values to the merge (see the module)."""
        if header.dispatch_id in self.seen:
            self.rejected["duplicate"] += 1
            return "duplicate", None
        self.seen.add(header.dispatch_id)
        self._window.append(int(header.client_id))
        defer = defer and isinstance(payload, Payload) and payload.state is None
        keys = expected.keys if expected is not None else None
        reason = validate.check(header, payload, self.params, keys, finite=not defer)
        limit = self.server.max_staleness()
        if reason is None and limit is not None and self.version - header.base_version > limit:
            reason = "stale"
        values = mask = None
        if reason is None:
            # Kept encoded (decoded per key on demand); the masked-mean rules merge it in tiles.
            values, mask = lazy_decode(payload, {k: self.params[k].shape for k in payload.keys()})
            reason = self.channel.check(payload, expected, lambda k: _covered(mask, self.params, k))
        if reason is None and payload.state is not None and not _finite_state(payload.state):
            reason = "state"
        if reason is not None and defer:  # the reason a full check would have given first
            reason = validate.check(header, payload, self.params, keys) or reason
        if reason is not None:
            self.rejected[reason] += 1
            if reason == "client_error" and self.first_error is None:
                self.first_error = str(header.error)
            return reason, None
        extras = self.channel.expand(payload, expected, lambda k: mask[k] if k in mask else
                                     np.zeros(self.params[k].shape, bool))
        if defer:
            self._unscanned.add(header.dispatch_id)
        return None, Entry(header, Contribution(values, mask, float(header.num_examples)), extras, payload.state)

    # ------------------------------------------------------------ aggregation
    def aggregate(self, record: RoundRecord | None = None, forced: bool = True) -> Aggregation | None:
        """Apply the server algorithm to the buffer; bump the version. None if empty (or, not
        ``forced``, when unscanned non-finite updates were taken out and the trigger no longer fires)."""
        if not self.pending:
            return None
        if record is None:  # asynchronous schedules: the clients resolved since the last aggregation
            record = RoundRecord(self.version, tuple(self._window), tuple(self._dropped))
        entries, left_out = self.pending, []
        if self.defense is not None:
            entries, left_out = self.defense.combine(self.params, entries, self.version)
            if not entries:  # too few for the rule: the model keeps its value
                self.excluded.extend(left_out)
                self.pending.clear()
                return None
        with kernels.finite_outputs() as merged:
            out = self.server.aggregate(self.params, entries, record)
        res = out if isinstance(out, Aggregation) else Aggregation(out)
        new = res.params
        if not self.server.fused_check():  # it may change the merge's arrays in place: read them all
            merged = {}
        bad = [k for k, v in new.items() if np.issubdtype(v.dtype, np.floating) and not _finite(v, merged)]
        if bad and self._scan():  # non-finite updates the merge met, now rejected: again without them
            if self.pending and (forced or self.server.trigger(len(self.pending))):
                return self.aggregate(record, forced)
            return None
        self._unscanned.difference_update(e.update.dispatch_id for e in entries)  # finite: so was all it merged
        if bad:  # never publish a non-finite model: drop this aggregation
            self.rejected["nonfinite_result"] += len(self.pending)
            self.pending.clear()
            return None
        if left_out:
            res.included = {**(res.included or {}), **{d: 0.0 for d in left_out}}
        self.params = new
        self.applied += len(entries)
        self.pending.clear()
        self._window, self._dropped = [], []
        self.version += 1
        return res

    def receive(self, items, *, force: bool = False, evaluate: bool = True, close: bool = False,
                record: RoundRecord | None = None, dropped=()) -> dict:
        """Admit ``items`` = [(header, payload, expected)] in order; aggregate when the
        server's trigger fires after an admission, or at the end if ``force``. ``close``
        (synchronous rounds): the round always ends in a new version, the unchanged model
        when nothing could be aggregated; ``record`` is then the round's. ``dropped``:
        clients resolved without an update since the last call (asynchronous record)."""
        self._dropped.extend(int(c) for c in dropped)
        results, staleness, messages, included, moves = [], [], [], {}, {}
        aggregated = False

        def apply(forced: bool):
            nonlocal aggregated
            res = self.aggregate(record if close else None, forced)
            if res is not None:
                aggregated = True
                if res.message is not None:
                    messages.append(res.message)
                if res.included:
                    included.update(res.included)
            if self.excluded:  # left out of an aggregation that did not happen
                included.update({d: 0.0 for d in self.excluded})
                self.excluded.clear()

        defer = self.fuse_checks and self.defense is None and self.server.fused_check()
        checked = []
        for h, p, e in items:
            staleness.append(self.version - h.base_version)
            checked.append(self.validate(h, p, e, defer))
        valid = [entry for _, entry in checked if entry is not None]
        screened = iter(self.defense.screen(self.params, valid, self.version) if self.defense is not None
                        else [(entry, None, math.nan) for entry in valid])
        for (h, p, e), (reason, entry) in zip(items, checked):
            if entry is not None:
                entry, reason, move = next(screened)
                if math.isfinite(move):
                    moves[h.dispatch_id] = move
                if reason is not None:
                    self.rejected[reason] += 1
                else:
                    self.buffer(entry)
            results.append((h.dispatch_id, reason))
            if self.pending and self.server.trigger(len(self.pending)):
                apply(False)
        if not force:  # what stays buffered is scanned now: its verdict is final when this call returns
            self._scan()
        buffered, late = len(self.pending), len(self._late)
        if force:
            apply(True)
            buffered -= len(self._late) - late  # rejected by the forced aggregation's scan
        self._unscanned.clear()  # every update of the call is aggregated or scanned by now
        if self._late:
            rejected_late = set(self._late)
            results = [(d, "nonfinite" if d in rejected_late else r) for d, r in results]
            self._late.clear()
        if close and not aggregated:
            self.version += 1
            self._window, self._dropped = [], []
            aggregated = True
        out = {"version": self.version, "aggregated": aggregated, "results": results, "staleness": staleness,
               "buffer": buffered, "rejected": dict(self.rejected)}
        if moves:
            out["moves"] = moves
        if messages:
            out["messages"] = messages
        if included:
            out["included"] = included
        if aggregated and evaluate and self.evaluator is not None:
            out["metrics"] = self.evaluate()
        return out

    def _scan(self) -> bool:
        """Scan the buffered updates whose finiteness was left to the merge; reject (count, take
        out, report) the non-finite ones. True if there were any."""
        if not self._unscanned:
            return False
        ids = [e.update.dispatch_id for e in self.pending]
        late = [d for d, e in zip(ids, self.pending) if d in self._unscanned
                and not validate.deferred_finite(e.contribution.values.source.payload)]
        keep = [e for d, e in zip(ids, self.pending) if d not in late]
        self._unscanned.difference_update(ids)  # (the call's later updates are not buffered yet)
        if not late:
            return False
        self.rejected["nonfinite"] += len(late)
        self._late.extend(late)
        self.pending[:] = keep
        return True

    def evaluate(self) -> dict[str, float]:
        """The task's metrics of the current model on the test set (the server sees the primary one)."""
        metrics = self.evaluator(self.eval_params())
        self.server.on_eval(self.params, float(metrics[self.evaluator.task.primary]))
        return metrics

    def eval_params(self) -> dict[str, np.ndarray]:
        """The model as evaluated and saved (the server's ``eval_params``)."""
        return self.server.eval_params(self.params, self.evaluator)

    def client_metrics(self, clients) -> dict[int, dict]:
        """Each client's metrics of its model (the server's ``personalize``) on its own data."""
        base = self.eval_params()
        return {int(c): self.evaluator.on_client(int(c), self.server.personalize(base, self.store.peek(c)))
                for c in clients}

    def states_for(self, tasks):
        """``tasks`` with their clients' states from the store (methods with client state)."""
        from dataclasses import replace

        return [replace(t, state=self.store.get(t.assignment.client_id)) for t in tasks]

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"params": self.params, "version": self.version, "seen": sorted(self.seen),
                "pending": self.pending, "rejected": dict(self.rejected), "applied": self.applied,
                "first_error": self.first_error,
                "window": list(self._window), "dropped": list(self._dropped),
                "server": self.server.state_dict(), "store": self.store.state_dict(),
                "defense": self.defense.state_dict() if self.defense is not None else None}

    def load_state_dict(self, state: Mapping) -> None:
        self.params = {k: np.array(v) for k, v in state["params"].items()}
        self.version = int(state["version"])
        self.seen = set(state["seen"])
        self.pending = list(state["pending"])
        self.rejected = collections.Counter(state["rejected"])
        self.first_error = state.get("first_error")
        self.applied = int(state["applied"])
        self._window, self._dropped = list(state["window"]), list(state["dropped"])
        self.server.load_state_dict(state["server"])
        self.store.load_state_dict(state["store"])
        if self.defense is not None and state.get("defense") is not None:
            self.defense.load_state_dict(state["defense"])


def _finite(v: np.ndarray, merged: dict) -> bool:
    """No NaN or Inf in ``v``: the merge kernel's verdict if it wrote ``v`` (no second read), else a scan."""
    hit = merged.get(id(v))
    return hit[1] if hit is not None and hit[0] is v else all_finite(v)


def _finite_state(state) -> bool:
    for v in state.values():
        a = np.asarray(v)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            return False
    return True


def _covered(mask, params, key: str) -> int:
    return int(np.count_nonzero(mask[key])) if key in mask else 0
