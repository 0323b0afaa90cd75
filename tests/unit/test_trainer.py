"""Local training: a client algorithm's epoch hook stops early on the training loss (AutoFLIP's
exploration); a reused model and optimizer give what fresh ones would."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedray.client.trainer import get_params, local_train
from fedray.config import TrainConfig


def exploring():
    """AutoFLIP's exploration hooks and the local run they see: ``local_train(..., **exploring())``."""
    from fedray.methods.autoflip import ExplorationClient
    from fedray.methods.base import Assignment, ClientContext, LocalRun
    from fedray.submodel.submodel import FULL

    algo = ExplorationClient(ClientContext(None, "autoflip", None, None))
    run = LocalRun(Assignment(0, client=(("explore", True),)), FULL, {}, {}, None, seed=1, lr=0.0)
    algo.prepare(run)
    return {"hooks": algo, "run": run}


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return x, y


def test_early_stop_ends_when_the_epoch_loss_stops_falling():
    x, y = data()
    torch.manual_seed(0)  # the outcome depends on the initial weights
    model = nn.Linear(4, 2)
    params = get_params(model)
    diverge = TrainConfig(local_epochs=20, batch_size=16, lr=50.0)  # a huge step: the loss jumps around
    stopped = local_train(model, params, x, y, np.arange(64), diverge, seed=1, **exploring())
    full = local_train(model, params, x, y, np.arange(64), diverge, seed=1)
    assert full.steps == 20 * 4
    assert stopped.steps % 4 == 0 and 8 <= stopped.steps < full.steps


def test_early_stop_keeps_training_while_the_loss_falls():
    x, y = data()
    model = nn.Linear(4, 2)
    torch.manual_seed(0)
    cfg = TrainConfig(local_epochs=3, batch_size=64, lr=0.01)  # one full batch per epoch: loss falls
    s = local_train(model, get_params(model), x, y, np.arange(64), cfg, seed=1, **exploring())
    assert s.steps == 3


@pytest.mark.parametrize("cfg", [TrainConfig(local_epochs=2, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-3),
                                 TrainConfig(local_epochs=2, batch_size=16, optimizer="adam", lr=0.01)],
                         ids=["sgd-momentum", "adam"])
def test_reused_model_and_optimizer_give_a_fresh_result(cfg):
    """One model (and its kept optimizer) trains client after client: each result equals a
    fresh model's, momentum buffers and Adam moments included; frozen parameters stay frozen."""
    x, y = data()
    torch.manual_seed(0)
    init = get_params(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))

    def fresh():
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    shared = fresh()
    jobs = [(np.arange(0, 32), None, 1), (np.arange(32, 64), {"2.weight", "2.bias"}, 2), (np.arange(64), None, 3)]
    for idx, trainable, seed in jobs:
        local_train(shared, init, x, y, idx, cfg, seed=seed, trainable=trainable)
        got = get_params(shared)
        alone = fresh()
        local_train(alone, init, x, y, idx, cfg, seed=seed, trainable=trainable)
        want = get_params(alone)
        assert all(np.array_equal(got[k], want[k]) for k in want)
        if trainable is not None:
            assert np.array_equal(got["0.weight"], init["0.weight"])
        assert all(p.requires_grad for p in shared.parameters())

        def fail(_s):
            raise RuntimeError("device lost")

        with pytest.raises(RuntimeError):  # a task that fails midway changes nothing for the next
            local_train(shared, init, x, y, idx, cfg, seed=seed, trainable={"2.bias"}, on_step=fail)
        assert all(p.requires_grad for p in shared.parameters())


@pytest.mark.parametrize("opt,momentum,wd", [("sgd", 0.0, 0.0), ("sgd", 0.9, 0.0), ("sgd", 0.9, 1e-3),
                                             ("adam", 0.0, 0.0), ("adam", 0.0, 1e-3)])
def test_optimizer_steps_exactly_as_torch_optim_without_importing_dynamo(opt, momentum, wd):
    """fedray's optimizer is torch.optim's functional step; the classes import torch._dynamo
    (0.8 s in every client actor) when first built. Same numbers, bit for bit, over steps where
    one parameter has no gradient (frozen)."""
    import subprocess
    import sys

    from fedray.client.trainer import Optimizer

    cfg = SimpleNamespace(optimizer=opt, lr=0.05, momentum=momentum, weight_decay=wd)
    torch.manual_seed(0)
    a = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    ours = Optimizer(a, cfg)
    ref = (torch.optim.Adam(b, lr=0.05, weight_decay=wd) if opt == "adam"
           else torch.optim.SGD(b, lr=0.05, momentum=momentum, weight_decay=wd))
    x = torch.randn(8, 4)
    for step in range(4):
        for params, o in ((a, ours), (b, ref)):
            o.zero_grad()
            (torch.tanh(x @ params[0]) + (params[1] if step != 2 else 0)).pow(2).sum().backward()
            o.step()
        assert all(torch.equal(p, q) for p, q in zip(a, b)), step
    code = ("import sys, torch; from types import SimpleNamespace; from fedray.client.trainer import Optimizer; "
            "p = torch.ones(2, requires_grad=True); o = Optimizer([p], SimpleNamespace(optimizer='adam', lr=0.1, "
            "momentum=0.0, weight_decay=0.0)); p.sum().backward(); o.step(); "
            "assert 'torch._dynamo' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
