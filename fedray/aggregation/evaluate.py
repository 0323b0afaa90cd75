"""Server-side evaluation: the global model on the test set, per client on its own data,
and batch-norm statistics recomputed from training data.

The metrics are the task's (:mod:`fedray.tasks`): classification reports ``accuracy`` and
``loss``, regression ``r2``, ``mse``, ``mae`` and ``loss``.
"""
from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import torch
from torch import nn

from fedray.client.trainer import get_params, load_params, resolve_device, to_device
from fedray.tasks import Task, evaluate

__all__ = ["Evaluator", "recompute_bn"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Evaluator:
    """Metrics of a parameter dict. ``train``: ``(x, y, partitions)`` of the training set
    (per-client evaluation and batch-norm statistics), attached once the data is shared."""

    def __init__(self, model: nn.Module, task: Task, x: np.ndarray, y: np.ndarray, device: str = "auto"):
        self.model, self.task, self.x, self.y = model, task, x, y
        self.device = resolve_device(device)
        self.train: tuple | None = None

    def __call__(self, params: Mapping[str, np.ndarray]) -> dict[str, float]:
        load_params(self.model, params)
        return evaluate(self.model, self.x, self.y, self.task, device=self.device)

    def on_client(self, client: int, params: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Metrics of ``params`` on client ``client``'s own (training) examples."""
        x, y, parts = self._train()
        idx = np.asarray(parts[client])
        load_params(self.model, params)
        return evaluate(self.model, x[idx], y[idx], self.task, device=self.device)

    def bn_statistics(self, params: Mapping[str, np.ndarray], *, max_examples: int | None = None,
                      batch_size: int = 256) -> dict[str, np.ndarray]:
        """``params`` with every batch norm's running statistics recomputed on the training set."""
        x, _, _ = self._train()
        if max_examples is not None:
            x = x[:max_examples]
        return recompute_bn(self.model, params, x, batch_size=batch_size, device=self.device)

    def _train(self):
        if self.train is None:
            raise RuntimeError("the evaluator has no training data attached")
        return self.train


@torch.no_grad()
def recompute_bn(model: nn.Module, params: Mapping[str, np.ndarray], x: np.ndarray, *, batch_size: int = 256,
                 device=torch.device("cpu")) -> dict[str, np.ndarray]:
    """HeteroFL's static batch norm, evaluated: load ``params``, reset every batch norm's
    running statistics and recompute them as the cumulative average (``momentum=None``) of
    the batch statistics of one pass over ``x`` in train mode, in order; return ``params``
    with the new ``running_mean`` / ``running_var`` / ``num_batches_tracked``. Nothing but
    those buffers changes (no gradients, the model's flags are restored)."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    if not bns or len(x) == 0:
        return dict(params)
    load_params(model, params)
    to_device(model, device)
    flags = {m: m.training for m in model.modules()}
    saved = [m.momentum for m in bns]
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for s in range(0, len(x), batch_size):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only arrays from the object store
                xb = torch.from_numpy(np.ascontiguousarray(x[s:s + batch_size])).to(device)
            model(xb)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        for m, f in flags.items():
            m.training = f
    stats = {k for k in get_params(model).keys() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    out = dict(params)
    out.update(get_params(model, [k for k in stats if k in params]))
    return out
