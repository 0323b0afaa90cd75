"""The aggregator's core: validation, de-duplication, buffering, the server algorithm.

:class:`AggregatorCore` is plain Python (unit-testable, checkpointable); the Ray actor
(:mod:`fedray.aggregation.actor`) is a thin shell over it. An update reaches the method's
server only after :func:`fedray.aggregation.validate.check` (finite values, shapes, dtypes,
masks, keys), the staleness cutoff and the channel's check (its exact declared size and
extra arrays); every rejection is counted with its reason. The core owns the per-client
state store and keeps a valid update's new client state.
"""
from __future__ import annotations

import collections
import math
from typing import Mapping

import numpy as np

from fedray.aggregation import validate
from fedray.aggregation.accumulate import Contribution
from fedray.aggregation.defense import Defense
from fedray.aggregation.kernels import all_finite
from fedray.aggregation.merge import lazy_decode
from fedray.channel import Channel, Expected
from fedray.client.state import ClientStateStore
from fedray.methods.base import Aggregation, Entry, RoundRecord
from fedray.update import Update

__all__ = ["AggregatorCore"]


class AggregatorCore:
    def __init__(self, params: dict[str, np.ndarray], server, evaluator=None, channel: Channel | None = None,
                 defense: Defense | None = None):
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
        self.applied = 0
        self.excluded: list[int] = []  # dispatch ids left out of an aggregation that did not happen
        self._window: list[int] = []  # clients resolved since the last aggregation (async record)
        self._dropped: list[int] = []
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

    def validate(self, header: Update, payload, expected: Expected | None = None) -> tuple[str | None, Entry | None]:
        """``(reason, None)`` for a rejected update, ``(None, entry)`` for a valid one (not buffered)."""
        if header.dispatch_id in self.seen:
            self.rejected["duplicate"] += 1
            return "duplicate", None
        self.seen.add(header.dispatch_id)
        self._window.append(int(header.client_id))
        reason = validate.check(header, payload, self.params, expected.keys if expected is not None else None)
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
        if reason is not None:
            self.rejected[reason] += 1
            return reason, None
        extras = self.channel.expand(payload, expected, lambda k: mask[k] if k in mask else
                                     np.zeros(self.params[k].shape, bool))
        return None, Entry(header, Contribution(values, mask, float(header.num_examples)), extras, payload.state)

    # ------------------------------------------------------------ aggregation
    def aggregate(self, record: RoundRecord | None = None) -> Aggregation | None:
        """Apply the server algorithm to the buffer; bump the version. None if empty."""
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
        out = self.server.aggregate(self.params, entries, record)
        res = out if isinstance(out, Aggregation) else Aggregation(out)
        new = res.params
        bad = [k for k, v in new.items() if np.issubdtype(v.dtype, np.floating) and not all_finite(v)]
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

        def apply():
            nonlocal aggregated
            res = self.aggregate(record if close else None)
            if res is not None:
                aggregated = True
                if res.message is not None:
                    messages.append(res.message)
                if res.included:
                    included.update(res.included)
            if self.excluded:  # left out of an aggregation that did not happen
                included.update({d: 0.0 for d in self.excluded})
                self.excluded.clear()

        checked = []
        for h, p, e in items:
            staleness.append(self.version - h.base_version)
            checked.append(self.validate(h, p, e))
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
                apply()
        buffered = len(self.pending)
        if force:
            apply()
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

    def evaluate(self) -> dict[str, float]:
        """The task's metrics of the current model on the test set."""
        return self.evaluator(self.eval_params())

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
                "window": list(self._window), "dropped": list(self._dropped),
                "server": self.server.state_dict(), "store": self.store.state_dict(),
                "defense": self.defense.state_dict() if self.defense is not None else None}

    def load_state_dict(self, state: Mapping) -> None:
        self.params = {k: np.array(v) for k, v in state["params"].items()}
        self.version = int(state["version"])
        self.seen = set(state["seen"])
        self.pending = list(state["pending"])
        self.rejected = collections.Counter(state["rejected"])
        self.applied = int(state["applied"])
        self._window, self._dropped = list(state["window"]), list(state["dropped"])
        self.server.load_state_dict(state["server"])
        self.store.load_state_dict(state["store"])
        if self.defense is not None and state.get("defense") is not None:
            self.defense.load_state_dict(state["defense"])


def _finite_state(state) -> bool:
    for v in state.values():
        a = np.asarray(v)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            return False
    return True


def _covered(mask, params, key: str) -> int:
    return int(np.count_nonzero(mask[key])) if key in mask else 0
