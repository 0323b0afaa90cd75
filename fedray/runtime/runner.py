"""One federated run of one method and seed: set up, run the schedule, write the results.

The runner sets up data, devices, the method's planner, client actors and the aggregator
(:mod:`fedray.runtime.setup`, :mod:`fedray.runtime.cluster`), runs the method's schedule
(:mod:`fedray.runtime.schedulers`), and records every event and evaluation
(:mod:`fedray.runtime.accounting`, :mod:`fedray.metrics.recorder`). In ``devices.mode: real``
the client actors are really slowed (duty cycle, threads, CPU share) and round times are the
measured seconds of training plus the simulated communication; only synchronous schedules
run in real mode.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import ray

from fedray import config as C
from fedray import runs, security, seeding
from fedray.aggregation.actor import AggregatorActor
from fedray.channel import Channel
from fedray.client.actor import ClientActor, train_call
from fedray.errors import ConfigError, Interrupted, RunStopped
from fedray.methods import registry
from fedray.methods.base import PlanContext
from fedray.metrics.recorder import Recorder
from fedray.runtime import checkpoint, cluster, summary
from fedray.privacy.accountant import Ledger
from fedray.runtime.accounting import Accounting, Totals
from fedray.runtime.dispatch import Dispatcher
from fedray.runtime.pool import ActorPool
from fedray.runtime.progress import Progress, make_bar
from fedray.runtime.summary import model_digest
from fedray.runtime.schedulers import scheduler_for
from fedray.runtime.setup import prepare

__all__ = ["Runner", "run", "model_digest"]

class Runner:
    """One federated run of one method and seed. ``resume``: continue the run in ``run_dir``
    from its last checkpoint."""

    def __init__(self, cfg: C.ExperimentConfig, *, run_dir: str | Path | None = None, progress: bool | None = None,
                 report=None, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
        self.progress = cfg.runtime.progress if progress is None else progress
        self.report = report  # callable(dict) after each evaluation (Ray Tune)
        self.resume = resume
        self.stopping: str | None = None  # the signal that asked the run to stop
        self.checkpoints = 0
        self.recoveries = 0  # aggregators restored from a checkpoint
        self.ledger = Ledger(cfg, security.expected_updates(cfg)) if cfg.privacy.enabled else None
        self.final = None  # (params, stats) of the aggregator once the schedule is done (read in the recovery loop)
        self.version_refs: dict[int, object] = {}  # model versions that dispatches in flight started from

    @property
    def checkpoint_dir(self) -> str:
        return checkpoint.of_run(self.cfg.runtime.checkpoint_dir, self.run_dir)

    # ------------------------------------------------------------ setup
    def _start(self) -> None:
        cfg = self.cfg
        self.method = registry.get(cfg.method.name)
        if cfg.devices.mode == "real" and self.method.schedule != "sync":
            raise ConfigError("devices.mode", f"'real' throttling runs synchronous methods; {cfg.method.name} is {self.method.schedule}")
        cluster.trains_in_aggregator(cfg, cfg.method.name, self.method.schedule)  # a mistake shows before Ray starts
        self.made = runs.make_writable(self.run_dir)  # before anything else happens
        resumed = None
        if self.resume:
            resumed = self._load_checkpoint()
        self.setup = s = prepare(cfg)  # data, model and devices: their mistakes show before Ray starts
        ds = s.dataset
        if self.method.needs_spec:
            s.model.spec_for(cfg.method.name)  # a clear error now if the model has no layer structure
        self.owns_ray = cluster.connect(cfg.cluster)
        # after ray.init, which installs its own SIGTERM handlers (a stack dump and an exit)
        self._install_signals()  # (what to restore at the end is what the first call replaced)
        cluster.check_resources(cfg, s.profiles)
        self.channel = Channel(s.model.like)
        self.planner = self._new_planner()
        # one put of the data set for the whole run; actors read it zero-copy. The driver keeps the
        # references, so a restarted actor reads them again.
        self.shared = [ray.put({"x": ds.x_train, "y": ds.y_train}), ray.put(s.partitions)]
        self.test_ref = ray.put({"x": ds.x_test, "y": ds.y_test})
        self.pool = ActorPool(cfg, s.profiles, lambda opts: ClientActor.options(**opts).remote(
            cfg, ds.input_shape, ds.num_classes))
        self.placement_group = self.pool.placement_group
        self.aggregator = self._new_aggregator(attach=False)  # its process starts while the client actors' do
        self.pool.start()
        self.aggregator.attach.remote(self.pool.actors, self.shared)
        if resumed is not None:
            ray.get(self.aggregator.load_state_dict.remote(resumed["aggregator"]))
        started = ray.get(self.aggregator.start.remote())
        self.set_model_ref(started["model_ref"][0], resumed["version"] if resumed else 0)
        if started["message"] is not None and resumed is None:
            self.planner.receive(started["message"])
        self.dispatcher = Dispatcher(cfg, s, self.planner, self.channel, self.pool)
        task_columns = {k: pa.float64() for k in s.task.finish({}, 0)}
        spread_columns = {f"client_{s.task.primary}_{k}": pa.float64() for k in ("mean", "std", "min", "p10", "p90")}
        self.recorder = Recorder(self.run_dir, tensorboard=cfg.runtime.tensorboard,
                                 columns={**task_columns, **spread_columns},
                                 resume_parts=resumed["recorder_parts"] if resumed else None,
                                 purge_step=resumed["version"] + 1 if resumed else None)
        self.resumed = resumed
        C.dump(cfg, self.run_dir / "config.yaml")

    def _new_planner(self):
        s, cfg = self.setup, self.cfg
        return self.method.Planner(PlanContext(cfg, cfg.method.name, cfg.method.params, s.model, self.channel,
                                               s.profiles, s.examples))

    def _new_aggregator(self, attach: bool = True):
        s, cfg = self.setup, self.cfg
        gpus = cluster.gpu_share(cfg, aggregator=True)  # evaluation on the GPU where auto finds one
        agg = AggregatorActor.options(num_cpus=cfg.cluster.aggregator_cpus, num_gpus=gpus).remote(
            cfg, s.params, self.test_ref, s.dataset.input_shape, s.dataset.num_classes, s.examples)
        if attach:
            agg.attach.remote(self.pool.actors, self.shared)  # it dispatches synchronous rounds
        return agg

    # ------------------------------------------------------------ talking to the actors
    def set_model_ref(self, ref, version: int) -> None:
        """The current model (asynchronous schedules dispatch from it); versions no dispatch in
        flight started from are forgotten."""
        self.model_ref = ref
        self.version_refs[int(version)] = ref
        sched = getattr(self, "scheduler", None)
        if sched is not None and hasattr(sched, "in_flight"):
            keep = {r.task.version for r in sched.in_flight()} | {int(version)}
            self.version_refs = {v: x for v, x in self.version_refs.items() if v in keep}

    def send(self, recs, model_ref=None) -> None:
        """Dispatch asynchronous-schedule records: from the driver, or through the aggregator for
        methods with client state (it attaches each client's state); the aggregator fetches the
        results. ``model_ref``: the model they train (default: the current one)."""
        groups = self.dispatcher.groups(recs)
        if not groups:
            return
        ref = self.model_ref if model_ref is None else model_ref
        if self.method.client_state:
            refs = self.aggregator_get(self.aggregator.dispatch.remote([(i, [r.task for r in g]) for i, g in groups],
                                                                     [ref]))
            for (i, group), call in zip(groups, refs):
                for r in group:
                    r.call_refs, r.actor, r.gen = call, i, self.pool.gen[i]
            return
        for i, group in groups:
            call = train_call(self.pool.actors[i], ref, [r.task for r in group], self.shared)
            for r in group:
                r.call_refs, r.actor, r.gen = call, i, self.pool.gen[i]

    def redispatch(self, recs) -> None:
        """Send again the trainings in flight at a checkpoint, each from the version it started from."""
        by_version: dict[int, list] = {}
        for r in recs:
            by_version.setdefault(r.task.version, []).append(r)
        for v, group in sorted(by_version.items()):
            ref = self.version_refs.get(v)
            if ref is None:
                ref = self.version_refs[v] = ray.put(self.resumed["params"][v])
            self.send(group, ref)

    def receive(self, ups, force: bool, evaluate: bool, dropped) -> dict:
        """Hand finished records to the aggregator; a training lost with its actor is run again
        first, by another ready actor (or the slot's new one), from the same model version."""
        for _ in range(5):
            lost = [r for r in ups if isinstance(Dispatcher.headers([r])[r.dispatch_id], Exception)]
            if not lost:
                break
            self.lose_actors({(r.actor, r.gen) for r in lost})
            self.redispatch(lost)
        calls, items = self.dispatcher.items(ups)
        return self.aggregator_get(self.aggregator.receive.remote(calls, items, force, evaluate, dropped))

    def lose_actors(self, slots) -> None:
        """``{(slot, generation)}`` whose actor is gone: each replaced once (the pool) and the
        aggregator told."""
        changed = False
        for i, gen in sorted(slots):
            if gen == self.pool.gen[i]:
                self.pool.lose(i)
                changed = True
        if changed:
            self.aggregator_get(self.aggregator.adopt.remote(self.pool.actors))

    def aggregator_get(self, ref):
        """``ray.get`` of an aggregator call; its loss is :class:`AggregatorLost` (the run recovers)."""
        try:
            return ray.get(ref)
        except cluster.LOST as e:
            raise checkpoint.AggregatorLost(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    # ------------------------------------------------------------ schedule helpers
    def out_of_time(self, t: float) -> bool:
        """Past ``server.max_virtual_s``, at the target with ``server.stop_at_target``, or the next
        aggregation would pass ``server.target_epsilon`` (local DP: once it has)."""
        srv = self.cfg.server
        if srv.stop_at_target and self.tracker.state["target_s"] is not None:
            return True
        return (srv.max_virtual_s is not None and t >= srv.max_virtual_s) or (
            self.ledger is not None and self.ledger.exhausted(self.dispatcher.version, self.accounting.totals.sent))

    def eval_due(self) -> bool:
        nxt = self.dispatcher.version + 1
        return nxt % self.cfg.server.eval_every == 0 or nxt >= self.cfg.server.rounds

    def client_eval_due(self, version: int) -> list[int] | None:
        """The clients evaluated on their own data once model ``version`` exists (None: none due)."""
        every = self.cfg.server.client_eval_every
        if not every or not (version % every == 0 or version >= self.cfg.server.rounds):
            return None
        n, k = self.cfg.data.num_clients, self.cfg.server.client_eval_clients
        if k is None or k >= n:
            return list(range(n))
        return sorted(int(c) for c in seeding.rng(self.cfg.seed, "client_eval", version).choice(n, size=k, replace=False))

    # ------------------------------------------------------------ checkpoints
    def checkpoint_due(self, version: int) -> bool:
        every = self.cfg.runtime.checkpoint_every
        return bool(every) and version % every == 0 and version < self.cfg.server.rounds

    def save_checkpoint(self, disk: bool = True) -> None:
        """Everything needed to continue exactly from here (see :mod:`fedray.runtime.checkpoint`),
        kept in memory (what a lost aggregator is restored from) and, with ``disk``, written."""
        self.tracker.flush()
        inflight = self.scheduler.in_flight() if hasattr(self.scheduler, "in_flight") else []
        versions = sorted({r.task.version for r in inflight})
        params = dict(zip(versions, ray.get([self.version_refs[v] for v in versions]))) if versions else {}
        state = {"config": checkpoint.config_digest(C.to_dict(self.cfg)), "version": self.dispatcher.version,
                 "aggregator": self.aggregator_get(self.aggregator.state_dict.remote()),
                 "planner": self.planner.state_dict(), "dispatcher": self.dispatcher.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "totals": dataclasses.asdict(self.accounting.totals),
                 "progress": self.tracker.state_dict(), "recorder_parts": self.recorder.parts, "params": params,
                 "wall_s": self.accounting.wall()}
        self.snapshot = checkpoint.dumps(state)
        if disk:
            checkpoint.save(self.checkpoint_dir, self.snapshot)
            self.checkpoints += 1

    def _load_checkpoint(self) -> dict:
        where = self.checkpoint_dir
        if not checkpoint.exists(where):
            raise ConfigError("--resume", f"'{self.run_dir}' has no checkpoint to resume from ({where})")
        state = checkpoint.load(where)
        if state["config"] != checkpoint.config_digest(C.to_dict(self.cfg)):
            raise ConfigError("--resume", f"the checkpoint in '{where}' belongs to another config than "
                                          f"'{self.run_dir / 'config.yaml'}'")
        return state

    def _restore(self, state) -> None:
        self.planner.load_state_dict(state["planner"])
        self.dispatcher.load_state_dict(state["dispatcher"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.accounting.totals = Totals(**state["totals"])
        self.tracker.load_state_dict(state["progress"])
        self.scheduler.resume()

    def _recover(self, why: str) -> None:
        """The aggregator is gone: a new one from the last checkpoint (in memory), and the driver's
        side rolled back to the same point; the aggregations since then are done again, so the
        run's results are those of an undisturbed run."""
        self.recoveries += 1
        if self.recoveries > self.cfg.cluster.max_aggregator_restarts:
            raise RuntimeError(f"the aggregator was lost {self.recoveries} times (last: {why})")
        state = checkpoint.loads(self.snapshot)
        print(f"aggregator lost ({why}); restoring it from aggregation {state['version']}", file=sys.stderr, flush=True)
        try:
            ray.kill(self.aggregator)
        except Exception:
            pass
        self.aggregator = self._new_aggregator()  # (lost again while restoring: the next try)
        self.aggregator_get(self.aggregator.load_state_dict.remote(state["aggregator"]))
        self.version_refs = {}
        self.set_model_ref(self.aggregator_get(self.aggregator.start.remote())["model_ref"][0], state["version"])
        self.recorder.truncate(state["recorder_parts"], purge_step=state["version"] + 1)
        s, cfg = self.setup, self.cfg  # fresh driver parts (no cache of the lost future survives)
        self.planner = self._new_planner()
        self.dispatcher = Dispatcher(cfg, s, self.planner, self.channel, self.pool)
        self.accounting = Accounting(cfg, self.dispatcher, self.planner, self.recorder, self.accounting.t0)
        self.scheduler = scheduler_for(self)
        self.resumed = state
        self._restore(state)

    # ------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        if self.stopping is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.stopping is None:
            self.stopping = signal.Signals(signum).name
            print(f"{self.stopping}: finishing the aggregation in progress, then saving a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    # ------------------------------------------------------------ main
    def run(self) -> dict:
        cfg = self.cfg
        t_setup = time.time()
        self._old_signals = self._install_signals()
        started, status, error, failure = False, "completed", None, None
        summary = None
        try:
            self._start()
            started = True
            self.t0 = time.time()
            self.setup_s = self.t0 - t_setup
            self.accounting = Accounting(cfg, self.dispatcher, self.planner, self.recorder, self.t0)
            bar = make_bar(cfg.server.rounds, f"{cfg.method.name} s{cfg.seed}", "agg") if self.progress else None
            self.tracker = Progress(self, bar)
            self.scheduler = scheduler_for(self)
            if self.resumed is not None:
                self.accounting.t0 -= self.resumed["wall_s"]  # wall time continues from the checkpoint's
                self._restore(self.resumed)
                if bar is not None:
                    bar.update(self.dispatcher.version)
            self.save_checkpoint(disk=False)  # what a lost aggregator is restored from, until the first one
            try:
                lost = None
                while True:
                    try:
                        if lost is not None:
                            self._recover(lost)
                        self.scheduler(self.tracker)
                        # read the model here: an aggregator lost after its last aggregation is
                        # recovered like one lost before it
                        self.final = (self.aggregator_get(self.aggregator.params.remote()),
                                      self.aggregator_get(self.aggregator.stats.remote()))
                        break
                    except checkpoint.AggregatorLost as e:
                        lost = str(e)
            finally:
                if bar is not None:
                    bar.close()
            if self.stopping:
                status = "interrupted"
                self.save_checkpoint()
        except KeyboardInterrupt:
            status, self.stopping = "interrupted", self.stopping or "SIGINT"
        except RunStopped as e:
            status, error, failure = "failed", str(e), e
        except BaseException as e:
            if not started:
                runs.drop_empty(getattr(self, "made", ()))  # a run that never started leaves no empty folders
                raise
            status, error, failure = "failed", _one_line(e), e
        finally:
            try:
                if started:
                    summary = self._finish(status, error)
            finally:
                for sig, h in self._old_signals.items():
                    signal.signal(sig, h)
                self.shutdown()
        if status == "interrupted":
            raise Interrupted(self.stopping, 130 if self.stopping == "SIGINT" else 143, str(self.run_dir),
                              summary["version"] if summary else 0, self.checkpoint_dir if self.checkpoints else None)
        if failure is not None:
            raise failure
        return summary

    def _finish(self, status: str, error: str | None) -> dict:
        s = summary.write(self, status, error)
        if s.get("client_error"):  # rejected like a poisoned update, but a bug the user must see
            n = s["rejected_by_reason"].get("client_error", 0)
            print(f"warning: {self.cfg.method.name} seed {self.cfg.seed}: {n} updates failed on the client, the first "
                  f"with {s['client_error']} (summary.json: client_error)", file=sys.stderr)
        return s

    def shutdown(self) -> None:
        for a in self.pool.actors if getattr(self, "pool", None) is not None else []:
            if a is not None:
                ray.kill(a)
        if getattr(self, "aggregator", None) is not None:
            ray.kill(self.aggregator)
        if getattr(self, "placement_group", None) is not None:
            ray.util.remove_placement_group(self.placement_group)
        if getattr(self, "owns_ray", False):
            ray.shutdown()
            self.owns_ray = False


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def run(cfg: C.ExperimentConfig, **kwargs) -> dict:
    return Runner(cfg, **kwargs).run()
