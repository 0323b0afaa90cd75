"""What a client actor does, as a plain object (unit-testable without Ray).

One worker trains for one or several logical clients (pooled simulation). It holds the
shared training arrays, one model instance (and the compact models it needs), the run's
task (loss), the method's client algorithm and the channel. For every task it builds the
:class:`~fedray.methods.base.LocalRun`, lets the client algorithm choose the concrete
submodel and prepare, trains (:func:`fedray.client.trainer.local_train`), lets it finalize
(extra arrays, new client state) and encodes the update through the channel. It knows no
method by name.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedray import security, seeding
from fedray.aggregation import attacks
from fedray.channel import Channel
from fedray.client.trainer import _named, get_params, local_train, resolve_device
from fedray.devices.throttle import Throttle
from fedray.methods import registry
from fedray.methods.base import Assignment, ClientContext, LocalRun
from fedray.models.factory import build_compact, build_model
from fedray.models.info import ModelInfo
from fedray.models.spec import extract, scatter
from fedray.privacy.mechanism import LocalGaussian
from fedray.tasks import get_task
from fedray.update import Update

__all__ = ["Task", "ClientWorker", "submodel_view"]


@dataclass(frozen=True)
class Task:
    dispatch_id: int
    version: int
    assignment: Assignment
    telemetry: dict | None = None  # conditions the device reports with its update
    speed: float | None = None  # real throttling: relative device speed (None: run at full speed)
    fail: str | None = None  # injected failure for tests: "raise" | "nan"
    state: dict | None = None  # the client's state from the store (methods with client state)


def submodel_view(params: dict, download_mask: dict) -> dict:
    """What a client holds after downloading only ``download_mask``: coordinates it
    did not receive are zero (pruned); tensors absent from the mask are all zero."""
    return {k: (np.where(download_mask[k], v, 0).astype(v.dtype, copy=False) if k in download_mask
                else np.zeros_like(v)) for k, v in params.items()}


class ClientWorker:
    def __init__(self, cfg, data: dict, partitions: list[np.ndarray], input_shape, num_classes):
        self.cfg = cfg
        torch.set_num_threads(cfg.cluster.torch_threads)
        self.x, self.y = data["x"], data["y"]
        self.partitions = partitions
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.device = resolve_device(cfg.runtime.device)
        torch.manual_seed(seeding.derive(cfg.seed, "init"))
        self.model = build_model(cfg.model.name, self.input_shape, num_classes, options=cfg.model.options)
        self.info = ModelInfo(self.model, self.x[:2], name=cfg.model.name, options=cfg.model.options,
                              num_outputs=num_classes)
        self.param_names = {k for k, _ in self.model.named_parameters()}
        self.task = get_task(cfg.task.name, cfg.task.options)
        method = registry.get(cfg.method.name)
        self.algorithm = method.Client(ClientContext(cfg, cfg.method.name, cfg.method.params, self.info))
        self.malicious = security.malicious_set(cfg)
        self.y_flipped = attacks.flip_labels(self.y, num_classes) if cfg.attack.kind == "label_flip" else None
        p = cfg.privacy
        self.channel = Channel(self.info.like, [LocalGaussian(p.clip, p.noise_multiplier)] if p.local else [])
        self._compact: dict[tuple, torch.nn.Module] = {}  # compact models by their shapes

    def _train_cfg(self, a: Assignment):
        cfg = self.cfg.train
        if a.local_epochs is not None or a.local_steps is not None:
            cfg = replace(cfg, local_epochs=a.local_epochs if a.local_epochs is not None else cfg.local_epochs,
                          local_steps=a.local_steps if a.local_steps is not None else cfg.local_steps)
        return cfg

    def _compact_model(self, keep: dict) -> torch.nn.Module:
        key = tuple(sorted((k, len(v)) for k, v in keep.items()))
        if key not in self._compact:
            spec = self.info.spec_for(self.cfg.method.name)
            self._compact[key] = build_compact(self.cfg.model.name, self.input_shape, self.num_classes,
                                               self.cfg.model.options, spec, keep)
        return self._compact[key]

    def run_task(self, params: dict, task: Task, broadcast: dict | None = None) -> Update:
        a = task.assignment
        t0 = time.perf_counter()
        bad = a.client_id in self.malicious
        n = len(self.partitions[a.client_id])
        header = Update(dispatch_id=task.dispatch_id, client_id=a.client_id, base_version=task.version,
                        num_examples=int(round(n * self.cfg.attack.examples)) if bad else n, kind=a.send,
                        telemetry=dict(task.telemetry or {}))
        throttle = Throttle(task.speed) if task.speed is not None else None
        run = None
        try:
            if task.fail == "raise":
                raise RuntimeError("injected client failure")
            seed = seeding.derive(self.cfg.seed, "train", task.dispatch_id)
            sub = a.submodel
            download = submodel_view(params, sub.download) if sub.download is not None and not sub.compact else params
            cfg = self._train_cfg(a)
            idx = self.partitions[a.client_id]
            y = self.y_flipped if bad and self.y_flipped is not None else self.y  # label flipping
            run = LocalRun(assignment=a, submodel=sub, download=download, start={}, state=task.state, seed=seed,
                           lr=cfg.lr, model=self.model, named=_named(self.model), data=(self.x, y, idx),
                           device=self.device, loss=self.task.loss, batch_size=cfg.batch_size,
                           broadcast=broadcast or {})
            sub = run.submodel = self.algorithm.choose(run)
            if sub.widths is not None:
                raise ValueError("the client algorithm's choose() must pick the channels of a widths submodel")
            index = None
            if sub.keep is not None:  # a physically smaller model, reconstructed into the global index space
                index = self.info.spec_for(self.cfg.method.name).slice_index(sub.keep)
                model = self._compact_model(sub.keep)
                run.start = extract(params, index)
                trainable, mask = None, None
            else:
                model = self.model
                run.start = dict(download)
                mask = sub.mask
                trainable = set(sub.trainable) if sub.trainable is not None else (
                    {k for k in mask if k in self.param_names} if mask is not None else None)
            run.model, run.named = model, _named(model)
            self.algorithm.prepare(run)
            stats = local_train(model, run.start, self.x, y, idx, cfg, seed=seed, trainable=trainable, mask=mask,
                                device=self.device, on_step=throttle.step if throttle is not None else None,
                                loss_fn=self.task.loss, hooks=self.algorithm, run=run)
            if index is not None:
                values, send = scatter(get_params(model), index, params)
            else:
                send = mask
                values = get_params(model, list(send.keys()) if send is not None else None)
            extras = self.algorithm.finalize(run)
            if throttle is not None:
                throttle.flush()
            if a.send == "delta":
                values = {k: (v - download[k]).astype(v.dtype, copy=False) for k, v in values.items()}
            if task.fail == "nan":
                k0 = next(iter(values))
                values[k0] = np.full_like(values[k0], np.nan)
            info = {"download": download, "kind": a.send,  # for the channel's stages (local DP)
                    "rng": seeding.rng(self.cfg.seed, "local_dp", task.dispatch_id)} if self.channel.stages else None
            payload = self.channel.encode(values, send, extras, info)
            if run.new_state is not None:
                payload = replace(payload, state=dict(run.new_state))
            return replace(header, train_loss=stats.loss, steps=stats.steps, wall_s=time.perf_counter() - t0,
                           bytes_up=payload.nbytes, payload=payload)
        except Exception as e:  # application errors travel as values
            return replace(header, error=f"{type(e).__name__}: {e}",
                           extras={"traceback": traceback.format_exc(limit=3)}, wall_s=time.perf_counter() - t0)
        finally:
            if run is not None:
                for h in run.handles:
                    h.remove()

    def run(self, params: dict, tasks: list[Task], broadcast: dict | None = None) -> list[Update]:
        return [self.run_task(params, t, broadcast) for t in tasks]
