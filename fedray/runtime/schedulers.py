"""The method schedules on the virtual clock: ``sync`` rounds, ``async`` arrivals, ``interval`` ticks.

Both schedulers hand finished updates to the aggregator strictly in virtual finish-time
order (ties: dispatch id); trainings run concurrently on Ray, and the order in which workers
finish never changes a result.

Both are objects with explicit state (``state_dict`` / ``load_state_dict``): the virtual
clock, the round and selection counters and, for asynchronous schedules, the dispatches in
flight. They stop at a safe point when the runner is asked to (Ctrl-C, SIGTERM: every
planned round is finished and recorded first) and checkpoint every
``runtime.checkpoint_every`` aggregations (:mod:`fedray.runtime.checkpoint`).

- :class:`SyncScheduler`: rounds dispatched to the client actors by the aggregator, which
  aggregates and ends each round in a new version (``AggregatorActor.rounds``). For methods
  whose planning needs no feedback from finished rounds the loop plans rounds ahead and hands
  them over in calls of about :data:`CALL_S` seconds of rounds (at most
  ``cluster.rounds_per_call``), and queues the next call before reading the last one's
  results, so the aggregator goes from round to round without waiting for the driver.
- :class:`AsyncScheduler`: ``concurrency`` clients in flight; every arrival goes to the aggregator
  (the server's trigger decides when to aggregate), and for ``interval`` methods a tick every
  ``interval_s`` virtual seconds aggregates whatever has arrived.
"""
from __future__ import annotations

import dataclasses
import heapq

from fedray import seeding
from fedray.methods.base import RoundRecord

__all__ = ["SyncScheduler", "AsyncScheduler", "scheduler_for", "CALL_S"]

CALL_S = 0.25
"""Seconds of synchronous rounds per aggregator call: enough to make the per-call cost (a few
milliseconds) negligible, short enough for timely progress and Tune reports."""


def _wake_s(cfg) -> float:
    return min(60.0, cfg.devices.availability_cycle_s / 10)


class SyncScheduler:
    """Synchronous rounds (see the module docstring); ``run`` is the :class:`~fedray.runtime.runner.Runner`."""

    def __init__(self, run):
        self.run = run
        self.t, self.r = 0.0, 0  # the next round's start on the virtual clock, and its number

    def state_dict(self) -> dict:
        return {"t": self.t, "r": self.r}

    def load_state_dict(self, state) -> None:
        self.t, self.r = float(state["t"]), int(state["r"])

    def resume(self) -> None:
        """Nothing is in flight at a synchronous checkpoint (every planned round was read)."""

    def __call__(self, on_aggregate) -> None:
        run = self.run
        cfg, d = run.cfg, run.dispatcher
        stop_at_target = cfg.server.stop_at_target  # then each call ends at an evaluation, read before going on
        pipelined = not run.method.feedback and cfg.devices.mode == "simulated" and not stop_at_target
        per_call = min(2, cfg.cluster.rounds_per_call) if pipelined else 1
        t, r = self.t, self.r
        planned: list = []  # [(recs, (evaluate, record, client_eval), round)] not sent yet
        queue: list = []  # [(entries, ref, actor generations)] sent, results not read yet
        timing = {"last": None}  # completion stamp of the last round read

        def build(entry):
            """The aggregator's plan of a round, routed to the ready actors now."""
            recs, (due, record, clients), _ = entry
            dispatch = [(i, [x.task for x in group]) for i, group in d.groups(recs)]
            items = [(x.call, x.slot, x.expected) for x in recs if x.outcome == "update"]
            return dispatch, items, due, record, clients

        def submit(entries):
            queue.append((entries, run.aggregator.rounds.remote([build(e) for e in entries]), list(run.pool.gen)))

        def settle(keep: int):
            """Read the queued calls until ``keep`` are left; a round lost with an actor is sent
            again (with every round queued behind it) once the actor is replaced."""
            nonlocal per_call
            while len(queue) > keep:
                entries, ref, gens = queue.pop(0)
                results = run.aggregator_get(ref)
                done = []
                for (recs, _, rr), res in zip(entries, results):
                    if "lost" in res or "skipped" in res:
                        break
                    run.accounting.record(recs, res, window=recs[0].task.version)
                    on_aggregate(res, max(x.t_end for x in recs), rr)
                    done.append(res["done_at"])
                if done:  # size the next calls by the measured seconds per round
                    first = timing["last"] if timing["last"] is not None else done[0]
                    n = len(done) if timing["last"] is not None else len(done) - 1
                    if n:
                        per_call = max(1, min(cfg.cluster.rounds_per_call, int(CALL_S * n / max(done[-1] - first, 1e-6))))
                    timing["last"] = done[-1]
                if len(done) < len(entries):
                    last = results[len(done)]
                    if "lost" in last:
                        run.lose_actors({(i, gens[i]) for i in last["lost"]})
                    rest = entries[len(done):] + [e for q in queue for e in q[0]]
                    for q in queue:  # the aggregator skips them (its version is behind theirs)
                        run.aggregator_get(q[1])
                    queue.clear()
                    submit(rest)

        def send():
            nonlocal planned
            if planned:
                submit(planned)
                planned = []
            settle(1 if pipelined else 0)

        while d.version < cfg.server.rounds and not run.out_of_time(t) and not run.planner.finished():
            if run.stopping:
                break
            sel = run.planner.select(seeding.rng(cfg.seed, "select", r), d.available(t), cfg.server.clients_per_round)
            if len(sel) == 0:  # nobody available: wait
                t += _wake_s(cfg)
                continue
            recs = d.launch(sel, t, r)
            limit = d.apply_deadline(recs, t, run.planner.deadline)
            d.occupy(recs, t)
            recs.sort()
            record = RoundRecord(d.version, tuple(int(c) for c in sel),
                                 tuple(x.client_id for x in recs if x.outcome != "update"), limit)
            evaluate = run.eval_due()
            planned.append((recs, (evaluate, record, run.client_eval_due(d.version + 1)), r))
            d.version += 1
            for x in recs:  # every client of a synchronous round is done when the round ends
                d.release(x.client_id)
            r += 1
            due = run.checkpoint_due(d.version)
            if len(planned) >= per_call or due or (stop_at_target and evaluate):
                send()
            # the round lasts as long as its slowest client (or the deadline); in real mode its
            # ends are the measured ones, known once the round is read (``send`` above)
            t = max(x.t_end for x in recs)
            if due:  # every planned round read: nothing in flight
                settle(0)
                self.t, self.r = t, r
                run.save_checkpoint()
        send()
        settle(0)
        self.t, self.r = t, r


class AsyncScheduler:
    """Asynchronous and interval schedules (see the module docstring)."""

    def __init__(self, run):
        self.run = run
        self.t = 0.0
        self.heap: list = []  # (t, dispatch id or -1 / -2, kind, record)
        self.inflight = 0
        self.draws = 0
        self.waking = False
        self.dropped: list[int] = []  # clients resolved without an update since the last aggregator call
        self.started = False

    def state_dict(self) -> dict:
        """The in-flight records travel without their call references (a resume re-dispatches them)."""
        heap = [(t, k, kind, None if rec is None else _detached(rec)) for t, k, kind, rec in self.heap]
        return {"t": self.t, "heap": heap, "inflight": self.inflight, "draws": self.draws, "waking": self.waking,
                "dropped": list(self.dropped), "started": self.started}

    def load_state_dict(self, state) -> None:
        self.t, self.heap, self.inflight = state["t"], list(state["heap"]), state["inflight"]
        self.draws, self.waking, self.dropped = state["draws"], state["waking"], list(state["dropped"])
        self.started = state["started"]
        heapq.heapify(self.heap)

    def in_flight(self) -> list:
        return [rec for _, _, kind, rec in self.heap if kind == "end" and rec.outcome == "update"]

    def resume(self) -> None:
        """Re-dispatch the trainings in flight at the checkpoint, each from its own model version
        (training is a pure function of its inputs: the same updates come back)."""
        self.run.redispatch(self.in_flight())

    def __call__(self, on_aggregate) -> None:
        run = self.run
        cfg, d, planner = run.cfg, run.dispatcher, run.planner
        heap = self.heap
        conc = planner.concurrency()

        def refill(now):
            need = conc - self.inflight
            if need <= 0:
                return
            sel = planner.select(seeding.rng(cfg.seed, "select", self.draws), d.available(now), need)
            if len(sel) == 0:  # nobody available: wake later
                if not self.waking:
                    heapq.heappush(heap, (now + _wake_s(cfg), -2, "wake", None))
                    self.waking = True
                return
            self.draws += 1
            recs = d.launch(sel, now, d.version)
            d.occupy(recs, now)
            run.send(recs)
            for rec in recs:
                heapq.heappush(heap, (rec.t_end, rec.dispatch_id, "end", rec))
                self.inflight += 1

        def resolve(recs, force: bool):
            ups = [x for x in recs if x.outcome == "update"]
            self.dropped.extend(x.client_id for x in recs if x.outcome != "update")
            res = None
            if ups or force:
                res = run.receive(ups, force, run.eval_due(), list(self.dropped))
                self.dropped.clear()
            run.accounting.record(recs, res, window=d.version)
            if res is not None and res["aggregated"]:
                d.version = res["version"]
                run.set_model_ref(res["model_ref"][0], d.version)
            return res

        if not self.started:
            self.started = True
            if run.method.schedule == "interval":
                heapq.heappush(heap, (planner.interval_s(), -1, "tick", None))
            refill(self.t)
        while d.version < cfg.server.rounds and heap and not planner.finished() and not run.stopping:
            t, key, kind, rec = heapq.heappop(heap)
            if run.out_of_time(t):
                heapq.heappush(heap, (t, key, kind, rec))
                break
            self.t = t
            if kind == "tick":
                res = resolve([], force=True)
                if res and res["aggregated"]:
                    on_aggregate(res, t, d.version - 1)
                heapq.heappush(heap, (t + planner.interval_s(), -1, "tick", None))
                if res and res["aggregated"] and run.checkpoint_due(d.version):
                    run.save_checkpoint()
                continue
            if kind == "wake":
                self.waking = False
            if kind == "end":
                self.inflight -= 1
                before = d.version
                res = resolve([rec], force=False)
                if res and res["aggregated"] and d.version > before:
                    on_aggregate(res, t, d.version - 1)
                    refill(t)
                    if run.checkpoint_due(d.version):  # after the refill: the state a resume continues from
                        run.save_checkpoint()
                    continue
            refill(t)
        # records still in flight at the end are abandoned (not counted as spent)


def _detached(rec):
    return dataclasses.replace(rec, call_refs=None)


def scheduler_for(run):
    return (SyncScheduler if run.method.schedule == "sync" else AsyncScheduler)(run)
