"""Client actor: a thin Ray shell around :func:`fedray.client.trainer.local_train`.

One actor trains for one or several logical clients (pooled simulation). It
holds the shared training arrays (read zero-copy from the object store) and one
model instance; each call receives the model version by object reference and a
list of tasks, and returns for every task two objects: the update header and
its payload, so the driver never touches the big arrays.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, replace

import numpy as np
import ray
import torch

from fedray import seeding
from fedray.client.trainer import get_params, local_train, resolve_device
from fedray.methods.base import Assignment
from fedray.models.zoo import build_model
from fedray.submodel import masks as M
from fedray.submodel.encode import encode
from fedray.update import Update


@dataclass(frozen=True)
class Task:
    dispatch_id: int
    version: int
    assignment: Assignment
    telemetry: dict | None = None  # conditions the device reports with its update
    fail: str | None = None  # injected failure for tests: "raise" | "nan"


class ClientWorker:
    """Everything a client actor does, as a plain object (unit-testable without Ray)."""

    def __init__(self, cfg, data: dict, partitions: list[np.ndarray], input_shape, num_classes):
        self.cfg = cfg
        torch.set_num_threads(cfg.cluster.torch_threads)
        self.x, self.y = data["x"], data["y"]
        self.partitions = partitions
        self.device = resolve_device(cfg.runtime.device)
        torch.manual_seed(seeding.derive(cfg.seed, "init"))
        self.model = build_model(cfg.model.name, tuple(input_shape), num_classes, options=cfg.model.options)
        self.param_names = {k for k, _ in self.model.named_parameters()}

    def run_task(self, params: dict, task: Task) -> Update:
        a = task.assignment
        t0 = time.perf_counter()
        header = Update(dispatch_id=task.dispatch_id, client_id=a.client_id, base_version=task.version,
                        num_examples=len(self.partitions[a.client_id]), kind=a.send,
                        telemetry=dict(task.telemetry or {}))
        try:
            if task.fail == "raise":
                raise RuntimeError("injected client failure")
            send = a.mask if a.mask is not None else None
            trainable = set(a.trainable) if a.trainable is not None else (
                {k for k in send if k in self.param_names} if send is not None else None)
            cfg = self.cfg.train
            if a.local_epochs is not None or a.local_steps is not None:
                cfg = replace(cfg, local_epochs=a.local_epochs if a.local_epochs is not None else cfg.local_epochs,
                              local_steps=a.local_steps if a.local_steps is not None else cfg.local_steps)
            stats = local_train(self.model, params, self.x, self.y, self.partitions[a.client_id], cfg,
                                seed=seeding.derive(self.cfg.seed, "train", task.dispatch_id),
                                trainable=trainable, mask=send, device=self.device)
            keys = list(send.keys()) if send is not None else list(params.keys())
            values = get_params(self.model, keys)
            if a.send == "delta":
                values = {k: (v - params[k]).astype(v.dtype, copy=False) for k, v in values.items()}
            if task.fail == "nan":
                k0 = keys[0]
                values[k0] = np.full_like(values[k0], np.nan)
            payload = encode(values, send)
            return Update(**{**header.__dict__, "train_loss": stats.loss, "steps": stats.steps,
                             "wall_s": time.perf_counter() - t0, "bytes_up": payload.nbytes,
                             "payload": payload})
        except Exception as e:  # application errors travel as values
            msg = f"{type(e).__name__}: {e}"
            tb = traceback.format_exc(limit=3)
            return Update(**{**header.__dict__, "error": msg, "extras": {"traceback": tb},
                             "wall_s": time.perf_counter() - t0})

    def run(self, params: dict, tasks: list[Task]) -> list[Update]:
        return [self.run_task(params, t) for t in tasks]


@ray.remote
class ClientActor:
    """Ray shell: returns ``[header_0, payload_0, header_1, payload_1, ...]``.

    Call as ``actor.train_many.options(num_returns=2 * len(tasks)).remote(ref, tasks)``.
    """

    def __init__(self, cfg, data: dict, partitions, input_shape, num_classes):
        self.worker = ClientWorker(cfg, data, partitions, input_shape, num_classes)

    def train_many(self, params: dict, tasks: list[Task]):
        out = []
        for u in self.worker.run(params, tasks):
            out.extend((u.header(), u.payload))
        return tuple(out)

    def ping(self) -> bool:
        return True
