"""Pure local training: weights in, weights out, no Ray.

``local_train`` loads the given parameters into a model, trains the allowed
coordinates with the configured optimizer on the client's examples, and
returns the new state as numpy arrays plus statistics. Everything random comes
from ``seed`` (batch order and any torch randomness), so the result depends
only on the inputs, never on which actor or worker ran it. A method's client
algorithm (:class:`fedray.methods.base.ClientAlgorithm`) reaches into training
only through its ``after_backward`` and ``end_epoch`` hooks; the trainer knows
no method.
"""
from __future__ import annotations

import math
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn



def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_torch(seed: int, device: torch.device = torch.device("cpu")) -> None:
    """Seed torch's generator for ``device`` only (``torch.manual_seed`` also walks every
    accelerator backend, which costs about a millisecond per call)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


_STATES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_PARAMS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_OPTIMIZERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _state(model: nn.Module) -> dict:
    """The model's state tensors by name (``state_dict(keep_vars=True)``, which walks every
    module, built once per model: the tensors are updated in place, never replaced)."""
    state = _STATES.get(model)
    if state is None:
        state = _STATES[model] = model.state_dict(keep_vars=True)
    return state


def _named(model: nn.Module) -> dict:
    """``dict(model.named_parameters())``, built once per model."""
    named = _PARAMS.get(model)
    if named is None:
        named = _PARAMS[model] = dict(model.named_parameters())
    return named


def to_device(model: nn.Module, device: torch.device) -> None:
    """``model.to(device)`` unless it is already there (``to`` walks every module)."""
    p = next(model.parameters(), None)
    if p is not None and p.device != device:
        model.to(device)
        for cache in (_STATES, _PARAMS, _OPTIMIZERS):  # ``to`` replaces buffer tensors
            cache.pop(model, None)


def load_params(model: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Copy numpy arrays into the model's tensors in place (read-only inputs are fine)."""
    state = _state(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays from the object store
        for k, v in params.items():
            state[k].data.copy_(torch.from_numpy(np.asarray(v)))


def get_params(model: nn.Module, keys=None) -> dict[str, np.ndarray]:
    """Detached numpy copies of the state dict (optionally only ``keys``)."""
    state = _state(model)
    keys = state.keys() if keys is None else keys
    return {k: state[k].detach().cpu().numpy().copy() for k in keys}


@dataclass
class TrainStats:
    loss: float
    steps: int
    examples: int


class Optimizer:
    """``torch.optim.SGD`` (momentum, weight decay) or ``torch.optim.Adam`` (its defaults) over
    ``params``, stepped through torch.optim's own functional API (``torch.optim.sgd.sgd``,
    ``torch.optim.adam.adam``: what those classes' ``step`` calls, with the same state, so the
    numbers are theirs). The classes themselves import ``torch._dynamo`` when first built, about
    0.8 s of CPU in every client actor process."""

    def __init__(self, params, cfg):
        self.params, self.cfg = list(params), cfg
        self.state: dict = {}  # per parameter: the momentum buffer, or Adam's step and moments

    def zero_grad(self) -> None:  # to None, as torch.optim's default
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        from torch.optim import adam, sgd

        c = self.cfg
        ps = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in ps]
        if c.optimizer == "adam":
            for p in ps:
                if p not in self.state:
                    step = torch.tensor(0.0, dtype=torch.float64 if torch.get_default_dtype() == torch.float64
                                        else torch.float32)
                    self.state[p] = (step, torch.zeros_like(p), torch.zeros_like(p))
            steps, m1, m2 = zip(*(self.state[p] for p in ps)) if ps else ((), (), ())
            adam.adam(ps, grads, list(m1), list(m2), [], list(steps), amsgrad=False, beta1=0.9, beta2=0.999,
                      lr=c.lr, weight_decay=c.weight_decay, eps=1e-8, maximize=False)
            return
        bufs = [self.state.get(p) for p in ps] if c.momentum else []
        sgd.sgd(ps, grads, bufs, has_sparse_grad=any(g.is_sparse for g in grads), weight_decay=c.weight_decay,
                momentum=c.momentum, lr=c.lr, dampening=0.0, nesterov=False, maximize=False)
        if c.momentum:
            self.state.update(zip(ps, bufs))


def _optimizer(model: nn.Module, names: tuple[str, ...], cfg) -> Optimizer:
    """An optimizer over ``names`` of ``model``, kept per (parameters, settings) instead of a
    new one per task; :func:`local_train` clears its state after every task, which is what a
    new one starts from (momentum buffers and Adam moments are created at the first step)."""
    cache = _OPTIMIZERS.setdefault(model, {})
    key = (names, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    opt = cache.get(key)
    if opt is None:
        named = _named(model)
        opt = cache[key] = Optimizer([named[k] for k in names], cfg)
    return opt


def batches(indices: np.ndarray, batch_size: int, epochs: int | None, steps: int | None, rng: np.random.Generator):
    """Yield index batches: ``steps`` batches if given, else ``epochs`` passes (last batch may be short)."""
    n = len(indices)
    done = 0
    epoch = 0
    while True:
        if steps is None and epoch >= epochs:
            return
        order = indices[rng.permutation(n)]
        for start in range(0, n, batch_size):
            if steps is not None and done >= steps:
                return
            yield order[start : start + batch_size]
            done += 1
        epoch += 1


def local_train(
    model: nn.Module,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    indices: np.ndarray,
    cfg,
    *,
    seed: int,
    trainable: set[str] | None = None,
    mask: Mapping[str, np.ndarray] | None = None,
    device: torch.device = torch.device("cpu"),
    on_step=None,
    loss_fn=nn.functional.cross_entropy,
    hooks=None,
    run=None,
) -> TrainStats:
    """Train ``model`` (loaded with ``params``) in place on ``x[indices]``.

    ``cfg``: the ``train`` section (optimizer, lr, batch size, epochs or steps).
    ``trainable``: parameter names that may change (None: all). Frozen
    parameters get ``requires_grad=False`` so no backward work is done for them.
    ``mask``: boolean arrays; coordinates outside a tensor's mask are restored
    to their starting values after every optimizer step (masked training).
    ``on_step(busy_s)``: called after every optimizer step with the step's
    measured seconds (real throttling).
    ``loss_fn(output, target)``: the task's training loss (default cross-entropy).
    ``hooks`` / ``run``: a client algorithm and its :class:`~fedray.methods.base.LocalRun`;
    ``hooks.after_backward(run)`` runs after every backward pass (before the step) and,
    with epoch budgets, ``hooks.end_epoch(run, mean_loss)`` after every epoch (True stops
    training), each only when the algorithm overrides it. ``run.steps`` counts the steps.
    """
    load_params(model, params)
    to_device(model, device)
    if not model.training:  # ``train`` walks every module; only ``evaluate`` switches it off
        model.train()
    seed_torch(seed, device)
    rng = np.random.default_rng(seed)
    named = _named(model)
    train_names = tuple(k for k in named if trainable is None or k in trainable)
    opt = _optimizer(model, train_names, cfg)
    after_backward = hooks.after_backward if hooks is not None and hooks.overrides("after_backward") else None
    end_epoch = hooks.end_epoch if hooks is not None and hooks.overrides("end_epoch") else None
    try:  # even a failing task (an error update) leaves the model and optimizer as fresh ones
        if trainable is not None:  # frozen parameters get no gradient (restored below)
            for k, p in named.items():
                p.requires_grad_(k in trainable)
        keep = {}
        if mask is not None:
            for k in train_names:
                if k in mask and not np.all(mask[k]):
                    m = torch.from_numpy(np.array(mask[k])).to(device)
                    keep[k] = (m, named[k].detach().clone() * (~m))
        total, steps, seen = 0.0, 0, 0
        per_epoch = math.ceil(len(indices) / cfg.batch_size) if end_epoch and cfg.local_steps is None else 0
        epoch_loss, epoch_n = 0.0, 0
        clock = time.perf_counter
        t_step = clock()
        for idx in batches(np.asarray(indices), cfg.batch_size, cfg.local_epochs, cfg.local_steps, rng):
            xb = torch.from_numpy(x[idx]).to(device, non_blocking=True)
            yb = torch.from_numpy(y[idx]).to(device, non_blocking=True)
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            if after_backward is not None:
                after_backward(run)
            opt.step()
            if keep:
                with torch.no_grad():
                    for k, (m, frozen) in keep.items():
                        named[k].mul_(m).add_(frozen)
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            steps += 1
            if run is not None:
                run.steps = steps
            if on_step is not None:
                now = clock()
                on_step(now - t_step)
                t_step = clock()
            if per_epoch:
                epoch_loss += float(loss.detach()) * len(idx)
                epoch_n += len(idx)
                if steps % per_epoch == 0:  # an epoch ended
                    if end_epoch(run, epoch_loss / epoch_n):
                        break
                    epoch_loss, epoch_n = 0.0, 0
    finally:
        if trainable is not None:
            for p in named.values():
                p.requires_grad_(True)
        opt.state.clear()  # no momentum buffers or moments kept between tasks
    return TrainStats(loss=total / max(seen, 1), steps=steps, examples=len(indices))
