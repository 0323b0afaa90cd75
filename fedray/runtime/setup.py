"""Everything a run needs before the first dispatch: data, partitions, model, devices, task."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedray import config as C
from fedray import seeding
from fedray.client.trainer import get_params
from fedray.data.datasets import Dataset, load_dataset
from fedray.errors import ConfigError
from fedray.data.partition import Partitions, cached_partition, partition
from fedray.devices.columns import Population
from fedray.models.factory import build_model
from fedray.models.info import ModelInfo
from fedray.tasks import Task, get_task
from fedray.devices import population

__all__ = ["Setup", "prepare"]


@dataclass
class Setup:
    cfg: C.ExperimentConfig
    dataset: Dataset
    partitions: Partitions
    params: dict[str, np.ndarray]
    model: ModelInfo
    profiles: Population
    task: Task

    @property
    def examples(self) -> np.ndarray:
        return self.partitions.sizes


def prepare(cfg: C.ExperimentConfig) -> Setup:
    """Load data (once), partition it (cached), build the initial model and the devices.
    The model's structure (spec) is traced only when something asks for it."""
    d = cfg.data
    ds = load_dataset(d.name, root=d.root, download=d.download, seed=cfg.seed, test_fraction=d.test_fraction,
                      options=d.options)
    p = d.partition
    key = {"data": d.name, "root": d.root, "options": d.options, "test_fraction": d.test_fraction,
           "n": int(len(ds.y_train)), "clients": d.num_clients, "kind": p.kind, "alpha": p.alpha,
           "classes_per_client": p.classes_per_client, "min_size": p.min_size, "seed": cfg.seed}
    if ds.partitions is not None:  # the loader's own, one client per user
        if len(ds.partitions) != d.num_clients:
            raise ConfigError("data.num_clients", f"must equal the data set's {len(ds.partitions)} users "
                                                    f"(data.options.num_users), got {d.num_clients}")
        parts = ds.partitions
    else:
        parts = cached_partition(d.cache_dir, key, lambda: partition(
            ds.y_train, d.num_clients, p.kind, seed=seeding.derive(cfg.seed, "partition"), alpha=p.alpha,
            classes_per_client=p.classes_per_client, writers=ds.writers, min_size=p.min_size))
    torch.manual_seed(seeding.derive(cfg.seed, "init"))
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, options=cfg.model.options)
    info = ModelInfo(model, ds.x_train[:2], name=cfg.model.name, options=cfg.model.options,
                     num_outputs=ds.num_classes)
    return Setup(cfg, ds, parts, get_params(model), info, population.profiles(cfg), get_task(cfg.task.name, cfg.task.options))
