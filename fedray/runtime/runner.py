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

import hashlib
import math
import time
from pathlib import Path

import numpy as np
import ray

from fedray import config as C
from fedray import seeding
from fedray.aggregation.actor import AggregatorActor
from fedray.aggregation.validate import REASONS
from fedray.channel import Channel
from fedray.client.actor import ClientActor, train_call
from fedray.errors import ConfigError
from fedray.methods import registry
from fedray.methods.base import PlanContext
from fedray.metrics import definitions
from fedray.metrics.recorder import Recorder
from fedray.runtime import cluster
from fedray.runtime.accounting import Accounting
from fedray.runtime.dispatch import Dispatcher
from fedray.runtime.schedulers import run_async, run_sync
from fedray.runtime.setup import prepare

__all__ = ["Runner", "run", "model_digest", "SUMMARY_TAGS"]

SUMMARY_TAGS = ("sdir", "sdir_layers", "slow_coverage", "time_to_target_s", "train_flops", "sparse_train_flops",
                "flops_per_accuracy_point", "bytes_up", "bytes_down", "server_egress", "energy_j", "virtual_s")


def model_digest(params: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(params):
        v = np.ascontiguousarray(params[k])
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.tobytes())
    return h.hexdigest()


def spread(values) -> dict[str, float]:
    """Mean, standard deviation, minimum and 10th / 90th percentiles of per-client values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}


class Runner:
    """One federated run of one method and seed."""

    def __init__(self, cfg: C.ExperimentConfig, *, run_dir: str | Path | None = None, progress: bool | None = None,
                 report=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
        self.progress = cfg.runtime.progress if progress is None else progress
        self.report = report  # callable(dict) after each evaluation (Ray Tune)

    # ------------------------------------------------------------ setup
    def _start(self) -> None:
        cfg = self.cfg
        self.method = registry.get(cfg.method.name)
        if cfg.devices.mode == "real" and self.method.schedule != "sync":
            raise ConfigError("devices.mode", f"'real' throttling runs synchronous methods; {cfg.method.name} is {self.method.schedule}")
        self.setup = s = prepare(cfg)  # data, model and devices: their mistakes show before Ray starts
        ds = s.dataset
        if self.method.needs_spec:
            s.model.spec_for(cfg.method.name)  # a clear error now if the model has no layer structure
        self.owns_ray = cluster.connect(cfg.cluster)
        self.channel = Channel(s.model.like)
        self.planner = self.method.Planner(PlanContext(cfg, cfg.method.name, cfg.method.params, s.model, self.channel,
                                                       s.profiles, s.examples))
        # one put of the data set for the whole run; actors read it zero-copy. The driver keeps the
        # references, so a restarted actor reads them again.
        self.shared = [ray.put({"x": ds.x_train, "y": ds.y_train}), ray.put(s.partitions)]
        test_ref = ray.put({"x": ds.x_test, "y": ds.y_test})
        self.pools, self.placement_group = cluster.create_client_actors(
            cfg, s.profiles, lambda opts: ClientActor.options(**opts).remote(cfg, ds.input_shape, ds.num_classes))
        self.actors, actor_index = [], {}
        for pool, actors in self.pools.items():
            for i, a in enumerate(actors):
                actor_index[(pool, i)] = len(self.actors)
                self.actors.append(a)
        self.aggregator = AggregatorActor.options(num_cpus=cfg.cluster.aggregator_cpus).remote(
            cfg, s.params, test_ref, ds.input_shape, ds.num_classes)
        self.aggregator.attach.remote(self.actors, self.shared)  # it dispatches synchronous rounds
        started = ray.get(self.aggregator.start.remote())
        self.model_ref = started["model_ref"][0]
        if started["message"] is not None:
            self.planner.receive(started["message"])
        self.dispatcher = Dispatcher(cfg, s, self.planner, self.channel, self.pools, actor_index)
        self.recorder = Recorder(self.run_dir, tensorboard=cfg.runtime.tensorboard)
        C.dump(cfg, self.run_dir / "config.yaml")

    def send(self, recs) -> None:
        """Dispatch asynchronous-schedule records: from the driver, or through the aggregator for
        methods with client state (it attaches each client's state); the aggregator fetches the
        results."""
        d = self.dispatcher
        groups = d.groups(recs)
        if not groups:
            return
        if self.method.client_state:
            refs = ray.get(self.aggregator.dispatch.remote([(i, [r.task for r in g]) for i, g in groups]))
            for (_, group), call in zip(groups, refs):
                for r in group:
                    r.call_refs = call
            return
        for i, group in groups:
            call = train_call(self.actors[i], self.model_ref, [r.task for r in group], self.shared)
            for r in group:
                r.call_refs = call

    # ------------------------------------------------------------ schedule helpers
    def out_of_time(self, t: float) -> bool:
        lim = self.cfg.server.max_virtual_s
        return lim is not None and t >= lim

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

    # ------------------------------------------------------------ main
    def run(self) -> dict:
        cfg = self.cfg
        t_setup = time.time()
        self._start()
        self.t0 = time.time()
        setup_s = self.t0 - t_setup
        self.accounting = acc = Accounting(cfg, self.dispatcher, self.planner, self.recorder, self.t0)
        tot = acc.totals
        primary = self.setup.task.primary
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.server.rounds, desc=f"{cfg.method.name} s{cfg.seed}", unit="agg", dynamic_ncols=True)
        state = {"best": -math.inf, "score": float("nan"), "loss": float("nan"), "t": 0.0, "last_agg_t": 0.0,
                 "target_s": None, "clients": {}}
        target = cfg.server.target_accuracy

        def on_aggregate(res, t, rnd):
            wall = acc.wall(res)
            v = res["version"]  # the version this result closed (a pipelined loop is already past it)
            state["t"] = t
            self.recorder.event(event="aggregate", round=rnd, version=v, virtual_s=t, wall_s=wall,
                                buffer=res.get("buffer", 0), fill_s=t - state["last_agg_t"])
            rejected = res.get("rejected", {})
            self.recorder.scalars(v, {"agg/buffer": res.get("buffer", 0), "agg/fill_s": t - state["last_agg_t"],
                                      **{f"agg/rejected/{k}": rejected.get(k, 0) for k in REASONS}})
            self.recorder.histogram("agg/staleness", [x for x in res.get("staleness", []) if x is not None], v)
            state["last_agg_t"] = t
            metrics = res.get("metrics")
            clients = res.get("clients")
            if clients is None and self.method.schedule != "sync":
                due = self.client_eval_due(v)
                clients = ray.get(self.aggregator.client_metrics.remote(due)) if due else None
            extra = {}
            if clients:
                sp = spread(m[primary] for m in clients.values())
                state["clients"] = sp
                extra = {f"client_{primary}_{k}": x for k, x in sp.items()}
            if metrics:
                score, loss = metrics[primary], metrics["loss"]
                state["score"], state["loss"], state["best"] = score, loss, max(state["best"], score)
                self.planner.on_eval(score, loss)
                if target is not None and state["target_s"] is None and score >= target:
                    state["target_s"] = t
                self.recorder.event(event="eval", round=rnd, version=v, **metrics, wall_s=wall, virtual_s=t, **extra)
                self.recorder.scalars(v, {
                    **{f"eval/{k}": x for k, x in metrics.items()}, "cost/bytes_up": tot.bytes_up,
                    "cost/bytes_down": tot.bytes_down, "cost/train_flops": tot.train_flops,
                    "cost/energy_j": tot.energy_j, "time/wall_s": wall, "time/virtual_s": t,
                    **{f"clients/{primary}_{k}": x for k, x in state["clients"].items() if extra}}, virtual_s=t)
                if self.report is not None:
                    self.report({**metrics, "version": v, "virtual_s": t, "wall_s": wall})
            elif extra:
                self.recorder.event(event="client_eval", round=rnd, version=v, wall_s=wall, virtual_s=t, **extra)
            if bar is not None:
                bar.set_postfix({primary[:3]: f"{state['score']:.3f}", "vt": f"{t:.0f}s"})
                bar.update(v - bar.n)

        try:
            (run_sync if self.method.schedule == "sync" else run_async)(self, on_aggregate)
            params = ray.get(self.aggregator.params.remote())
            stats = ray.get(self.aggregator.stats.remote())
            placement = {str(pool): ray.get([a.node_id.remote() for a in actors]) for pool, actors in self.pools.items()}
        finally:
            if bar is not None:
                bar.close()
        wall = time.time() - self.t0
        np.savez(self.run_dir / "model.npz", **{k: params[k] for k in sorted(params)})
        table = self.recorder.table()
        derived = definitions.summarize(table, slow_total=int(self.dispatcher.slow.sum()), metric=primary)
        best = state["best"] if math.isfinite(state["best"]) else -1.0
        summary = {
            "experiment": cfg.experiment, "method": cfg.method.name, "seed": cfg.seed, "metric": primary,
            f"final_{primary}": state["score"], f"best_{primary}": best, "final_loss": state["loss"],
            "rounds": self.dispatcher.version, "version": self.dispatcher.version, "wall_s": wall, "setup_s": setup_s,
            "virtual_s": state["t"], "bytes_up": tot.bytes_up, "bytes_down": tot.bytes_down,
            "server_egress": tot.egress_bytes, "train_flops": tot.train_flops,
            "sparse_train_flops": tot.sparse_train_flops, "energy_j": tot.energy_j, "updates": tot.updates,
            "dropped": tot.dropped, "late": tot.late, "rejected": tot.rejected,
            "rejected_by_reason": stats["rejected"], "model_puts": stats["puts"], "model_inline": stats["inlined"],
            "client_state_bytes": stats["client_state_bytes"],
            "model_sha256": model_digest(params), "run_dir": str(self.run_dir), "placement": placement, **derived,
            **{f"client_{primary}_{k}": x for k, x in state["clients"].items()},
        }
        if target is not None:
            summary["target_accuracy"] = target
            summary["time_to_target_s"] = state["target_s"]
        # the papers' seed metrics, under the same tags for every method
        tags = (f"final_{primary}", f"best_{primary}") + SUMMARY_TAGS
        self.recorder.scalars(self.dispatcher.version, {  # NaN where a run has no value (target never reached)
            f"summary/{k}": summary[k] if isinstance(summary.get(k), (int, float)) else math.nan
            for k in tags}, virtual_s=state["t"])
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
