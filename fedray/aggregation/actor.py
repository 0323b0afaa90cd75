"""Aggregator: owns the global model, its version and the update buffer.

:class:`AggregatorCore` is plain Python (unit-testable, checkpointable);
:class:`AggregatorActor` is the thin Ray shell: it publishes each model version
with exactly one ``ray.put`` and hands out the reference (a model below Ray's inline
size travels by value inside each call instead), and it dispatches synchronous
rounds to the client actors itself.
"""
from __future__ import annotations

import collections
import time
from typing import Mapping

import numpy as np
import ray
import torch

from fedray.aggregation import rules, validate
from fedray.aggregation.buffer import lazy_decode
from fedray.aggregation.kernels import all_finite
from fedray.client.actor import train_call
from fedray.client.trainer import evaluate, load_params, resolve_device
from fedray.runtime.cluster import fetch_lists
from fedray.submodel.encode import Payload
from fedray.update import Update


INLINE_BYTES = 100 * 1024
"""Ray's ``max_direct_call_object_size``: a smaller task argument travels inside the task
(no object-store round trip); a model this small is sent by value, a larger one is put once
per version and sent by reference."""


class Evaluator:
    """Global test-set accuracy and loss of a parameter dict."""

    def __init__(self, model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: str = "auto"):
        self.model, self.x, self.y = model, x, y
        self.device = resolve_device(device)

    def __call__(self, params: Mapping[str, np.ndarray]) -> tuple[float, float]:
        load_params(self.model, params)
        return evaluate(self.model, self.x, self.y, device=self.device)


class AggregatorCore:
    """Validation, de-duplication, buffering and the method's rule."""

    def __init__(self, params: dict[str, np.ndarray], method, evaluator: Evaluator | None = None):
        self.params = {k: np.array(v) for k, v in params.items()}
        self.method = method
        self.evaluator = evaluator
        self.version = 0
        self.seen: set[int] = set()
        self.pending: list[tuple[Update, rules.Contribution]] = []
        self.rejected = collections.Counter()
        self.applied = 0

    # ------------------------------------------------------------ intake
    def admit(self, header: Update, payload, expected=None) -> str | None:
        """Validate one update and buffer it; returns the rejection reason or None."""
        if header.dispatch_id in self.seen:
            self.rejected["duplicate"] += 1
            return "duplicate"
        self.seen.add(header.dispatch_id)
        reason = validate.check(header, payload, self.params, expected)
        limit = self.method.max_staleness()
        if reason is None and limit is not None and self.version - header.base_version > limit:
            reason = "stale"
        if reason is not None:
            self.rejected[reason] += 1
            return reason
        # Kept encoded (decoded per key on demand); the masked-mean rules merge it in tiles.
        values, mask = lazy_decode(payload, {k: self.params[k].shape for k in payload.keys()})
        if payload.aux:  # aux arrays (PR-FL's sq_grads) reach the method on the header
            header = header.with_payload(Payload({}, dict(payload.aux)))
        self.pending.append((header, rules.Contribution(values, mask, float(header.num_examples))))
        return None

    # ------------------------------------------------------------ aggregation
    def aggregate(self) -> bool:
        """Apply the method's rule to the buffer; bump the version. False if empty."""
        if not self.pending:
            return False
        new = self.method.aggregate(self.params, self.pending, self.version)
        bad = [k for k, v in new.items() if np.issubdtype(v.dtype, np.floating) and not all_finite(v)]
        if bad:  # never publish a non-finite model: drop this aggregation
            self.rejected["nonfinite_result"] += len(self.pending)
            self.pending.clear()
            return False
        self.params = new
        self.applied += len(self.pending)
        self.pending.clear()
        self.version += 1
        return True

    def receive(self, items, *, force: bool = False, evaluate: bool = True, close: bool = False) -> dict:
        """Admit ``items`` = [(header, payload, expected_keys)] in order; aggregate when
        the method's trigger fires after an admission, or at the end if ``force``.
        ``close`` (synchronous rounds): the round always ends in a new version, the
        unchanged model when nothing could be aggregated."""
        results, aggregated, staleness = [], False, []
        for h, p, e in items:
            staleness.append(self.version - h.base_version)
            results.append((h.dispatch_id, self.admit(h, p, e)))
            if self.pending and self.method.trigger(len(self.pending)):
                aggregated = self.aggregate() or aggregated
        buffered = len(self.pending)
        if force:
            aggregated = self.aggregate() or aggregated
        if close and not aggregated:
            self.version += 1
            aggregated = True
        out = {"version": self.version, "aggregated": aggregated, "results": results, "staleness": staleness,
               "buffer": buffered, "rejected": dict(self.rejected)}
        if aggregated:
            published = self.public_state()
            if published is not None:
                out["method_state"] = published
        if aggregated and evaluate and self.evaluator is not None:
            out["accuracy"], out["loss"] = self.evaluate()
        return out

    def evaluate(self) -> tuple[float, float]:
        """Test accuracy and loss of the current model."""
        return self.evaluator(self.params)

    def public_state(self):
        """What the method publishes to its driver-side instance (None: nothing new)."""
        return self.method.public_state(self.params, self.version)

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"params": self.params, "version": self.version, "seen": sorted(self.seen),
                "pending": self.pending, "rejected": dict(self.rejected), "applied": self.applied,
                "method": self.method.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.params = {k: np.array(v) for k, v in state["params"].items()}
        self.version = int(state["version"])
        self.seen = set(state["seen"])
        self.pending = list(state["pending"])
        self.rejected = collections.Counter(state["rejected"])
        self.applied = int(state["applied"])
        self.method.load_state_dict(state["method"])


@ray.remote
class AggregatorActor:
    """Ray shell over :class:`AggregatorCore`; one ``ray.put`` per model version."""

    def __init__(self, cfg, params, test_data: dict, input_shape, num_classes, spec=None):
        from fedray import seeding
        from fedray.methods import registry
        from fedray.models.zoo import build_model

        torch.set_num_threads(cfg.cluster.torch_threads)
        torch.manual_seed(seeding.derive(cfg.seed, "init"))
        model = build_model(cfg.model.name, tuple(input_shape), num_classes, options=cfg.model.options)
        method = registry.get(cfg.method.name)(cfg, spec)
        self.core = AggregatorCore(params, method, Evaluator(model, test_data["x"], test_data["y"], cfg.runtime.device))
        self.puts = 0
        self._ref = None
        self._ref_version = -1
        self.actors, self.shared = [], []
        self.inline = sum(v.nbytes for v in params.values()) < INLINE_BYTES
        self.inlined, self._inline_version = 0, -1  # versions sent by value (small models)

    def model_ref(self) -> list:
        """``[ref]`` to the current version (wrapped so Ray does not resolve it)."""
        if self._ref_version != self.core.version:
            self._ref = ray.put(self.core.params)
            self._ref_version = self.core.version
            self.puts += 1
        return [self._ref]

    def receive(self, calls: list, items: list, force: bool = False, evaluate: bool = True) -> dict:
        """``calls`` = [[headers_ref, payload refs...]], one list per client-actor call; ``items`` =
        [(call index, slot, expected_keys)], in the order to admit them. Headers and payloads
        are fetched here (zero-copy); an update whose actor or node was lost is skipped (the
        driver records it as a drop)."""
        out = self._receive(calls, items, force=force, evaluate=evaluate)
        out["done_at"] = time.time()
        out["model_ref"] = self.model_ref() if out["aggregated"] else None
        return out

    def _receive(self, calls: list, items: list, **kwargs) -> dict:
        return self._admit_lists(self._fetch(calls), items, **kwargs)

    @staticmethod
    def _fetch(calls: list) -> list:
        """Per call ``[headers, payloads...]``, or the exception that lost the call."""
        got = fetch_lists([ref for refs in calls for ref in refs])
        out = []
        for refs in calls:
            vals = [got[r] for r in refs]
            out.append(next((v for v in vals if isinstance(v, Exception)), vals))
        return out

    def _admit_lists(self, lists: list, items: list, **kwargs) -> dict:
        triples = [(lists[c][0][i], lists[c][1 + i], e) for c, i, e in items if not isinstance(lists[c], Exception)]
        return self.core.receive(triples, **kwargs)

    def attach(self, actors: list, shared: list) -> None:
        """The client actors and the data references, for the rounds this actor dispatches."""
        self.actors, self.shared = actors, shared

    def rounds(self, plans: list) -> list[dict]:
        """Synchronous rounds back to back, dispatched from here: ``plans`` = [(dispatch, items,
        evaluate)] with ``dispatch`` = [(actor index, tasks)], one training call per client actor,
        and ``items`` = [(call index, slot, expected keys)] in admission order. The results come
        straight back to this actor, so the driver is off the rounds' path. Each round's
        training starts as soon as the previous round's model exists, and that model is
        evaluated while the clients train. Every round ends in a new version (``close``).
        Returns per round the aggregation info, ``done_at`` (``time.time()`` when its result was
        complete) and ``headers``: per call, its list of update headers or the exception that
        lost it (actor or node gone after Ray's retries)."""
        outs = []
        calls = self._dispatch(plans[0][0])
        for k, (_, items, due) in enumerate(plans):
            lists = self._fetch(calls)
            out = self._admit_lists(lists, items, force=True, evaluate=False, close=True)
            out["headers"] = [x if isinstance(x, Exception) else x[0] for x in lists]
            if k + 1 < len(plans):
                calls = self._dispatch(plans[k + 1][0])
            if due:
                out["accuracy"], out["loss"] = self.core.evaluate()
            out["done_at"] = time.time()
            outs.append(out)
        return outs

    def _dispatch(self, dispatch: list) -> list:
        """One training call per ``(actor index, tasks)`` with the current version."""
        if not dispatch:  # every client of the round dropped out or missed the deadline
            return []
        if self.inline:  # by value: Ray copies it into each call, no object-store round trip
            ref = self.core.params
            if self._inline_version != self.core.version:
                self._inline_version = self.core.version
                self.inlined += 1
        else:
            ref = self.model_ref()[0]
        return [train_call(self.actors[i], ref, tasks, self.shared) for i, tasks in dispatch]

    def params(self) -> dict:
        return self.core.params

    def public_state(self):
        return self.core.public_state()

    def stats(self) -> dict:
        return {"version": self.core.version, "puts": self.puts, "inlined": self.inlined,
                "applied": self.core.applied,
                "rejected": dict(self.core.rejected)}

    def state_dict(self) -> dict:
        return self.core.state_dict()

    def load_state_dict(self, state) -> None:
        self.core.load_state_dict(state)
        self._ref_version = -1
