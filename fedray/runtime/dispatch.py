"""Dispatch: plan, cost and launch clients on the virtual clock; route tasks to actors.

For every dispatch the :class:`Dispatcher` makes the ``dispatch_id``, asks the planner for
the :class:`~fedray.methods.base.Assignment`, asks its submodel what it costs (FLOPs per
example, bytes down and up: :meth:`~fedray.submodel.submodel.Submodel.cost`, through the
channel) and turns that into the device's virtual finish time with the one cost model. It
decides drops (device dropout, round deadline) at dispatch and keeps the device
bookkeeping (busy, battery, availability). The cost of a dispatch is computed once, here;
the metrics rows and the totals are made from the same numbers.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from fedray.client.vectorised import group_size
from fedray.client.worker import Task
from fedray.devices import cost as costs
from fedray.runtime import cluster

__all__ = ["Candidates", "Inflight", "Dispatcher", "examples_processed"]


def examples_processed(n: int, batch_size: int, epochs: int, steps: int | None) -> int:
    """Examples a client pushes through the model (as :func:`fedray.client.trainer.batches` yields them)."""
    if n <= 0:
        return 0
    if steps is None:
        return n * epochs
    per_epoch = math.ceil(n / batch_size)
    full, rest = divmod(steps, per_epoch)
    return full * n + min(rest * batch_size, n)


@dataclass(order=True)
class Inflight:
    """One dispatch between its start and its end on the virtual clock."""

    t_end: float
    dispatch_id: int
    task: Task = field(compare=False)
    cost: costs.Cost = field(compare=False)
    t_start: float = field(compare=False)
    outcome: str = field(compare=False)  # "update" | "drop" | "late"
    round: int = field(compare=False)
    energy_j: float = field(compare=False)
    flops: int = field(compare=False)
    sub: object = field(default=None, compare=False)  # the submodel's cost
    expected: object = field(default=None, compare=False)  # what the server expects of the update
    egress: int = field(default=0, compare=False)  # server bytes sent for this download
    bytes_up: int = field(default=0, compare=False)  # bytes the device sent (a cut upload: a part)
    bytes_down: int = field(default=0, compare=False)  # bytes it received (a cut download: a part)
    call_refs: list = field(default=None, compare=False)  # [headers ref, payload refs...] of a driver-sent call
    call: int = field(default=0, compare=False)  # the call's index among its dispatch's calls
    actor: int = field(default=-1, compare=False)  # the actor slot it was sent to
    gen: int = field(default=0, compare=False)  # that slot's generation then
    slot: int = field(default=0, compare=False)  # this task's index in the call's lists

    @property
    def client_id(self) -> int:
        return self.task.assignment.client_id


class Dispatcher:
    """Plans and costs dispatches for one run (driver side)."""

    def __init__(self, cfg, setup, planner, channel, pool):
        self.cfg, self.setup, self.planner, self.channel = cfg, setup, planner, channel
        self.pool = pool
        self.profiles = setup.profiles
        self.next_dispatch = 0
        self.version = 0
        self.cost_model = costs.CostModel(shared_server_bps=cfg.devices.shared_server_bps,
                                          noise_sigma=cfg.devices.noise_sigma)
        self.link = costs.ServerLink() if cfg.devices.shared_server_bps is not None else None
        self._costs: dict[int, tuple] = {}  # id(submodel) -> (submodel, cost, expected)
        self._sent: set = set()  # (version, piece) already sent (shared download pieces), this version only
        self.busy = np.zeros(len(self.profiles), dtype=bool)  # one byte per registered client
        self._busy: set[int] = set()
        self._busy_sorted: np.ndarray | None = np.empty(0, np.int64)
        self._battery: dict[int, tuple[float, float]] = {}  # (level, as of time) of battery devices touched
        on = self.profiles.always_on()  # per tier: mains powered, always online, no trace
        self._on_tier = on
        self.all_on = bool(on.all())

    @functools.cached_property
    def group(self) -> int:
        """Consecutive dispatches routed together (vectorised training, :func:`group_size`)."""
        return group_size(self.cfg)

    @property
    def slow(self) -> np.ndarray:
        return self.profiles.slow

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"next_dispatch": self.next_dispatch, "version": self.version, "battery": dict(self._battery),
                "busy": sorted(self._busy), "sent": set(self._sent),
                "link": None if self.link is None else (list(self.link.down), list(self.link.up))}

    def load_state_dict(self, state) -> None:
        self.next_dispatch, self.version = int(state["next_dispatch"]), int(state["version"])
        self._battery = dict(state["battery"])
        self.busy[:] = False
        self._busy = set()
        for c in state["busy"]:
            self._set_busy(int(c), True)
        self._sent = set(state["sent"])
        if self.link is not None and state["link"] is not None:
            self.link.down, self.link.up = list(state["link"][0]), list(state["link"][1])

    # ------------------------------------------------------------ devices
    def _set_busy(self, c: int, busy: bool) -> None:
        self.busy[c] = busy
        (self._busy.add if busy else self._busy.discard)(c)
        self._busy_sorted = None

    def release(self, c: int) -> None:
        """Client ``c``'s dispatch ended: it is idle again."""
        self._set_busy(int(c), False)

    def battery(self, c: int) -> float:
        """Client ``c``'s battery level as last charged or drained."""
        hit = self._battery.get(c)
        return hit[0] if hit is not None else self.profiles[c].battery_level

    def _charge(self, c: int, t: float) -> float:
        """Recharge an idle battery device up to time ``t``; its level."""
        p = self.profiles[c]
        if math.isinf(p.battery_j):
            return p.battery_level
        level, since = self._battery.get(c, (p.battery_level, 0.0))
        if t > since:
            level = costs.recharge(level, t - since, p.recharge_w, p.battery_j)
        self._battery[c] = (level, max(since, t))
        return level

    def ready(self, c: int, t: float) -> bool:
        """May idle client ``c`` be selected at ``t`` (online and charged)?"""
        if self._on_tier[self.profiles.tier_index[c]]:
            return True
        level = self._charge(c, t)
        return costs.available(self.profiles[c], t, level, seed=self.cfg.seed, low=self.cfg.devices.low_battery)

    def available(self, t: float) -> "Candidates":
        """The clients that are idle, online and charged at virtual time ``t`` (sampled lazily)."""
        return Candidates(self, t)

    def idle_ids(self, positions: np.ndarray) -> np.ndarray:
        """The ids of the idle clients at ``positions`` in the sorted list of idle clients."""
        if self._busy_sorted is None:
            self._busy_sorted = np.array(sorted(self._busy), dtype=np.int64)
        b = self._busy_sorted
        pos = np.asarray(positions, dtype=np.int64)
        return pos + np.searchsorted(b - np.arange(len(b)), pos, side="right")

    # ------------------------------------------------------------ costs
    def cost_of(self, submodel):
        """``(SubmodelCost, Expected)`` of a submodel, computed once per submodel object."""
        hit = self._costs.get(id(submodel))
        if hit is None or hit[0] is not submodel:
            if len(self._costs) > 4096:
                self._costs.clear()
            model = self.setup.model
            sc = submodel.cost(model, self.channel)
            hit = self._costs[id(submodel)] = (submodel, sc, self.channel.expected(submodel, sc.bytes_up, model))
        return hit[1], hit[2]

    # ------------------------------------------------------------ launch
    def launch(self, clients, t: float, rnd: int) -> list[Inflight]:
        """Plan, cost and dispatch ``clients`` at virtual time ``t``; returns their records."""
        cfg, tc = self.cfg, self.cfg.train
        planned = []
        for c in clients:
            c = int(c)
            did = self.next_dispatch
            self.next_dispatch += 1
            a = self.planner.plan(c, self.version)
            sc, expected = self.cost_of(a.submodel)
            epochs = a.local_epochs if a.local_epochs is not None else tc.local_epochs
            steps = a.local_steps if a.local_steps is not None else tc.local_steps
            examples = examples_processed(int(self.setup.examples[c]), tc.batch_size, epochs, steps)
            planned.append((c, did, a, sc, expected, examples * sc.flops_per_example + sc.extra_flops))
        shares = self._shares(planned, t)
        recs: list[Inflight] = []
        for (c, did, a, sc, expected, flops), (n_down, n_up) in zip(planned, shares):
            prof = self.profiles[c]
            cst = self.cost_model.estimate(prof, train_flops=flops, bytes_down=sc.bytes_down, bytes_up=sc.bytes_up,
                                           t_start=t, seed=cfg.seed, round_key=did, concurrent=n_down,
                                           concurrent_up=n_up)
            tele = {"round_s": cst.total_s, "compute_s": cst.compute_s, "comm_s": cst.download_s + cst.upload_s,
                    "cpu_load": cst.cpu_load, "download_bps": cst.download_bps, "upload_bps": cst.upload_bps,
                    "battery": float(self.battery(c)), "speed": prof.speed}
            task = Task(did, self.version, a, telemetry=tele, speed=prof.speed if cfg.devices.mode == "real" else None)
            if self._sent and next(iter(self._sent))[0] != self.version:  # pieces of older versions: done
                self._sent.clear()
            egress = self.channel.egress(sc.pieces, sc.bytes_down, self.version, self._sent)
            drop = costs.dropout_point(prof, seed=cfg.seed, round_key=did)
            if drop is not None:  # the device drops after a fraction of its compute, before uploading
                recs.append(Inflight(t + cst.download_s + cst.latency_s + drop * cst.compute_s, did, task, cst, t,
                                     "drop", rnd, *costs.partial(prof, cst, drop), sub=sc, expected=expected,
                                     egress=egress, bytes_down=cst.bytes_down))
            else:
                recs.append(Inflight(t + cst.total_s, did, task, cst, t, "update", rnd, cst.energy_j, cst.train_flops,
                                     sub=sc, expected=expected, egress=egress, bytes_up=cst.bytes_up,
                                     bytes_down=cst.bytes_down))
        if self.link is not None:
            ivs = [costs.transfer_intervals(r.cost, t) for r in recs]
            self.link.add([d for d, _ in ivs], [u for r, (_, u) in zip(recs, ivs) if r.outcome == "update"])
        return recs

    def _shares(self, planned, t: float) -> list[tuple[int, int]]:
        """Concurrent transfers on the server link for each planned dispatch (1 without a shared link)."""
        if self.link is None:
            return [(1, 1)] * len(planned)
        self.link.prune(t)
        alone = [self.cost_model.estimate(self.profiles[c], train_flops=flops, bytes_down=sc.bytes_down,
                                          bytes_up=sc.bytes_up, t_start=t, seed=self.cfg.seed, round_key=did)
                 for c, did, _, sc, _, flops in planned]
        ivs = [costs.transfer_intervals(x, t) for x in alone]
        return self.link.shares([d for d, _ in ivs], [u for _, u in ivs])

    def apply_deadline(self, recs: list[Inflight], t: float, rule) -> float | None:
        """Mark the records past the round's deadline (``rule(predicted round times)``) ``late``:
        the server stops waiting at the deadline; returns the deadline (None: none)."""
        if rule is None or not recs:
            return None
        limit = rule(np.array([r.cost.total_s for r in recs]))
        if limit is None:
            return None
        for r in recs:
            if r.outcome == "update" and r.t_end - t > limit:  # it has done what fits before the deadline
                spent = costs.cut_at(self.profiles[r.client_id], r.cost, limit)
                r.outcome, r.t_end = "late", t + limit
                r.energy_j, r.flops, r.bytes_up, r.bytes_down = (spent.energy_j, spent.train_flops, spent.bytes_up,
                                                                  spent.bytes_down)
        return limit

    def occupy(self, recs: list[Inflight], t: float) -> None:
        """The devices of ``recs`` are busy until their ends and spend their energy."""
        for r in recs:
            c = r.client_id
            self._set_busy(c, True)
            p = self.profiles[c]
            if not math.isinf(p.battery_j):
                self._battery[c] = (costs.drain(self._charge(c, t), r.energy_j, p.battery_j), r.t_end)

    # ------------------------------------------------------------ routing
    def actor_of(self, r: Inflight) -> int:
        """The client actor a record is routed to (a ready one of its client's pool, by dispatch
        group: ``dispatch_id // train.vectorise`` where dispatches train together, else the id)."""
        return self.pool.route(self.pool.key_of(self.profiles.tier_of(r.client_id)), r.dispatch_id // self.group)

    def groups(self, recs: list[Inflight]) -> list[tuple[int, list[Inflight]]]:
        """One call per client actor for the update tasks routed to it (by the client's tier
        pool): ``[(actor index, records)]``; sets every record's call index and slot."""
        groups: dict[int, list[Inflight]] = {}
        self.pool.refresh()  # actors that started running since (an elastic pool grows)
        for r in recs:
            if r.outcome == "update":
                groups.setdefault(self.actor_of(r), []).append(r)
        for n, group in enumerate(groups.values()):
            for j, r in enumerate(group):
                r.call, r.slot = n, j
        return list(groups.items())

    @staticmethod
    def items(ups: list[Inflight]) -> tuple[list, list]:
        """Aggregator input ``(calls, items)``: the *references* of each actor call (the aggregator
        fetches them itself, so the driver never waits for a training result before the
        aggregation call; each reference travels once), and per update ``(call index, slot,
        expected)`` in admission order."""
        calls: dict = {}
        items = []
        for r in ups:
            i = calls.setdefault(r.call_refs[0], (len(calls), r.call_refs))[0]
            items.append((i, r.slot, r.expected))
        return [refs for _, refs in calls.values()], items

    @staticmethod
    def headers(recs: list[Inflight]) -> dict:
        """Update headers by dispatch id (one fetch per actor call); a lost one becomes its exception."""
        calls = cluster.fetch_lists([r.call_refs[0] for r in recs])
        return {r.dispatch_id: slot(calls[r.call_refs[0]], r.slot) for r in recs}


def slot(headers, i: int):
    """The header at ``i`` of one call's header list, or the exception that lost the call."""
    return headers if isinstance(headers, Exception) else headers[i]


class Candidates:
    """The clients a planner may select at virtual time ``t``: idle, online and charged.

    :meth:`sample` draws ``k`` of them uniformly without replacement in O(k) (expected, for a
    population that is mostly available), never walking the registered clients:

    - every tier always on (mains powered, always online, no trace): ``k`` positions among the
      idle clients by ``rng.choice(idle, k, replace=False)``, mapped to ids past the busy ones
      -- the very draws of a selection from the materialised list;
    - otherwise idle clients in a uniformly random order (positions drawn one by one, without
      replacement), each checked (availability process, trace, battery) when drawn, until
      ``k`` passed: a uniform ``k``-subset of the available ones. Past half of the idle clients
      drawn, the rest are permuted at once.

    ``np.asarray(candidates)`` is the sorted array of every available client (O(clients)), for
    a planner that wants them all.
    """

    def __init__(self, dispatcher: Dispatcher, t: float):
        self.d, self.t = dispatcher, t
        self.idle = len(dispatcher.busy) - len(dispatcher._busy)

    def sample(self, rng: np.random.Generator, k: int) -> np.ndarray:
        d, m = self.d, self.idle
        k = min(int(k), m)
        if k <= 0:
            return np.empty(0, dtype=np.int64)
        if d.all_on:
            return np.sort(d.idle_ids(rng.choice(m, size=k, replace=False)))
        chosen: list[int] = []
        seen: set[int] = set()
        while len(chosen) < k and len(seen) < m:
            if 2 * len(seen) > m:  # mostly drawn: permute the rest at once
                rest = np.setdiff1d(np.arange(m), np.fromiter(seen, np.int64, len(seen)), assume_unique=True)
                for c in d.idle_ids(rng.permutation(rest)):
                    if len(chosen) == k:
                        break
                    if d.ready(int(c), self.t):
                        chosen.append(int(c))
                break
            p = int(rng.integers(m))
            if p in seen:
                continue
            seen.add(p)
            c = int(d.idle_ids(np.array([p]))[0])
            if d.ready(c, self.t):
                chosen.append(c)
        return np.sort(np.array(chosen, dtype=np.int64))

    def __array__(self, dtype=None, copy=None):
        idle = self.d.idle_ids(np.arange(self.idle))
        out = idle if self.d.all_on else np.array([c for c in idle if self.d.ready(int(c), self.t)], dtype=np.int64)
        return out.astype(dtype) if dtype is not None else out

    def __len__(self) -> int:
        return self.idle if self.d.all_on else len(np.asarray(self))
