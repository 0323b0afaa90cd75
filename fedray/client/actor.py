"""Client actor: a thin Ray shell around :func:`fedray.client.trainer.local_train`.

One actor trains for one or several logical clients (pooled simulation). It
holds the shared training arrays (read zero-copy from the object store) and one
model instance; each call receives the model version (by object reference, or by
value when it is small enough for Ray to inline) and a list of tasks, and returns
the list of update headers plus one object per update payload.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, replace

import numpy as np
import ray
import torch

from fedray import seeding
from fedray.client.trainer import get_params, load_params, local_train, resolve_device, to_device
from fedray.devices.throttle import Throttle
from fedray.methods.base import Assignment
from fedray.models.spec import build_compact, extract, model_spec, scatter
from fedray.models.zoo import build_model
from fedray.pruning.curvature import fisher_and_grad, group_scores, keep_top
from fedray.submodel.encode import Payload, encode
from fedray.update import Update


@dataclass(frozen=True)
class Task:
    dispatch_id: int
    version: int
    assignment: Assignment
    telemetry: dict | None = None  # conditions the device reports with its update
    speed: float | None = None  # real throttling: relative device speed (None: run at full speed)
    fail: str | None = None  # injected failure for tests: "raise" | "nan"


def submodel_view(params: dict, download_mask: dict) -> dict:
    """What a client holds after downloading only ``download_mask``: coordinates it
    did not receive are zero (pruned); tensors absent from the mask are all zero."""
    return {k: (np.where(download_mask[k], v, 0).astype(v.dtype, copy=False) if k in download_mask
                else np.zeros_like(v)) for k, v in params.items()}


class ClientWorker:
    """Everything a client actor does, as a plain object (unit-testable without Ray)."""

    def __init__(self, cfg, data: dict, partitions: list[np.ndarray], input_shape, num_classes):
        self.cfg = cfg
        torch.set_num_threads(cfg.cluster.torch_threads)
        self.x, self.y = data["x"], data["y"]
        self.partitions = partitions
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.device = resolve_device(cfg.runtime.device)
        torch.manual_seed(seeding.derive(cfg.seed, "init"))
        self.model = build_model(cfg.model.name, self.input_shape, num_classes, options=cfg.model.options)
        self.spec = model_spec(self.model, self.input_shape)
        self.param_names = {k for k, _ in self.model.named_parameters()}
        self._compact: dict[tuple, torch.nn.Module] = {}  # compact models by their shapes

    def _train_cfg(self, a: Assignment):
        cfg = self.cfg.train
        if a.local_epochs is not None or a.local_steps is not None:
            cfg = replace(cfg, local_epochs=a.local_epochs if a.local_epochs is not None else cfg.local_epochs,
                          local_steps=a.local_steps if a.local_steps is not None else cfg.local_steps)
        return cfg

    def _curvature_keep(self, params: dict, a: Assignment, seed: int) -> dict:
        """CA-HFP: the client scores channels by local empirical Fisher and keeps the best."""
        load_params(self.model, params)
        idx = self.partitions[a.client_id]
        rng = seeding.rng(seed, "mask")
        order = idx[rng.permutation(len(idx))]
        bs = self.cfg.train.batch_size
        n_batches = max(1, min(a.score_batches, -(-len(order) // bs)))
        batches = [(torch.from_numpy(self.x[order[i * bs:(i + 1) * bs]]).to(self.device),
                    torch.from_numpy(self.y[order[i * bs:(i + 1) * bs]]).to(self.device)) for i in range(n_batches)]
        to_device(self.model, self.device)
        grad, fisher = fisher_and_grad(self.model, batches, torch.nn.functional.cross_entropy)
        return keep_top(self.spec, group_scores(self.spec, params, grad, fisher), a.keep_ratio)

    def _compact_model(self, keep: dict) -> torch.nn.Module:
        key = tuple(sorted((k, len(v)) for k, v in keep.items()))
        if key not in self._compact:
            self._compact[key] = build_compact(self.cfg.model.name, self.input_shape, self.num_classes,
                                               self.cfg.model.options, self.spec, keep)
        return self._compact[key]

    def run_task(self, params: dict, task: Task) -> Update:
        a = task.assignment
        t0 = time.perf_counter()
        header = Update(dispatch_id=task.dispatch_id, client_id=a.client_id, base_version=task.version,
                        num_examples=len(self.partitions[a.client_id]), kind=a.send,
                        telemetry=dict(task.telemetry or {}))
        throttle = None
        if task.speed is not None:
            throttle = Throttle(task.speed)
        try:
            if task.fail == "raise":
                raise RuntimeError("injected client failure")
            seed = seeding.derive(self.cfg.seed, "train", task.dispatch_id)
            if a.download_mask is not None and a.keep is None:
                params = submodel_view(params, a.download_mask)
            cfg = self._train_cfg(a)
            step = throttle.step if throttle is not None else None
            aux = {}
            keep = a.keep
            if keep is None and a.keep_policy == "curvature":
                keep = self._curvature_keep(params, a, seed)
            if keep is not None:  # a physically smaller model, reconstructed into the global index space
                index = self.spec.slice_index(keep)
                model = self._compact_model(keep)
                stats = local_train(model, extract(params, index), self.x, self.y, self.partitions[a.client_id], cfg,
                                    seed=seed, device=self.device, hidden_scale=a.hidden_scale, on_step=step,
                                    collect_sq_grads=a.collect_sq_grads)
                values, send = scatter(get_params(model), index, params)
                aux.update({f"kept/{k}": v.astype(np.int32) for k, v in keep.items()})
            else:
                send = a.mask
                trainable = set(a.trainable) if a.trainable is not None else (
                    {k for k in send if k in self.param_names} if send is not None else None)
                stats = local_train(self.model, params, self.x, self.y, self.partitions[a.client_id], cfg,
                                    seed=seed, trainable=trainable, mask=send, device=self.device,
                                    hidden_scale=a.hidden_scale, on_step=step, collect_sq_grads=a.collect_sq_grads,
                                    early_stop=a.early_stop)
                values = get_params(self.model, list(send.keys()) if send is not None else None)
            if stats.sq_grads is not None:
                aux.update({f"sq_grads/{k}": v for k, v in stats.sq_grads.items()})
            if throttle is not None:
                throttle.flush()
            if a.send == "delta":
                values = {k: (v - params[k]).astype(v.dtype, copy=False) for k, v in values.items()}
            if task.fail == "nan":
                k0 = next(iter(values))
                values[k0] = np.full_like(values[k0], np.nan)
            payload = Payload(encode(values, send).entries, aux)
            return replace(header, train_loss=stats.loss, steps=stats.steps, wall_s=time.perf_counter() - t0,
                           bytes_up=payload.nbytes, payload=payload)
        except Exception as e:  # application errors travel as values
            return replace(header, error=f"{type(e).__name__}: {e}",
                           extras={"traceback": traceback.format_exc(limit=3)}, wall_s=time.perf_counter() - t0)

    def run(self, params: dict, tasks: list[Task]) -> list[Update]:
        return [self.run_task(params, t) for t in tasks]


@ray.remote
class ClientActor:
    """Ray shell: ``train_many`` returns ``1 + len(tasks)`` objects, the list of update
    headers and each update's payload (a small payload travels inside the call's reply, a
    large one through the object store). Call through :func:`train_call`.
    """

    def __init__(self, cfg, input_shape, num_classes):
        self.args = cfg, input_shape, num_classes
        self.worker = None

    def train_many(self, params: dict, tasks: list[Task], shared: list):
        """``shared`` = [data ref, partitions ref], read once (zero-copy) on the first call; every call
        brings them so a restarted actor (crash, lost node) finds them again (references in the
        constructor's arguments would do that too, but Ray warns against them on every start)."""
        if self.worker is None:
            data, partitions = ray.get(shared)
            cfg, input_shape, num_classes = self.args
            self.worker = ClientWorker(cfg, data, partitions, input_shape, num_classes)
        updates = self.worker.run(params, tasks)
        return ([u.header() for u in updates], *[u.payload for u in updates])

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this actor runs on (placement checks)."""
        return ray.get_runtime_context().get_node_id()


def train_call(actor, params, tasks: list[Task], shared: list) -> list:
    """Submit one ``train_many`` call (``tasks`` non-empty): ``[headers ref, payload refs...]``."""
    return actor.train_many.options(num_returns=len(tasks) + 1).remote(params, tasks, shared)
