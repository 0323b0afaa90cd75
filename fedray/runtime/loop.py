"""The driver loop: set up data, actors and aggregator, then run the method's
schedule and record every event.

The loop makes every ``dispatch_id``, predicts every cost at dispatch time and
hands finished updates to the aggregator in a fixed order (for synchronous
rounds: the order of dispatch; for asynchronous schedules: virtual finish
time), so results never depend on which Ray worker finished first.
"""
from __future__ import annotations

import hashlib
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
from fedray.client.actor import ClientActor, Task
from fedray.client.trainer import get_params
from fedray.data.datasets import Dataset, load_dataset
from fedray.data.partition import cached_partition, partition
from fedray.methods import registry
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


@dataclass
class Setup:
    """Everything a run needs before the first dispatch."""

    cfg: C.ExperimentConfig
    dataset: Dataset
    partitions: list[np.ndarray]
    params: dict[str, np.ndarray]
    spec: ModelSpec
    setup_s: float = 0.0


def prepare(cfg: C.ExperimentConfig) -> Setup:
    """Load data (once), partition it (cached), build the initial model and its spec."""
    t0 = time.perf_counter()
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
    return Setup(cfg, ds, parts, get_params(model), spec, time.perf_counter() - t0)


@dataclass
class Totals:
    bytes_up: int = 0
    bytes_down: int = 0
    train_flops: int = 0
    updates: int = 0
    dropped: int = 0
    rejected: int = 0
    history: list = field(default_factory=list)  # (version, virtual_s, wall_s, accuracy, loss)


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
        data_ref = ray.put({"x": ds.x_train, "y": ds.y_train})
        parts_ref = ray.put(s.partitions)
        test_ref = ray.put({"x": ds.x_test, "y": ds.y_test})
        opts = cluster.actor_options(cfg.cluster.client_actor)
        self.actors = [ClientActor.options(**opts).remote(cfg, data_ref, parts_ref, ds.input_shape, ds.num_classes)
                       for _ in range(cfg.cluster.num_client_actors)]
        self.aggregator = AggregatorActor.options(num_cpus=cfg.cluster.aggregator_cpus).remote(
            cfg, s.params, test_ref, ds.input_shape, ds.num_classes, s.spec)
        self.model_ref = ray.get(self.aggregator.model_ref.remote())[0]
        self.version = 0
        self.next_dispatch = 0
        self.like = s.params  # shapes and dtypes of the global model
        self.full_bytes = payload_nbytes(s.params)
        self.recorder = Recorder(self.run_dir, tensorboard=cfg.runtime.tensorboard)
        C.dump(cfg, self.run_dir / "config.yaml")

    # ------------------------------------------------------------ dispatch helpers
    def _task(self, client_id: int) -> Task:
        a = self.method.plan(int(client_id), self.version)
        t = Task(dispatch_id=self.next_dispatch, version=self.version, assignment=a)
        self.next_dispatch += 1
        return t

    def _costs(self, task: Task) -> dict:
        """Predicted (deterministic) costs of a task: FLOPs and bytes both ways."""
        a = task.assignment
        spec, tc = self.setup.spec, self.cfg.train
        n = len(self.setup.partitions[a.client_id])
        epochs = a.local_epochs if a.local_epochs is not None else tc.local_epochs
        steps = a.local_steps if a.local_steps is not None else tc.local_steps
        if a.trainable is not None:
            trained = {spec.layer_of_key(k).name for k in a.trainable}
        elif a.mask is not None:
            trained = {spec.layer_of_key(k).name for k, m in a.mask.items() if k in spec.param_keys and m.any()}
        else:
            trained = set(spec.layer_names)
        return {"train_flops": spec.train_flops(trained, examples_processed(n, tc.batch_size, epochs, steps)),
                "bytes_down": self.full_bytes,
                "bytes_up_pred": payload_nbytes(self.like, a.mask)}

    def _dispatch(self, tasks: list[Task]) -> list[tuple[Task, ray.ObjectRef, ray.ObjectRef]]:
        """Send tasks to actors (round-robin), one call per actor; returns (task, header_ref, payload_ref)."""
        out = []
        A = len(self.actors)
        for i in range(min(A, len(tasks))):
            group = tasks[i::A]
            refs = self.actors[i].train_many.options(num_returns=2 * len(group)).remote(self.model_ref, group)
            for j, t in enumerate(group):
                out.append((t, refs[2 * j], refs[2 * j + 1]))
        out.sort(key=lambda x: x[0].dispatch_id)
        return out

    @staticmethod
    def _expected(task: Task, like) -> list[str]:
        m = task.assignment.mask
        return list(like) if m is None else [k for k, v in m.items() if v.any()]

    # ------------------------------------------------------------ the sync schedule
    def _sync_round(self, r: int, t_start: float) -> dict:
        cfg = self.cfg
        candidates = np.arange(cfg.data.num_clients)
        selected = self.method.select(seeding.rng(cfg.seed, "select", r), candidates, cfg.server.clients_per_round)
        tasks = [self._task(c) for c in selected]
        inflight = self._dispatch(tasks)
        items, rows = [], []
        for task, href, pref in inflight:
            costs = self._costs(task)
            base = {"round": r, "version": self.version, "dispatch_id": task.dispatch_id,
                    "client_id": task.assignment.client_id}
            try:
                h = ray.get(href)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                rows.append({**base, "event": "drop", "reason": type(e).__name__})
                continue
            items.append((h, [pref], self._expected(task, self.like)))
            rows.append({**base, "event": "update", "examples": h.num_examples, "train_loss": h.train_loss,
                         "bytes_up": h.bytes_up, "bytes_down": costs["bytes_down"],
                         "train_flops": costs["train_flops"], "client_wall_s": h.wall_s})
        res = ray.get(self.aggregator.receive.remote(items, True, (r + 1) % cfg.server.eval_every == 0
                                                     or r + 1 == cfg.server.rounds))
        reasons = dict(res["results"])
        for row in rows:
            if row["event"] == "update" and reasons.get(row["dispatch_id"]) is not None:
                row["event"], row["reason"] = "reject", reasons[row["dispatch_id"]]
        return {"rows": rows, "result": res}

    # ------------------------------------------------------------ main
    def run(self) -> dict:
        cfg = self.cfg
        t_setup = time.perf_counter()
        self._start()
        t0 = time.perf_counter()
        setup_s = t0 - t_setup
        tot = self.totals
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.server.rounds, desc=f"{cfg.method.name} s{cfg.seed}", unit="round", dynamic_ncols=True)
        best, last_acc, last_loss = -1.0, float("nan"), float("nan")
        virtual_s = 0.0
        rounds_done = 0
        try:
            for r in range(cfg.server.rounds):
                out = self._sync_round(r, virtual_s)
                res = out["result"]
                wall = time.perf_counter() - t0
                for row in out["rows"]:
                    row["wall_s"] = wall
                    row["virtual_s"] = virtual_s
                    self.recorder.event(**row)
                    if row["event"] == "update":
                        tot.updates += 1
                        tot.bytes_up += row["bytes_up"]
                        tot.bytes_down += row["bytes_down"]
                        tot.train_flops += row["train_flops"]
                    elif row["event"] == "drop":
                        tot.dropped += 1
                    elif row["event"] == "reject":
                        tot.rejected += 1
                if res["aggregated"]:
                    self.version = res["version"]
                    self.model_ref = res["model_ref"][0]
                rounds_done = r + 1
                if "accuracy" in res:
                    last_acc, last_loss = res["accuracy"], res["loss"]
                    best = max(best, last_acc)
                    tot.history.append((self.version, virtual_s, wall, last_acc, last_loss))
                    self.recorder.event(event="eval", round=r, version=self.version, accuracy=last_acc,
                                        loss=last_loss, wall_s=wall, virtual_s=virtual_s)
                    self.recorder.scalars(self.version, {
                        "eval/accuracy": last_acc, "eval/loss": last_loss, "cost/bytes_up": tot.bytes_up,
                        "cost/bytes_down": tot.bytes_down, "cost/train_flops": tot.train_flops,
                        "time/wall_s": wall, "time/virtual_s": virtual_s}, virtual_s=virtual_s)
                    if self.report is not None:
                        self.report({"accuracy": last_acc, "loss": last_loss, "version": self.version,
                                     "virtual_s": virtual_s, "wall_s": wall})
                if bar is not None:
                    bar.set_postfix(acc=f"{last_acc:.3f}")
                    bar.update(1)
            params = ray.get(self.aggregator.params.remote())
            stats = ray.get(self.aggregator.stats.remote())
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - t0
        np.savez(self.run_dir / "model.npz", **{k: params[k] for k in sorted(params)})
        summary = {
            "experiment": cfg.experiment, "method": cfg.method.name, "seed": cfg.seed,
            "final_accuracy": last_acc, "best_accuracy": best, "final_loss": last_loss,
            "rounds": rounds_done, "version": self.version, "wall_s": wall, "setup_s": setup_s,
            "virtual_s": virtual_s, "bytes_up": tot.bytes_up, "bytes_down": tot.bytes_down,
            "train_flops": tot.train_flops, "updates": tot.updates, "dropped": tot.dropped,
            "rejected": tot.rejected, "rejected_by_reason": stats["rejected"], "model_puts": stats["puts"],
            "model_sha256": model_digest(params), "run_dir": str(self.run_dir),
        }
        self.recorder.close(summary)
        self.shutdown()
        return summary

    def shutdown(self) -> None:
        for a in getattr(self, "actors", []):
            ray.kill(a)
        if getattr(self, "aggregator", None) is not None:
            ray.kill(self.aggregator)
        if getattr(self, "owns_ray", False):
            ray.shutdown()


def run(cfg: C.ExperimentConfig, **kwargs) -> dict:
    return Runner(cfg, **kwargs).run()
