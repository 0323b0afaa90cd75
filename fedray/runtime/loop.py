"""The driver loop: a virtual-clock event loop over Ray actors.

The loop sets up data, devices, client actors and the aggregator, then runs
the method's schedule (``sync`` rounds, ``async`` arrivals, ``interval``
ticks; see :mod:`fedray.methods.base`). For every dispatch it makes the
``dispatch_id``, predicts FLOPs, bytes and the device's virtual finish time
with the one cost model, decides drops (device dropout, round deadline) at
dispatch, and hands finished updates to the aggregator strictly in virtual
finish-time order (ties: dispatch id). Trainings run concurrently on Ray; the
order in which workers finish never changes a result.

In ``devices.mode: real`` the client actors are really slowed (duty cycle,
threads, CPU share) and round times are the measured seconds of training plus
the simulated communication; only synchronous schedules run in real mode.
"""
from __future__ import annotations

import hashlib
import heapq
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from fedray import config as C
from fedray import seeding
from fedray.aggregation.actor import AggregatorActor
from fedray.aggregation.validate import REASONS
from fedray.client.actor import ClientActor, Task, train_call
from fedray.client.trainer import get_params
from fedray.data.datasets import Dataset, load_dataset
from fedray.data.partition import cached_partition, partition
from fedray.devices import cost as costs
from fedray.devices.profile import DeviceProfile
from fedray.errors import ConfigError
from fedray.methods import registry
from fedray.metrics import definitions
from fedray.metrics.recorder import Recorder
from fedray.models.spec import ModelSpec, model_spec
from fedray.models.zoo import build_model
from fedray.runtime import cluster
from fedray.submodel.encode import payload_nbytes


def examples_processed(n: int, batch_size: int, epochs: int, steps: int | None) -> int:
    """Examples a client pushes through the model (as :func:`fedray.client.trainer.batches` yields them)."""
    if n <= 0:
        return 0
    if steps is None:
        return n * epochs
    per_epoch = math.ceil(n / batch_size)
    full, rest = divmod(steps, per_epoch)
    return full * n + min(rest * batch_size, n)


def model_digest(params: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(params):
        v = np.ascontiguousarray(params[k])
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.tobytes())
    return h.hexdigest()


def _slot(headers, slot: int):
    """The header at ``slot`` of one call's header list, or the exception that lost the call."""
    return headers if isinstance(headers, Exception) else headers[slot]


CALL_S = 0.25
"""Seconds of synchronous rounds per aggregator call: enough to make the per-call cost (a few
milliseconds) negligible, short enough for timely progress and Tune reports."""

SUMMARY_TAGS = ("final_accuracy", "best_accuracy", "sdir", "slow_coverage", "time_to_target_s", "train_flops",
                "sparse_train_flops", "flops_per_accuracy_point", "bytes_up", "bytes_down", "energy_j", "virtual_s")


@dataclass
class Setup:
    """Everything a run needs before the first dispatch."""

    cfg: C.ExperimentConfig
    dataset: Dataset
    partitions: list[np.ndarray]
    params: dict[str, np.ndarray]
    spec: ModelSpec
    profiles: list[DeviceProfile]


def prepare(cfg: C.ExperimentConfig) -> Setup:
    """Load data (once), partition it (cached), build the initial model, its spec and the devices."""
    d = cfg.data
    ds = load_dataset(d.name, root=d.root, download=d.download, seed=cfg.seed, test_fraction=d.test_fraction,
                      options=d.options)
    p = d.partition
    key = {"data": d.name, "root": d.root, "options": d.options, "test_fraction": d.test_fraction,
           "n": int(len(ds.y_train)), "clients": d.num_clients, "kind": p.kind, "alpha": p.alpha,
           "classes_per_client": p.classes_per_client, "min_size": p.min_size, "seed": cfg.seed}
    parts = cached_partition(d.cache_dir, key, lambda: partition(
        ds.y_train, d.num_clients, p.kind, seed=seeding.derive(cfg.seed, "partition"), alpha=p.alpha,
        classes_per_client=p.classes_per_client, writers=ds.writers, min_size=p.min_size))
    torch.manual_seed(seeding.derive(cfg.seed, "init"))
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, options=cfg.model.options)
    spec = model_spec(model, ds.input_shape)
    profiles = C.profiles(cfg)
    return Setup(cfg, ds, parts, get_params(model), spec, profiles)


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
    call_refs: list = field(default=None, compare=False)  # [headers ref, payload refs...] of a driver-sent call
    call: int = field(default=0, compare=False)  # the call's index among its dispatch's calls
    slot: int = field(default=0, compare=False)  # this task's index in the call's lists


@dataclass
class Totals:
    bytes_up: int = 0
    bytes_down: int = 0
    train_flops: int = 0
    sparse_train_flops: int = 0
    energy_j: float = 0.0
    updates: int = 0
    dropped: int = 0
    late: int = 0
    rejected: int = 0


class Runner:
    """One federated run of one method and seed."""

    def __init__(self, cfg: C.ExperimentConfig, *, run_dir: str | Path | None = None, progress: bool | None = None,
                 report=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
        self.progress = cfg.runtime.progress if progress is None else progress
        self.report = report  # callable(dict) after each evaluation (Ray Tune)
        self.totals = Totals()

    # ------------------------------------------------------------ setup
    def _start(self) -> None:
        cfg = self.cfg
        self.owns_ray = cluster.connect(cfg.cluster)
        self.setup = s = prepare(cfg)
        ds = s.dataset
        self.method = registry.get(cfg.method.name)(cfg, s.spec)
        if cfg.devices.mode == "real" and self.method.schedule != "sync":
            raise ConfigError("devices.mode", f"'real' throttling runs synchronous methods; {cfg.method.name} is {self.method.schedule}")
        # one put of the data set for the whole run; actors read it zero-copy. The driver keeps the
        # references, so a restarted actor reads them again.
        self.shared = [ray.put({"x": ds.x_train, "y": ds.y_train}), ray.put(s.partitions)]
        test_ref = ray.put({"x": ds.x_test, "y": ds.y_test})
        self.pools, self.placement_group = cluster.create_client_actors(
            cfg, s.profiles, lambda opts: ClientActor.options(**opts).remote(
                cfg, ds.input_shape, ds.num_classes))
        self.actors, self.actor_index = [], {}
        for pool, actors in self.pools.items():
            for i, a in enumerate(actors):
                self.actor_index[(pool, i)] = len(self.actors)
                self.actors.append(a)
        self.aggregator = AggregatorActor.options(num_cpus=cfg.cluster.aggregator_cpus).remote(
            cfg, s.params, test_ref, ds.input_shape, ds.num_classes, s.spec)
        self.aggregator.attach.remote(self.actors, self.shared)  # it dispatches synchronous rounds
        self.model_ref = ray.get(self.aggregator.model_ref.remote())[0]
        published = ray.get(self.aggregator.public_state.remote())
        if published is not None:
            self.method.sync_from_server(published)
        self.version = 0
        self.next_dispatch = 0
        self.like = s.params  # shapes and dtypes of the global model
        self._dense_bytes, self._flops_cache = payload_nbytes(self.like), {}
        self.cost_model = costs.CostModel(shared_server_bps=cfg.devices.shared_server_bps,
                                          noise_sigma=cfg.devices.noise_sigma)
        n = cfg.data.num_clients
        self.battery = np.array([p.battery_level for p in s.profiles], dtype=np.float64)
        self.battery_t = np.zeros(n)
        self.busy = np.zeros(n, dtype=bool)
        self.slow = np.array([costs.is_slow(p) for p in s.profiles])
        # mains-powered, always online, no trace: nothing to check per round
        self.always_on = np.array([p.trace is None and not p.windows and p.availability >= 1.0
                                   and math.isinf(p.battery_j) for p in s.profiles], dtype=bool)
        self.recorder = Recorder(self.run_dir, tensorboard=cfg.runtime.tensorboard)
        C.dump(cfg, self.run_dir / "config.yaml")

    # ------------------------------------------------------------ devices
    def _charge(self, c: int, t: float) -> None:
        """Recharge an idle device up to time ``t``."""
        p = self.setup.profiles[c]
        if t > self.battery_t[c] and not math.isinf(p.battery_j):
            self.battery[c] = costs.recharge(self.battery[c], t - self.battery_t[c], p.recharge_w, p.battery_j)
        self.battery_t[c] = max(self.battery_t[c], t)

    def available(self, t: float) -> np.ndarray:
        """Clients that are idle, online and charged at virtual time ``t``."""
        idle = np.flatnonzero(~self.busy)
        low = self.cfg.devices.low_battery
        out = []
        for c in idle[~self.always_on[idle]]:  # the others are available whenever idle
            self._charge(c, t)
            if costs.available(self.setup.profiles[c], t, self.battery[c], seed=self.cfg.seed, low=low):
                out.append(c)
        return np.union1d(idle[self.always_on[idle]], np.array(out, dtype=np.int64)).astype(np.int64)

    # ------------------------------------------------------------ dispatch
    def _predict(self, a) -> dict:
        """Deterministic FLOPs and bytes of an assignment (what the device will do and send)."""
        spec, tc = self.setup.spec, self.cfg.train
        n = len(self.setup.partitions[a.client_id])
        epochs = a.local_epochs if a.local_epochs is not None else tc.local_epochs
        steps = a.local_steps if a.local_steps is not None else tc.local_steps
        examples = examples_processed(n, tc.batch_size, epochs, steps)
        if a.trainable is not None:
            trained = {spec.layer_of_key(k).name for k in a.trainable}
        elif a.mask is not None:
            trained = {spec.layer_of_key(k).name for k, m in a.mask.items() if k in spec.param_keys and m.any()}
        else:
            trained = set(spec.layer_names)
        # a physically smaller model (CA-HFP) carries its own per-example FLOPs
        flops = (a.train_flops_per_example * examples if a.train_flops_per_example is not None
                 else examples * self._flops_per_example(frozenset(trained)))
        up = self._nbytes(a.mask) if a.bytes_up is None else a.bytes_up
        if a.collect_sq_grads:  # dense squared gradients of the trained parameters travel as aux arrays
            keys = a.trainable if a.trainable is not None else (a.mask.keys() if a.mask is not None else self.like)
            up += payload_nbytes({k: self.like[k] for k in keys if k in spec.param_keys})
        down = self._nbytes(a.download_mask) if a.bytes_down is None else a.bytes_down
        return {"train_flops": int(flops), "bytes_down": down, "bytes_up": up}

    def _flops_per_example(self, trained: frozenset) -> int:
        """Training FLOPs per example with ``trained`` layers (cached: a few layer sets per run)."""
        if trained not in self._flops_cache:
            self._flops_cache[trained] = self.setup.spec.train_flops(trained, 1)
        return self._flops_cache[trained]

    def _nbytes(self, mask) -> int:
        """Payload bytes of the model under ``mask`` (the dense size computed once)."""
        return self._dense_bytes if mask is None else payload_nbytes(self.like, mask)

    def _density_factor(self, mask) -> float:
        """FLOPs a sparse kernel would execute, relative to the dense ones: every layer's FLOPs
        scaled by the density of its weight under ``mask`` (1 where the mask does not cover the
        weight, e.g. a frozen layer's forward pass). Reported as ``sparse_train_flops`` next to
        the executed dense ``train_flops``, because unstructured masks save no work in dense
        kernels (AutoFLIP's and PR-FL's published FLOPs count the sparse ones)."""
        if mask is None:
            return 1.0
        spec = self.setup.spec
        total = scaled = 0.0
        for layer in spec.layers:
            f = layer.forward_flops
            m = mask.get(layer.weight_key)
            total += f
            scaled += f * (float(m.mean()) if m is not None else 1.0)
        return scaled / total if total else 1.0

    def _launch(self, clients, t: float, rnd: int, deadline_rule=None) -> list[Inflight]:
        """Plan, cost and dispatch ``clients`` at virtual time ``t``; returns their records."""
        cfg = self.cfg
        recs: list[Inflight] = []
        for c in clients:
            c = int(c)
            did = self.next_dispatch
            self.next_dispatch += 1
            a = self.method.plan(c, self.version)
            prof = self.setup.profiles[c]
            pred = self._predict(a)
            cst = self.cost_model.estimate(prof, train_flops=pred["train_flops"], bytes_down=pred["bytes_down"],
                                           bytes_up=pred["bytes_up"], t_start=t, seed=cfg.seed, round_key=did)
            tele = {"round_s": cst.total_s, "compute_s": cst.compute_s, "comm_s": cst.download_s + cst.upload_s,
                    "cpu_load": cst.cpu_load, "download_bps": cst.download_bps, "upload_bps": cst.upload_bps,
                    "battery": float(self.battery[c]), "speed": prof.speed}
            task = Task(did, self.version, a, telemetry=tele,
                        speed=prof.speed if cfg.devices.mode == "real" else None)
            drop = costs.dropout_point(prof, seed=cfg.seed, round_key=did)
            if drop is not None:  # the device drops after a fraction of its compute, before uploading
                recs.append(Inflight(t + cst.download_s + cst.latency_s + drop * cst.compute_s, did, task, cst, t,
                                     "drop", rnd, *costs.partial(prof, cst, drop)))
            else:
                recs.append(Inflight(t + cst.total_s, did, task, cst, t, "update", rnd, cst.energy_j, cst.train_flops))
        if deadline_rule is not None and recs:
            limit = deadline_rule(np.array([r.cost.total_s for r in recs]))
            if limit is not None:
                for r in recs:
                    if r.outcome == "update" and r.t_end - t > limit:  # the server stops waiting at the deadline
                        done = (limit - r.cost.download_s - r.cost.latency_s) / max(r.cost.compute_s, 1e-12)
                        r.outcome, r.t_end = "late", t + limit
                        r.energy_j, r.flops = costs.partial(self.setup.profiles[r.task.assignment.client_id], r.cost,
                                                            min(1.0, max(0.0, done)))
        for r in recs:
            c = r.task.assignment.client_id
            self.busy[c] = True
            p = self.setup.profiles[c]
            self._charge(c, t)
            self.battery[c] = costs.drain(self.battery[c], r.energy_j, p.battery_j)
            self.battery_t[c] = r.t_end
        return recs

    def _groups(self, recs: list[Inflight]) -> list[tuple[int, list[Inflight]]]:
        """One call per client actor for the update tasks routed to it (by the client's tier
        pool): ``[(actor index, records)]``; sets every record's call index and slot."""
        groups: dict[int, list[Inflight]] = {}
        for r in recs:
            if r.outcome != "update":
                continue
            tier = self.setup.profiles[r.task.assignment.client_id].tier
            pool = tier if tier in self.pools else None
            groups.setdefault(self.actor_index[(pool, r.dispatch_id % len(self.pools[pool]))], []).append(r)
        for n, group in enumerate(groups.values()):
            for j, r in enumerate(group):
                r.call, r.slot = n, j
        return list(groups.items())

    def _send(self, recs: list[Inflight]) -> None:
        """Dispatch from the driver (asynchronous schedules): the aggregator fetches the results."""
        for i, group in self._groups(recs):
            refs = train_call(self.actors[i], self.model_ref, [r.task for r in group], self.shared)
            for r in group:
                r.call_refs = refs

    # ------------------------------------------------------------ resolution
    def _row(self, r: Inflight, event: str, **extra) -> dict:
        a = r.task.assignment
        p = self.setup.profiles[a.client_id]
        row = {"event": event, "round": r.round, "version": r.task.version, "dispatch_id": r.dispatch_id,
               "client_id": a.client_id, "tier": p.tier, "slow": bool(self.slow[a.client_id]),
               "t_start": r.t_start, "virtual_s": r.t_end, "round_s": r.t_end - r.t_start,
               "compute_s": r.cost.compute_s, "comm_s": r.cost.download_s + r.cost.upload_s,
               "bytes_down": r.cost.bytes_down, "bytes_up": r.cost.bytes_up if event != "drop" else 0,
               "train_flops": r.flops, "energy_j": r.energy_j,
               "sparse_train_flops": int(r.flops * self._density_factor(a.mask))}
        row.update(dict(a.info))
        row.update(extra)
        return row

    def _items(self, ups: list[Inflight]) -> tuple[list, list]:
        """Aggregator input ``(calls, items)``: the *references* of each actor call (the aggregator
        fetches them itself, so the driver never waits for a training result before the
        aggregation call; each reference travels once), and per update ``(call index, slot,
        expected keys)`` in admission order."""
        calls: dict = {}
        items = []
        for r in ups:
            i = calls.setdefault(r.call_refs[0], (len(calls), r.call_refs))[0]
            items.append((i, r.slot, self._expected(r.task)))
        return [refs for _, refs in calls.values()], items

    def _resolve(self, recs: list[Inflight], *, force: bool, evaluate: bool) -> dict | None:
        """Hand finished records (already in order) to the aggregator; record every event."""
        ups = [r for r in recs if r.outcome == "update"]
        res = None
        if ups or force:
            res = ray.get(self.aggregator.receive.remote(*self._items(ups), force, evaluate))
        self._record(recs, res)
        if res is not None and res["aggregated"]:
            self.version = res["version"]
            self.model_ref = res["model_ref"][0]
        return res

    def _record(self, recs: list[Inflight], res: dict | None, window: int | None = None) -> None:
        """Read the headers of ``recs``, feed the method its telemetry, write every event row.
        ``window``: the server's version when they arrived (default: the current one; a
        synchronous round's is the version it trained on, the loop being rounds ahead)."""
        window = self.version if window is None else window
        ups = [r for r in recs if r.outcome == "update"]
        if res is not None and "headers" in res:  # a round the aggregator dispatched brings them
            headers = {r.dispatch_id: _slot(res["headers"][r.call], r.slot) for r in ups}
        else:
            headers = self._headers(ups)
        reasons = dict(res["results"]) if res else {}
        staleness = dict(zip([d for d, _ in res["results"]], res["staleness"])) if res else {}
        rows = []
        for r in recs:
            self.busy[r.task.assignment.client_id] = False
            if r.outcome != "update":
                rows.append(self._row(r, r.outcome, window=window))
                continue
            h = headers[r.dispatch_id]
            if isinstance(h, Exception):  # the actor or its node is gone (after Ray's retries)
                rows.append(self._row(r, "drop", window=window, reason=type(h).__name__))
                continue
            if self.cfg.devices.mode == "real":
                r.t_end = r.t_start + h.wall_s + r.cost.download_s + r.cost.upload_s + 2 * r.cost.latency_s
            self.method.observe(h)
            reason = reasons.get(r.dispatch_id)
            rows.append(self._row(r, "reject" if reason else "update", window=window, reason=reason,
                                  staleness=staleness.get(r.dispatch_id), examples=h.num_examples,
                                  train_loss=h.train_loss, bytes_up=h.bytes_up, client_wall_s=h.wall_s))
        if res is not None and res["aggregated"] and res.get("method_state") is not None:
            self.method.sync_from_server(res["method_state"])
        rows.sort(key=lambda x: (x["virtual_s"], x["dispatch_id"]))
        wall = self._wall(res)
        for row in rows:
            self._account(row, wall)

    @staticmethod
    def _headers(recs: list[Inflight]) -> dict:
        """Update headers by dispatch id (one fetch per actor call); a lost one becomes its exception."""
        calls = cluster.fetch_lists([r.call_refs[0] for r in recs])
        return {r.dispatch_id: _slot(calls[r.call_refs[0]], r.slot) for r in recs}

    def _expected(self, task: Task) -> list[str]:
        m = task.assignment.mask
        return list(self.like) if m is None else [k for k, v in m.items() if v.any()]

    def _wall(self, res: dict | None = None) -> float:
        """Wall seconds since the first dispatch: when the aggregator finished ``res`` (it stamps
        its results; rounds are read in windows), else now."""
        now = res["done_at"] if res is not None and "done_at" in res else time.time()
        return max(0.0, now - self.t0)  # another node's clock may be a little behind

    def _account(self, row: dict, wall: float) -> None:
        tot = self.totals
        row["wall_s"] = wall
        self.recorder.event(**row)
        tot.bytes_down += row["bytes_down"]
        tot.bytes_up += row["bytes_up"]
        tot.train_flops += row["train_flops"]
        tot.sparse_train_flops += row["sparse_train_flops"]
        tot.energy_j += row["energy_j"]
        ev = row["event"]
        tot.updates += ev == "update"
        tot.dropped += ev == "drop"
        tot.late += ev == "late"
        tot.rejected += ev == "reject"

    # ------------------------------------------------------------ schedules
    def _wake_s(self) -> float:
        return min(60.0, self.cfg.devices.availability_cycle_s / 10)

    def _sync(self, on_aggregate) -> None:
        """Synchronous rounds, dispatched to the client actors by the aggregator, which
        aggregates and ends each round in a new version (``AggregatorActor.rounds``). For
        methods whose planning needs no feedback from finished rounds the loop plans rounds
        ahead and hands them over in calls of about :data:`CALL_S` seconds of rounds (at most
        ``cluster.rounds_per_call``), and queues the next call before reading the last one's
        results, so the aggregator goes from round to round without waiting for the driver."""
        cfg = self.cfg
        pipelined = not self.method.feedback and cfg.devices.mode == "simulated"
        per_call = min(2, cfg.cluster.rounds_per_call) if pipelined else 1
        t, r = 0.0, 0
        planned: list = []  # [(recs, plan, round)] not sent yet
        waiting = None  # (planned, ref) of the call whose results are not read yet
        last_done = None  # completion stamp of the last round read

        def send():
            nonlocal planned, waiting, per_call, last_done
            ref = self.aggregator.rounds.remote([plan for _, plan, _ in planned])
            if waiting is not None:
                done = self._close(*waiting, on_aggregate)
                first = last_done if last_done is not None else done[0]
                n = len(done) if last_done is not None else len(done) - 1
                if n:  # size the next calls by the measured seconds per round
                    per_call = max(1, min(cfg.cluster.rounds_per_call, int(CALL_S * n / max(done[-1] - first, 1e-6))))
                last_done = done[-1]
            waiting, planned = (planned, ref), []
            if not pipelined:
                self._close(*waiting, on_aggregate)
                waiting = None

        while self.version < cfg.server.rounds and not self._out_of_time(t) and not self.method.finished():
            cand = self.available(t)
            if len(cand) == 0:
                t += self._wake_s()
                continue
            sel = self.method.select(seeding.rng(cfg.seed, "select", r), cand, cfg.server.clients_per_round)
            recs = sorted(self._launch(sel, t, r, deadline_rule=self.method.deadline))
            dispatch = [(i, [x.task for x in group]) for i, group in self._groups(recs)]
            items = [(x.call, x.slot, self._expected(x.task)) for x in recs if x.outcome == "update"]
            planned.append((recs, (dispatch, items, self._eval_due()), r))
            self.version += 1
            for x in recs:  # every client of a synchronous round is done when the round ends
                self.busy[x.task.assignment.client_id] = False
            r += 1
            if len(planned) == per_call:
                send()
            # the round lasts as long as its slowest client (or the deadline); in real mode its
            # ends are the measured ones, known once the round is read (``send`` above)
            t = max(x.t_end for x in recs)
        if planned:
            send()
        if waiting is not None:
            self._close(*waiting, on_aggregate)

    def _close(self, planned: list, ref, on_aggregate) -> list[float]:
        """Record a call's rounds; returns their completion stamps."""
        results = ray.get(ref)
        for (recs, _, r), res in zip(planned, results):
            self._record(recs, res, window=recs[0].task.version)
            on_aggregate(res, max(x.t_end for x in recs), r)
        return [res["done_at"] for res in results]

    def _async(self, on_aggregate) -> None:
        cfg = self.cfg
        heap: list = []
        interval = self.method.schedule == "interval"
        t = 0.0
        if interval:
            heapq.heappush(heap, (self.method.interval_s(), -1, "tick", None))
        conc = self.method.concurrency()
        inflight = 0
        draws = 0
        waking = False

        def refill(now):
            nonlocal inflight, draws, waking
            need = conc - inflight
            if need <= 0:
                return
            cand = self.available(now)
            if len(cand) == 0:
                if not waking:
                    heapq.heappush(heap, (now + self._wake_s(), -2, "wake", None))
                    waking = True
                return
            sel = self.method.select(seeding.rng(cfg.seed, "select", draws), cand, need)
            draws += 1
            recs = self._launch(sel, now, self.version)
            self._send(recs)
            for rec in recs:
                heapq.heappush(heap, (rec.t_end, rec.dispatch_id, "end", rec))
                inflight += 1

        refill(t)
        while self.version < cfg.server.rounds and heap and not self.method.finished():
            t, _, kind, rec = heapq.heappop(heap)
            if self._out_of_time(t):
                break
            if kind == "tick":
                res = self._resolve([], force=True, evaluate=self._eval_due())
                if res and res["aggregated"]:
                    on_aggregate(res, t, self.version - 1)
                heapq.heappush(heap, (t + self.method.interval_s(), -1, "tick", None))
                continue
            if kind == "wake":
                waking = False
            if kind == "end":
                inflight -= 1
                before = self.version
                res = self._resolve([rec], force=False, evaluate=self._eval_due())
                if res and res["aggregated"] and self.version > before:
                    on_aggregate(res, t, self.version - 1)
            refill(t)
        # records still in flight at the end are abandoned (not counted as spent)

    def _out_of_time(self, t: float) -> bool:
        lim = self.cfg.server.max_virtual_s
        return lim is not None and t >= lim

    def _eval_due(self) -> bool:
        nxt = self.version + 1
        return nxt % self.cfg.server.eval_every == 0 or nxt >= self.cfg.server.rounds

    # ------------------------------------------------------------ main
    def run(self) -> dict:
        cfg = self.cfg
        t_setup = time.time()
        self._start()
        self.t0 = time.time()
        setup_s = self.t0 - t_setup
        tot = self.totals
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.server.rounds, desc=f"{cfg.method.name} s{cfg.seed}", unit="agg", dynamic_ncols=True)
        state = {"best": -1.0, "acc": float("nan"), "loss": float("nan"), "t": 0.0, "last_agg_t": 0.0,
                 "target_s": None}
        target = cfg.server.target_accuracy

        def on_aggregate(res, t, rnd):
            wall = self._wall(res)
            v = res["version"]  # the version this result closed (a pipelined loop is already past it)
            state["t"] = t
            self.recorder.event(event="aggregate", round=rnd, version=v, virtual_s=t, wall_s=wall,
                                buffer=res.get("buffer", 0), fill_s=t - state["last_agg_t"])
            rejected = res.get("rejected", {})
            self.recorder.scalars(v, {"agg/buffer": res.get("buffer", 0), "agg/fill_s": t - state["last_agg_t"],
                                      **{f"agg/rejected/{k}": rejected.get(k, 0) for k in REASONS}})
            self.recorder.histogram("agg/staleness", [x for x in res.get("staleness", []) if x is not None], v)
            state["last_agg_t"] = t
            if "accuracy" in res:
                acc, loss = res["accuracy"], res["loss"]
                state["acc"], state["loss"], state["best"] = acc, loss, max(state["best"], acc)
                self.method.on_eval(acc, loss)
                if target is not None and state["target_s"] is None and acc >= target:
                    state["target_s"] = t
                self.recorder.event(event="eval", round=rnd, version=v, accuracy=acc, loss=loss,
                                    wall_s=wall, virtual_s=t)
                self.recorder.scalars(v, {
                    "eval/accuracy": acc, "eval/loss": loss, "cost/bytes_up": tot.bytes_up,
                    "cost/bytes_down": tot.bytes_down, "cost/train_flops": tot.train_flops,
                    "cost/energy_j": tot.energy_j, "time/wall_s": wall, "time/virtual_s": t}, virtual_s=t)
                if self.report is not None:
                    self.report({"accuracy": acc, "loss": loss, "version": v, "virtual_s": t,
                                 "wall_s": wall})
            if bar is not None:
                bar.set_postfix(acc=f"{state['acc']:.3f}", vt=f"{t:.0f}s")
                bar.update(v - bar.n)

        try:
            if self.method.schedule == "sync":
                self._sync(on_aggregate)
            else:
                self._async(on_aggregate)
            params = ray.get(self.aggregator.params.remote())
            stats = ray.get(self.aggregator.stats.remote())
            placement = {str(pool): ray.get([a.node_id.remote() for a in actors]) for pool, actors in self.pools.items()}
        finally:
            if bar is not None:
                bar.close()
        wall = time.time() - self.t0
        np.savez(self.run_dir / "model.npz", **{k: params[k] for k in sorted(params)})
        table = self.recorder.table()
        derived = definitions.summarize(table, slow_total=int(self.slow.sum()), target=target)
        summary = {
            "experiment": cfg.experiment, "method": cfg.method.name, "seed": cfg.seed,
            "final_accuracy": state["acc"], "best_accuracy": state["best"], "final_loss": state["loss"],
            "rounds": self.version, "version": self.version, "wall_s": wall, "setup_s": setup_s,
            "virtual_s": state["t"], "bytes_up": tot.bytes_up, "bytes_down": tot.bytes_down,
            "train_flops": tot.train_flops, "sparse_train_flops": tot.sparse_train_flops, "energy_j": tot.energy_j,
            "updates": tot.updates,
            "dropped": tot.dropped, "late": tot.late, "rejected": tot.rejected,
            "rejected_by_reason": stats["rejected"], "model_puts": stats["puts"],
            "model_inline": stats["inlined"],
            "model_sha256": model_digest(params), "run_dir": str(self.run_dir), "placement": placement, **derived,
        }
        if target is not None:
            summary["target_accuracy"] = target
            summary["time_to_target_s"] = state["target_s"]
        # the papers' seed metrics, under the same tags for every method
        self.recorder.scalars(self.version, {  # NaN where a run has no value (target never reached)
            f"summary/{k}": summary[k] if isinstance(summary.get(k), (int, float)) else math.nan
            for k in SUMMARY_TAGS}, virtual_s=state["t"])
        self.recorder.close(summary)
        self.shutdown()
        return summary

    def shutdown(self) -> None:
        for a in getattr(self, "actors", []):
            ray.kill(a)
        if getattr(self, "aggregator", None) is not None:
            ray.kill(self.aggregator)
        if getattr(self, "placement_group", None) is not None:
            ray.util.remove_placement_group(self.placement_group)
        if getattr(self, "owns_ray", False):
            ray.shutdown()


def run(cfg: C.ExperimentConfig, **kwargs) -> dict:
    return Runner(cfg, **kwargs).run()
