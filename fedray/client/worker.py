"""What a client actor does, as a plain object (unit-testable without Ray).

One worker trains for one or several logical clients (pooled simulation). It holds the
shared training arrays, one model instance (and the compact models it needs), the run's
task (loss), the method's client algorithm and the channel. For every task it builds the
:class:`~fedray.methods.base.LocalRun`, lets the client algorithm choose the concrete
submodel and prepare, trains (:func:`fedray.client.trainer.local_train`), lets it finalize
(extra arrays, new client state) and encodes the update through the channel. It knows no
method by name.

With ``train.vectorise`` > 1 (synchronous schedules, simulated devices) the tasks of a call
that belong to one dispatch group and can train together -- the same module and trainable
set, the same settings, no per-step hooks, no hooks registered by ``prepare``, no dropout --
are trained at once (:mod:`fedray.client.vectorised`); each is prepared and finalized as it
would be alone.
"""
from __future__ import annotations

import copy
import time
import traceback
import weakref
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedray import security, seeding
from fedray.aggregation import attacks
from fedray.channel import Channel
from fedray.client.trainer import _named, _state, get_params, local_train, resolve_device
from fedray.client.vectorised import (CPU_MAX_FLOPS, Job, group_size, load_tensors, per_example_loss, train_group,
                                      vmap_loss)
from fedray.devices.throttle import Throttle
from fedray.methods import registry
from fedray.methods.base import Assignment, ClientContext, LocalRun
from fedray.models.factory import build_compact, build_model
from fedray.models.info import ModelInfo, counted_train_flops
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
        self.group = group_size(cfg)  # dispatches that may train together (train.vectorise)
        self._hooked = self.algorithm.overrides("after_backward") or self.algorithm.overrides("end_epoch")
        self._reads_model = self.algorithm.overrides("finalize")  # may read the trained model
        self._per_example = per_example_loss(self.task)  # losses per example (None: not a known mean)
        self._vmap_loss = vmap_loss(self.task)  # the loss vectorised training minimises
        self._stochastic: set = set()  # models vmap cannot train (dropout)
        self._flops = weakref.WeakKeyDictionary()  # training FLOPs per example of each module
        self.together = 0  # tasks trained in groups so far

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

    # ------------------------------------------------------------ one task
    def run_task(self, params: dict, task: Task, broadcast: dict | None = None) -> Update:
        p = self._begin(params, task, broadcast)
        return p if isinstance(p, Update) else self._train_one(p)

    def _begin(self, params: dict, task: Task, broadcast: dict | None) -> "_Local | Update":
        """Everything before training: the header, the submodel the algorithm chooses, the
        model and start it trains, its ``prepare`` (an application error: the error update)."""
        a = task.assignment
        t0 = time.perf_counter()
        bad = a.client_id in self.malicious
        n = len(self.partitions[a.client_id])
        header = Update(dispatch_id=task.dispatch_id, client_id=a.client_id, base_version=task.version,
                        num_examples=int(round(n * self.cfg.attack.examples)) if bad else n, kind=a.send,
                        telemetry=dict(task.telemetry or {}))
        p = _Local(task, header, t0)
        try:
            if task.fail == "raise":
                raise RuntimeError("injected client failure")
            p.seed = seeding.derive(self.cfg.seed, "train", task.dispatch_id)
            sub = a.submodel
            p.download = submodel_view(params, sub.download) if sub.download is not None and not sub.compact else params
            p.cfg = cfg = self._train_cfg(a)
            p.idx = self.partitions[a.client_id]
            p.y = self.y_flipped if bad and self.y_flipped is not None else self.y  # label flipping
            p.run = run = LocalRun(assignment=a, submodel=sub, download=p.download, start={}, state=task.state,
                                   seed=p.seed, lr=cfg.lr, model=self.model, named=_named(self.model),
                                   data=(self.x, p.y, p.idx), device=self.device, loss=self.task.loss,
                                   batch_size=cfg.batch_size, broadcast=broadcast or {})
            sub = run.submodel = self.algorithm.choose(run)
            if sub.widths is not None:
                raise ValueError("the client algorithm's choose() must pick the channels of a widths submodel")
            if sub.keep is not None:  # a physically smaller model, reconstructed into the global index space
                p.index = self.info.spec_for(self.cfg.method.name).slice_index(sub.keep)
                p.model = self._compact_model(sub.keep)
                run.start = extract(params, p.index)
                if sub.mask is not None:  # an unstructured mask inside the kept channels
                    p.mask = {k: v.astype(bool, copy=False) for k, v in extract(sub.mask, p.index).items()}
            else:
                p.model = self.model
                run.start = dict(p.download)
                p.mask = sub.mask
                p.trainable = set(sub.trainable) if sub.trainable is not None else (
                    {k for k in p.mask if k in self.param_names} if p.mask is not None else None)
            run.model, run.named = p.model, _named(p.model)
            self.algorithm.prepare(run)
            p.params = params
            p.spent = time.perf_counter() - t0
            return p
        except Exception as e:
            return self._failed(p, e)

    def _train_one(self, p: "_Local") -> Update:
        t0 = time.perf_counter()
        try:
            throttle = Throttle(p.task.speed) if p.task.speed is not None else None
            step = throttle.step if throttle is not None else None
            stats = local_train(p.model, p.run.start, self.x, p.y, p.idx, p.cfg, seed=p.seed, trainable=p.trainable,
                                mask=p.mask, device=self.device, on_step=step, loss_fn=self.task.loss,
                                hooks=self.algorithm, run=p.run)
            if throttle is not None:
                throttle.flush()
            p.spent += time.perf_counter() - t0
            return self._end(p, stats)
        except Exception as e:
            return self._failed(p, e)

    def _end(self, p: "_Local", stats, trained: dict | None = None) -> Update:
        """Everything after training: the values sent (the model's, or ``trained``: the trained
        state as tensors), the algorithm's ``finalize``, the channel's encoding."""
        t0 = time.perf_counter()
        try:
            a, task, run, params, download = p.task.assignment, p.task, p.run, p.params, p.download
            if trained is not None and self._reads_model:  # finalize reads the trained model
                load_tensors(p.model, trained)
                trained = None
            keys = list(p.mask) if p.mask is not None and p.index is None else list(_state(p.model))
            if trained is None:
                trained = get_params(p.model, keys)
            else:
                trained = {k: trained[k].numpy().copy() for k in keys}
            if p.index is not None:
                values, send = scatter(trained, p.index, params)
                if run.submodel.mask is not None:
                    send = {k: m & run.submodel.mask[k] if k in run.submodel.mask else m for k, m in send.items()}
            else:
                send, values = p.mask, trained
            extras = self.algorithm.finalize(run)
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
            return replace(p.header, train_loss=stats.loss, steps=stats.steps,
                           wall_s=p.spent + time.perf_counter() - t0, bytes_up=payload.nbytes, payload=payload)
        except Exception as e:
            return self._failed(p, e)
        finally:
            for h in p.run.handles:
                h.remove()

    def _failed(self, p: "_Local", e: Exception) -> Update:
        """An application error travels as a value (the task's hooks removed)."""
        if p.run is not None:
            for h in p.run.handles:
                h.remove()
            p.run.handles.clear()
        return replace(p.header, error=f"{type(e).__name__}: {e}", wall_s=time.perf_counter() - p.t0,
                       extras={"traceback": traceback.format_exc(limit=3)})

    # ------------------------------------------------------------ a call
    def _together(self, p: "_Local"):
        """What tasks must share to train together (None: this one trains alone)."""
        if p.task.speed is not None or p.run.handles or self._hooked or p.model in self._stochastic:
            return None
        if self.device.type == "cpu" and self._train_flops(p.model) > CPU_MAX_FLOPS:
            return None
        names = tuple(k for k in p.run.named if p.trainable is None or k in p.trainable)
        return id(p.model), names, p.cfg

    def run(self, params: dict, tasks: list[Task], broadcast: dict | None = None) -> list[Update]:
        """The call's updates, in order. Tasks of one dispatch group (``train.vectorise``) that
        can train together do (:func:`fedray.client.vectorised.train_group`); the others train one
        by one (those that cannot, at once, so their hooks never meet another task's training)."""
        if self.group <= 1 or len(tasks) < 2:
            return [self.run_task(params, t, broadcast) for t in tasks]
        out: list = [None] * len(tasks)
        groups: dict = {}
        for pos, t in enumerate(tasks):
            p = self._begin(params, t, broadcast)
            key = None if isinstance(p, Update) else self._together(p)
            if key is None:
                out[pos] = p if isinstance(p, Update) else self._train_one(p)
            else:
                groups.setdefault((t.dispatch_id // self.group, key), []).append((pos, p))
        for members in groups.values():
            if len(members) == 1:
                out[members[0][0]] = self._train_one(members[0][1])
                continue
            for pos, u in zip((m[0] for m in members), self._train_together([m[1] for m in members])):
                out[pos] = u
        return out

    def _train_flops(self, model: torch.nn.Module) -> int:
        """Training FLOPs per example of ``model`` (counted on a copy, so its state is untouched)."""
        if model not in self._flops:
            self._flops[model] = counted_train_flops(copy.deepcopy(model), self.x[:2])
        return self._flops[model]

    def _train_together(self, ps: list["_Local"]) -> list[Update]:
        t0 = time.perf_counter()
        first = ps[0]
        jobs = [Job(p.run.start, p.y, np.asarray(p.idx), p.seed, p.mask) for p in ps]
        try:
            results = train_group(first.model, jobs, self.x, first.cfg, trainable=first.trainable,
                                  device=self.device, loss_fn=self._vmap_loss, per_example=self._per_example)
        except NotImplementedError:  # the model draws random numbers: one by one from now on
            self._stochastic.add(first.model)
            return [self._train_one(p) for p in ps]
        except Exception:  # anything vmap cannot do: one by one (the same inputs)
            return [self._train_one(p) for p in ps]
        share = (time.perf_counter() - t0) / len(ps)
        self.together += len(ps)
        out = []
        for p, (values, stats) in zip(ps, results):
            p.run.steps = stats.steps
            p.spent += share
            out.append(self._end(p, stats, values))
        return out


@dataclass
class _Local:
    """One task between its preparation and its update."""

    task: Task
    header: Update
    t0: float
    run: LocalRun | None = None
    params: dict | None = None
    download: dict | None = None
    model: torch.nn.Module | None = None
    cfg: object = None
    idx: np.ndarray | None = None
    y: np.ndarray | None = None
    seed: int = 0
    index: object = None  # a compact model's index into the global tensors
    trainable: set | None = None
    mask: dict | None = None
    spent: float = 0.0  # seconds of this task so far
