"""Vectorised local training: several clients of one call trained at once with ``torch.func``.

Clients that train the same module (the global model or one compact shape), the same
trainable parameter set and the same ``train`` settings, with no hooks of their own, are
trained together: their parameters are stacked along a new leading axis, one
``vmap(functional_call)`` computes every client's loss on its own batch, one backward pass
gives every client its own gradient (the clients do not interact), and ``torch.optim`` on
the stacked leaves is every client's own optimizer (SGD with momentum and weight decay and
Adam are elementwise; all of a group's clients step together from the first step).

Each client is trained exactly as :func:`fedray.client.trainer.local_train` would train it,
up to float rounding: its own batch order from its own seeded generator, its masks applied
after every step, its frozen parameters without gradients, its loss statistics. Clients
whose batches differ in length in a step (a short last batch, partitions of different
sizes) are padded with zero-weight examples and their loss is the mean over their real
examples -- or, for a model with buffers (batch norm: padding would change the batch
statistics), trained in one ``vmap`` per batch length. A client that has taken its last
step is read out then (later steps, whose weight decay, momentum or Adam moments would move
it, do not count). A model that draws random numbers in its forward pass (dropout) makes
``vmap`` raise, and the caller trains the group one by one.

Which clients are trained together depends only on the dispatches (:func:`group_size`):
dispatch ``d`` belongs to group ``d // train.vectorise``, the dispatcher routes a whole
group to one client actor, and the worker trains together the compatible tasks of a call
that share a group. So results never depend on the number of client actors.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedray.client.trainer import Optimizer, TrainStats, _named, _state, batches, to_device
from fedray.tasks import Classification, Regression

__all__ = ["CPU_MAX_FLOPS", "Job", "group_size", "train_group", "per_example_loss", "vmap_loss", "load_tensors"]

_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


# On the CPU, a module whose training costs more FLOPs per example than this trains one by one:
# past it vmap's batched kernels run slower than one client at a time (docs/benchmarks.md,
# "Vectorised local training": 1.5-2.9x faster for the digits MLP and CNN at 0.04-2 MFLOP, 1.0x for
# a quarter-width LEAF CNN at 6.8 MFLOP, 0.8x for the small CNN on 28x28 at 25 MFLOP, 0.36x for the
# LEAF CNN at 101 MFLOP)
CPU_MAX_FLOPS = 6_000_000


def group_size(cfg) -> int:
    """Consecutive dispatches that may train together (``train.vectorise``), or 1 where they
    never do: asynchronous and interval schedules (a resume or a lost actor sends part of a
    launch's dispatches again, which would regroup them), real throttling (every client runs
    at its own device's speed) and client algorithms with per-step or per-epoch hooks."""
    g = int(getattr(cfg.train, "vectorise", 1))
    if g <= 1 or cfg.devices.mode != "simulated":
        return 1
    from fedray.methods import registry

    method = registry.get(cfg.method.name)
    if method.schedule != "sync" or method.Client.overrides("after_backward") or method.Client.overrides("end_epoch"):
        return 1
    return g


@dataclass
class Job:
    """One client's training in a group: its starting values (every state key it sets), its
    targets array (``y[indices]`` are its labels), its examples, its seed and its mask."""

    start: Mapping[str, np.ndarray]
    y: np.ndarray
    indices: np.ndarray
    seed: int
    mask: Mapping[str, np.ndarray] | None = None


def stochastic(model: nn.Module) -> bool:
    """Does the model hold a dropout layer (random numbers in its training forward pass)?"""
    return any(isinstance(m, _STOCHASTIC) and m.p > 0 for m in model.modules())


_DEVICE_DATA: dict = {}


def _on_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """``a`` as a tensor on ``device``, kept for the shared training arrays (a view on the CPU,
    one copy on an accelerator; the last few arrays are kept)."""
    key = (id(a), str(device))
    hit = _DEVICE_DATA.get(key)
    if hit is None or hit[0] is not a:
        if len(_DEVICE_DATA) >= 8:
            _DEVICE_DATA.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays from the object store
            hit = _DEVICE_DATA[key] = (a, torch.from_numpy(a).to(device))
    return hit[1]


def load_tensors(model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors into the model's state in place (a trained client's values, for its finalize)."""
    state = _state(model)
    with torch.no_grad():
        for k, v in values.items():
            state[k].copy_(v)


def _stack(jobs, names, current, device) -> dict[str, torch.Tensor]:
    """The jobs' starting values of ``names`` stacked on ``device`` (one transfer of an array
    every job starts from, such as the downloaded model)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for k in names:
            rows = [j.start.get(k) for j in jobs]
            if all(r is rows[0] for r in rows):
                one = torch.from_numpy(np.asarray(rows[0])) if rows[0] is not None else current[k].detach()
                out[k] = one.to(device).unsqueeze(0).repeat(len(jobs), *([1] * one.dim()))
            else:
                out[k] = torch.stack([torch.from_numpy(np.asarray(r)) if r is not None else current[k].detach().cpu()
                                      for r in rows]).to(device)
    return out


def linear_weights(model: nn.Module, names) -> set[str]:
    """The names among ``names`` of ``nn.Linear`` weights. :func:`train_group` keeps their stacked
    values as (clients, in, out): ``vmap``'s linear then computes each gradient in that layout,
    where the (clients, out, in) layout of the module costs a transposing copy of every stacked
    gradient in every step (4x the step of a 3136 x 2048 layer on the CPU)."""
    return {k for k in names if k.endswith(".weight")
            and isinstance(model.get_submodule(k[:-len(".weight")]), nn.Linear)}


def _masks(jobs, names, start, device, flip=()) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per trainable tensor some client masks: (stacked mask, stacked kept values outside it), in
    the stacked layout (``flip``: the names held transposed)."""
    keep = {}
    for k in names:
        partial = [j.mask is not None and k in j.mask and not np.all(j.mask[k]) for j in jobs]
        if not any(partial):
            continue
        shape = tuple(start[k].shape[1:])
        if k in flip:
            shape = shape[::-1]
        m = torch.from_numpy(np.stack([np.asarray(j.mask[k], dtype=bool) if p else np.ones(shape, dtype=bool)
                                       for j, p in zip(jobs, partial)])).to(device)
        if k in flip:
            m = m.transpose(1, 2).contiguous()
        keep[k] = (m, start[k].detach().clone() * (~m))
    return keep


def cross_entropy_rows(o, t):
    """``cross_entropy(o, t, reduction="none")`` of (N, C) logits and class indices, the same numbers
    bit for bit (forward and backward) without its ``vmap`` decomposition, whose shape checks import
    sympy (about a second of CPU in every client actor) and which runs slower."""
    if o.dim() != 2 or t.is_floating_point():
        return nn.functional.cross_entropy(o, t, reduction="none")
    return -o.log_softmax(1).gather(1, t.unsqueeze(1)).squeeze(1)


def vmap_loss(task):
    """The loss :func:`train_group` minimises for ``task``: ``task.loss`` (classification's
    cross-entropy as the mean of :func:`cross_entropy_rows`, the same numbers)."""
    if type(task).loss is Classification.loss:
        return lambda o, t: cross_entropy_rows(o, t).mean()
    return task.loss


def per_example_loss(task):
    """``f(output, target)``: the per-example losses whose mean is ``task.loss`` (cross-entropy,
    mean squared error), or None where the loss is not known to be such a mean."""
    loss = type(task).loss
    if loss is Classification.loss:
        return cross_entropy_rows
    if loss is Regression.loss:
        def squared(o, t):
            e = (Regression._shape(o, t) - t) ** 2
            return e.reshape(e.shape[0], -1).mean(1)
        return squared
    return None


def train_group(model: nn.Module, jobs: list[Job], x: np.ndarray, cfg, *, trainable: set[str] | None = None,
                device: torch.device = torch.device("cpu"), loss_fn=nn.functional.cross_entropy,
                per_example=None) -> list[tuple[dict[str, torch.Tensor], TrainStats]]:
    """Train every job of ``jobs`` from its own start as :func:`~fedray.client.trainer.local_train`
    would (the module's current values are not used, nor changed, except for keys a job does not
    set). Returns per job its trained state (every state key, CPU tensors) and its statistics.

    ``per_example(output, target)``: the per-example losses whose mean ``loss_fn`` is
    (:func:`per_example_loss`), so batches of different lengths are padded with zero-weight
    examples; without it (and for models with buffers) they train in one ``vmap`` per length.
    """
    to_device(model, device)
    if not model.training:
        model.train()
    if stochastic(model):
        raise NotImplementedError("a model with dropout is trained one by one")
    n_jobs = len(jobs)
    state, named = _state(model), _named(model)
    buffer_names = [k for k in state if k not in named]
    train_names = [k for k in named if trainable is None or k in trainable]
    P = _stack(jobs, list(named), state, device)
    B = _stack(jobs, buffer_names, state, device)
    flip = linear_weights(model, train_names)
    for k in flip:
        P[k] = P[k].transpose(1, 2).clone(memory_format=torch.contiguous_format)
    for k in train_names:
        P[k].requires_grad_(True)
    keep = _masks(jobs, train_names, P, device, flip)
    opt = Optimizer([P[k] for k in train_names], cfg)
    plans = [list(batches(np.asarray(j.indices), cfg.batch_size, cfg.local_epochs, cfg.local_steps,
                          np.random.default_rng(j.seed))) if len(j.indices) else [] for j in jobs]
    steps = np.array([len(p) for p in plans])
    xs = _on_device(x, device)
    ys = [_on_device(j.y, device) for j in jobs]
    same_y = all(j.y is jobs[0].y for j in jobs)
    pad = per_example is not None and not buffer_names

    def module(p):  # one client's values in the module's layout (views)
        return {k: v.mT if k in flip else v for k, v in p.items()}

    def loss_of(p, b, xb, yb):
        return loss_fn(functional_call(model, (module(p), b), (xb,)), yb)

    def weighted_loss_of(p, b, xb, yb, wb):
        return (per_example(functional_call(model, (module(p), b), (xb,)), yb) * wb).sum()

    def read(c, values, copy=True):  # client c's values in the module's layout, contiguous
        def one(k, v):
            v = v[c].mT if k in flip else v[c]
            return v.clone(memory_format=torch.contiguous_format) if copy else v.contiguous()
        return {k: one(k, v) for d in values for k, v in d.items()}

    batched, weighted = vmap(loss_of), vmap(weighted_loss_of)

    def gather(idx: np.ndarray, rows) -> tuple[torch.Tensor, torch.Tensor]:
        it = torch.from_numpy(idx).to(device, non_blocking=True)
        if same_y:
            return xs[it], ys[0][it]
        return xs[it], torch.stack([ys[c][it[i]] for i, c in enumerate(rows)])

    total = torch.zeros(n_jobs, dtype=torch.float64, device=device)
    out: list = [None] * n_jobs
    last = int(steps.max(initial=0))
    for c in np.flatnonzero(steps == 0):  # nothing to train: the start
        with torch.no_grad():
            out[c] = read(c, (P, B))
    for s in range(last):
        active = np.flatnonzero(steps > s)
        lens = np.zeros(n_jobs, dtype=np.int64)
        lens[active] = [len(plans[c][s]) for c in active]
        opt.zero_grad()
        if len(active) == n_jobs and (lens == lens[0]).all():  # every client, one length: no padding
            loss = batched(P, B, *gather(np.stack([plans[c][s] for c in range(n_jobs)]), range(n_jobs)))
            loss.sum().backward()
            per_client = loss.detach()
        elif pad:  # pad to the longest batch with zero-weight examples (clients done: all zero)
            width = int(lens.max())
            idx = np.zeros((n_jobs, width), dtype=np.int64)
            w = np.zeros((n_jobs, width), dtype=np.float32)
            for c in active:
                b = plans[c][s]
                idx[c, :len(b)], idx[c, len(b):] = b, b[0]
                w[c, :len(b)] = 1.0 / len(b)
            loss = weighted(P, B, *gather(idx, range(n_jobs)), torch.from_numpy(w).to(device))
            loss.sum().backward()
            per_client = loss.detach()
        else:  # one vmap per batch length, on the clients of that length
            per_client = torch.zeros(n_jobs, device=device)
            parts = []
            for length in np.unique(lens[active]):
                rows = active[lens[active] == length]
                if len(rows) == n_jobs:
                    p, b, sel = P, B, None
                else:
                    sel = torch.from_numpy(rows).to(device)
                    p = {k: v.index_select(0, sel) for k, v in P.items()}
                    b = {k: v.index_select(0, sel) for k, v in B.items()}
                loss = batched(p, b, *gather(np.stack([plans[c][s] for c in rows]), rows))
                if sel is not None:
                    with torch.no_grad():
                        for k, v in b.items():  # the batch-norm statistics of these clients
                            B[k].index_copy_(0, sel, v)
                    per_client.index_copy_(0, sel, loss.detach())
                else:
                    per_client = loss.detach()
                parts.append(loss.sum())
            torch.stack(parts).sum().backward()
        opt.step()
        if keep:
            with torch.no_grad():
                for k, (m, frozen) in keep.items():
                    P[k].mul_(m).add_(frozen)
        total += per_client.double() * torch.from_numpy(lens).to(device)
        if s + 1 < last:
            for c in np.flatnonzero(steps == s + 1):  # clients that took their last step: read out now
                with torch.no_grad():
                    out[c] = read(c, (P, B))
    opt.state.clear()
    with torch.no_grad():
        final = {k: v.detach().cpu() for d in (P, B) for k, v in d.items()}
    tot = total.cpu().numpy()
    result = []
    for c, j in enumerate(jobs):
        values = {k: v.cpu() for k, v in out[c].items()} if out[c] is not None else read(c, (final,), copy=False)
        seen = sum(len(b) for b in plans[c])
        result.append((values, TrainStats(loss=float(tot[c]) / max(seen, 1), steps=int(steps[c]),
                                          examples=len(j.indices))))
    return result
