"""What the model learns: the loss clients train on and the metrics the server reports.

A task is an object with

- ``primary``: the name of the metric that ranks models (higher is better); it is what
  ``server.target_accuracy``, time to target, early stopping on plateaus (PR-FL) and the
  reports use. Classification's is ``accuracy``, regression's ``r2``;
- ``loss(output, target)``: the mean training loss (a scalar tensor);
- ``batch_sums(output, target)``: per-batch sums (``{"loss": ..., ...}``, Python floats) that
  ``finish(sums, n)`` turns into the metrics of a whole evaluation set (``loss`` among them).

``classification`` (the default: cross-entropy, top-1 accuracy; integer class targets) and
``regression`` (mean squared error; reports ``mse``, ``mae`` and ``r2``; float targets of
shape ``(N,)`` or ``(N, k)``) ship with fedray; a user task is named by import path
(``task: {name: "mypkg.tasks:MyTask", options: {...}}``, built as ``MyTask(**options)``).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from fedray.errors import ConfigError

__all__ = ["Task", "Classification", "Regression", "TASKS", "get_task", "evaluate"]


class Task:
    """Base class of tasks (see the module docstring)."""

    name = "task"
    primary = "accuracy"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_sums(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def finish(self, sums: Mapping[str, float], n: int) -> dict[str, float]:
        raise NotImplementedError


class Classification(Task):
    """Cross-entropy over class logits; top-1 accuracy."""

    name = "classification"
    primary = "accuracy"

    def loss(self, output, target):
        return nn.functional.cross_entropy(output, target)

    def batch_sums(self, output, target):
        return {"loss": float(nn.functional.cross_entropy(output, target, reduction="sum")),
                "correct": int((output.argmax(1) == target).sum())}

    def finish(self, sums, n):
        return {"accuracy": sums.get("correct", 0) / max(n, 1), "loss": sums.get("loss", 0.0) / max(n, 1)}


class Regression(Task):
    """Mean squared error; reports ``mse`` (= ``loss``), ``mae`` and the coefficient of
    determination ``r2 = 1 - SSE / SST`` (SST around the evaluation set's own mean)."""

    name = "regression"
    primary = "r2"

    @staticmethod
    def _shape(output, target):
        return output.reshape(target.shape) if output.numel() == target.numel() else output

    def loss(self, output, target):
        return nn.functional.mse_loss(self._shape(output, target), target)

    def batch_sums(self, output, target):
        out = self._shape(output, target).double()
        t = target.double()
        err = out - t
        return {"sse": float((err ** 2).sum()), "sae": float(err.abs().sum()), "sy": float(t.sum()),
                "syy": float((t ** 2).sum()), "values": int(t.numel())}

    def finish(self, sums, n):
        m = max(int(sums.get("values", 0)), 1)
        sse = sums.get("sse", 0.0)
        sst = sums.get("syy", 0.0) - sums.get("sy", 0.0) ** 2 / m
        mse = sse / m
        return {"mse": mse, "loss": mse, "mae": sums.get("sae", 0.0) / m,
                "r2": 1.0 - sse / sst if sst > 0 else float("nan")}


TASKS: dict[str, type[Task]] = {"classification": Classification, "regression": Regression}


def get_task(name: str = "classification", options: Mapping | None = None) -> Task:
    """The task ``name`` (a registered name or an import path) built with ``options``."""
    from fedray import plugins

    if plugins.is_import_path(name):
        cls = plugins.load_object(name, "task.name", kind="task")
    elif name in TASKS:
        cls = TASKS[name]
    else:
        raise ConfigError("task.name", f"unknown task {name!r}; choose from: {', '.join(TASKS)} "
                                       "or an import path 'package.module:Task'")
    try:
        task = cls(**dict(options or {}))
    except TypeError as e:
        raise ConfigError("task.options", f"task {name!r} does not take these options: {e}") from None
    for attr in ("primary", "loss", "batch_sums", "finish"):
        if not hasattr(task, attr):
            raise ConfigError("task.name", f"task {name!r} has no {attr!r} (see fedray.tasks.Task)")
    return task


@torch.no_grad()
def evaluate(model: nn.Module, x, y, task: Task, *, batch_size: int = 1024,
             device=torch.device("cpu")) -> dict[str, float]:
    """The task's metrics of ``model`` on ``(x, y)`` (numpy arrays), in eval mode."""
    import warnings

    from fedray.client.trainer import to_device

    to_device(model, device)
    model.eval()
    sums: dict[str, float] = {}
    n = len(y)
    for s in range(0, n, batch_size):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            xb = torch.from_numpy(x[s: s + batch_size]).to(device)
            yb = torch.from_numpy(y[s: s + batch_size]).to(device)
        for k, v in task.batch_sums(model(xb), yb).items():
            sums[k] = sums.get(k, 0) + v
    return task.finish(sums, n)
