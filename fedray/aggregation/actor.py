"""The aggregator actor: a thin Ray shell over :class:`~fedray.aggregation.core.AggregatorCore`.

It owns the global model, its version, the update buffer and the per-client store. It
publishes each model version with exactly one ``ray.put`` and hands out the reference (a
model below Ray's inline size travels by value inside each call instead), and it dispatches
synchronous rounds -- and every dispatch of a method with client state -- to the client
actors itself, attaching each task's client state and the server's broadcast arrays.

With ``cluster.num_client_actors: 0`` (synchronous methods) there are no client actors: this
actor trains each round's clients itself, with the same :class:`~fedray.client.worker.ClientWorker`
a client actor runs, on read-only views of its model. No Ray call or copy per round, which is
what a round costs when the model is small; the numbers are the same as with client actors.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import ray
import torch

from fedray.aggregation.core import AggregatorCore
from fedray.aggregation.evaluate import Evaluator
from fedray.channel import Channel
from fedray.client.actor import train_call
from fedray.runtime.cluster import fetch_lists

__all__ = ["AggregatorActor", "INLINE_BYTES"]


class _Here(list):
    """A training call run in this process: ``[headers, payloads...]``, what a client actor returns."""


def _frozen(arrays: dict | None) -> dict | None:
    """Read-only views of a dict of arrays (None stays None)."""
    if arrays is None:
        return None
    out = {}
    for k, v in arrays.items():
        out[k] = np.asarray(v).view()
        out[k].flags.writeable = False
    return out

INLINE_BYTES = 100 * 1024
"""Ray's ``max_direct_call_object_size``: a smaller task argument travels inside the task
(no object-store round trip); a model this small is sent by value, a larger one is put once
per version and sent by reference."""


@ray.remote
class AggregatorActor:
    def __init__(self, cfg, params, test_data: dict, input_shape, num_classes, examples=None):
        from fedray import seeding
        from fedray.aggregation.defense import Defense
        from fedray.methods import registry
        from fedray.methods.base import ServerContext
        from fedray.models.factory import build_model
        from fedray.models.info import ModelInfo
        from fedray.tasks import get_task

        torch.set_num_threads(cfg.cluster.torch_threads)
        torch.manual_seed(seeding.derive(cfg.seed, "init"))
        model = build_model(cfg.model.name, tuple(input_shape), num_classes, options=cfg.model.options)
        info = ModelInfo(model, test_data["x"][:2], name=cfg.model.name, options=cfg.model.options,
                         num_outputs=num_classes)
        method = registry.get(cfg.method.name)
        self.stateful = method.client_state
        server = method.Server(ServerContext(cfg, cfg.method.name, cfg.method.params, info, cfg.data.num_clients))
        evaluator = Evaluator(model, get_task(cfg.task.name, cfg.task.options), test_data["x"], test_data["y"],
                              cfg.runtime.device)
        self.core = AggregatorCore(params, server, evaluator, Channel(info.like), Defense(cfg, server, examples))
        self.puts = 0
        self._ref = None
        self._ref_version = -1
        self.actors, self.shared = [], []
        self.worker_args, self.here = (cfg, input_shape, num_classes), None  # here: the in-process worker
        self.inline = sum(v.nbytes for v in params.values()) < INLINE_BYTES
        self.inlined, self._inline_version = 0, -1  # versions sent by value (small models)

    def start(self) -> dict:
        """``{"model_ref": [ref], "message": the server's first message for the planner}``."""
        return {"model_ref": self.model_ref(), "message": self.core.message}

    def model_ref(self) -> list:
        """``[ref]`` to the current version (wrapped so Ray does not resolve it)."""
        if self._ref_version != self.core.version:
            self._ref = ray.put(self.core.params)
            self._ref_version = self.core.version
            self.puts += 1
        return [self._ref]

    def attach(self, actors: list, shared: list) -> None:
        """The client actors and the data references, for the rounds this actor dispatches
        (and the training data for per-client evaluation and batch-norm statistics)."""
        self.actors, self.shared = list(actors), shared
        data, partitions = ray.get(shared)
        self.core.evaluator.train = (data["x"], data["y"], partitions)
        if self.actors == [None]:  # no client actors (cluster.num_client_actors: 0): the clients train here
            from fedray.client.worker import ClientWorker

            cfg, input_shape, num_classes = self.worker_args
            self.here = ClientWorker(cfg, data, partitions, input_shape, num_classes)

    # ------------------------------------------------------------ asynchronous schedules
    def receive(self, calls: list, items: list, force: bool = False, evaluate: bool = True, dropped=()) -> dict:
        """``calls`` = [[headers_ref, payload refs...]], one list per client-actor call; ``items`` =
        [(call index, slot, expected)], in the order to admit them. Headers and payloads are
        fetched here (zero-copy); an update whose actor or node was lost is skipped (the
        driver records it as a drop)."""
        out = self._admit_lists(self._fetch(calls), items, force=force, evaluate=evaluate, dropped=dropped)
        out["done_at"] = time.time()
        out["model_ref"] = self.model_ref() if out["aggregated"] else None
        return out

    def dispatch(self, dispatch: list, model: list | None = None) -> list:
        """Training calls sent from here (methods with client state): their reference lists.
        ``model``: ``[ref]`` of the version they train (default: the current one)."""
        return self._dispatch(dispatch, None if model is None else model[0])

    @staticmethod
    def _fetch(calls: list) -> list:
        """Per call ``[headers, payloads...]``, or the exception that lost the call."""
        got = fetch_lists([ref for refs in calls if not isinstance(refs, _Here) for ref in refs])
        out = []
        for refs in calls:
            if isinstance(refs, _Here):
                out.append(list(refs))
                continue
            vals = [got[r] for r in refs]
            out.append(next((v for v in vals if isinstance(v, Exception)), vals))
        return out

    def _admit_lists(self, lists: list, items: list, **kwargs) -> dict:
        triples = [(lists[c][0][i], lists[c][1 + i], e) for c, i, e in items if not isinstance(lists[c], Exception)]
        return self.core.receive(triples, **kwargs)

    # ------------------------------------------------------------ synchronous rounds
    def rounds(self, plans: list) -> list[dict]:
        """Synchronous rounds back to back, dispatched from here: ``plans`` = [(dispatch, items,
        evaluate, record, client_eval)] with ``dispatch`` = [(actor index, tasks)], one training
        call per client actor, ``items`` = [(call index, slot, expected)] in admission order and
        ``record`` the round's :class:`~fedray.methods.base.RoundRecord`. The results come
        straight back to this actor, so the driver is off the rounds' path. Each round's
        training starts as soon as the previous round's model exists, and that model is
        evaluated while the clients train. Every round ends in a new version (``close``).
        Returns per round the aggregation info, ``done_at`` (``time.time()`` when its result
        was complete) and ``headers``: per call, its list of update headers.

        A round whose training call was lost with its actor (after Ray's restarts and retries)
        is not admitted: the results end with ``{"lost": [actor indices]}`` and the driver sends
        that round and the later ones again. A call whose first round is not the next version
        (a call queued behind a lost round) returns ``[{"skipped": True}]``."""
        if plans[0][3].version != self.core.version:
            return [{"skipped": True}]
        outs = []
        calls = self._dispatch(plans[0][0])
        for k, (dispatch, items, due, record, clients) in enumerate(plans):
            lists = self._fetch(calls)
            lost = [dispatch[c][0] for c, x in enumerate(lists) if isinstance(x, Exception)]
            if lost:
                outs.append({"lost": lost})
                return outs
            out = self._admit_lists(lists, items, force=True, evaluate=False, close=True, record=record)
            out["headers"] = [x[0] for x in lists]
            if k + 1 < len(plans):
                calls = self._dispatch(plans[k + 1][0])
            if due:
                out["metrics"] = self.core.evaluate()
            if clients:
                out["clients"] = self.core.client_metrics(clients)
            out["done_at"] = time.time()
            outs.append(out)
        return outs

    def _dispatch(self, dispatch: list, ref=None) -> list:
        """One training call per ``(actor index, tasks)`` with the current version (or ``ref``'s)."""
        if not dispatch:  # every client of the round dropped out or missed the deadline
            return []
        broadcast = self.core.server.broadcast()
        if self.stateful:
            dispatch = [(i, self.core.states_for(tasks)) for i, tasks in dispatch]
        if self.here is not None:
            return self._train_here(dispatch, ref, broadcast)
        if ref is None and self.inline:  # by value: Ray copies it into each call, no object-store round trip
            ref = self.core.params
            if self._inline_version != self.core.version:
                self._inline_version = self.core.version
                self.inlined += 1
        elif ref is None:
            ref = self.model_ref()[0]
        return [train_call(self.actors[i], ref, tasks, self.shared, broadcast) for i, tasks in dispatch]

    def _train_here(self, dispatch: list, ref, broadcast) -> list:
        """:meth:`_dispatch` without client actors: each call trained now, in this process, on
        read-only views of the model, the broadcast and the client states (as a client actor reads
        them from the object store: nothing it does can change this actor's copies)."""
        params, broadcast = _frozen(self.core.params if ref is None else ray.get(ref)), _frozen(broadcast)
        out = []
        for _, tasks in dispatch:
            tasks = [t if t.state is None else dataclasses.replace(t, state=_frozen(t.state)) for t in tasks]
            updates = self.here.run(params, tasks, broadcast)
            out.append(_Here([[u.header() for u in updates], *[u.payload for u in updates]]))
        return out

    # ------------------------------------------------------------ queries
    def evaluate(self) -> dict:
        return self.core.evaluate()

    def client_metrics(self, clients) -> dict:
        return self.core.client_metrics(clients)

    def params(self) -> dict:
        """The final model as saved (the server's ``eval_params``: e.g. recomputed BN statistics)."""
        return self.core.eval_params()

    def adopt(self, actors: list) -> None:
        """Client actors the driver replaced."""
        self.actors = list(actors)

    def pid(self) -> int:
        import os

        return os.getpid()

    def stats(self) -> dict:
        return {"version": self.core.version, "puts": self.puts, "inlined": self.inlined,
                "applied": self.core.applied, "rejected": dict(self.core.rejected),
                "client_state_bytes": self.core.store.bytes_in + self.core.store.bytes_out,
                "client_states": len(self.core.store), "excluded": self.core.defense.state["excluded"],
                "dp_clip": self.core.defense.state["dp_clip"], "client_error": self.core.first_error}

    def state_dict(self) -> dict:
        return {"core": self.core.state_dict(), "puts": self.puts, "inlined": self.inlined}

    def load_state_dict(self, state) -> None:
        self.core.load_state_dict(state["core"])
        self.puts, self.inlined = int(state["puts"]), int(state["inlined"])
        self._ref_version = self._inline_version = -1
