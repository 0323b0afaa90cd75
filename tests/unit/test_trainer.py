"""Local training: early stopping on the training loss (AutoFLIP's exploration)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedray.client.trainer import get_params, local_train
from fedray.config import TrainConfig


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return x, y


def test_early_stop_ends_when_the_epoch_loss_stops_falling():
    x, y = data()
    model = nn.Linear(4, 2)
    params = get_params(model)
    diverge = TrainConfig(local_epochs=20, batch_size=16, lr=50.0)  # a huge step: the loss jumps around
    stopped = local_train(model, params, x, y, np.arange(64), diverge, seed=1, early_stop=True)
    full = local_train(model, params, x, y, np.arange(64), diverge, seed=1)
    assert full.steps == 20 * 4
    assert stopped.steps % 4 == 0 and 8 <= stopped.steps < full.steps


def test_early_stop_keeps_training_while_the_loss_falls():
    x, y = data()
    model = nn.Linear(4, 2)
    torch.manual_seed(0)
    cfg = TrainConfig(local_epochs=3, batch_size=64, lr=0.01)  # one full batch per epoch: loss falls
    s = local_train(model, get_params(model), x, y, np.arange(64), cfg, seed=1, early_stop=True)
    assert s.steps == 3
