"""Vectorised local training (torch.func): every client of a group ends where one-by-one
training (:func:`local_train`) takes it, within float rounding -- masks, frozen parameters,
partitions of different sizes and short last batches, SGD with momentum and weight decay,
Adam, batch norm, step budgets; which dispatches train together depends only on the config."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from fedray.client.trainer import get_params, local_train
from fedray.client.vectorised import Job, group_size, per_example_loss, train_group
from fedray.config import TrainConfig, from_dict
from fedray.models.factory import build_model
from fedray.tasks import Classification, Regression

SGD = TrainConfig(local_epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3)
ADAM = TrainConfig(local_epochs=1, batch_size=8, optimizer="adam", lr=0.01, weight_decay=1e-4)
STEPS = TrainConfig(local_steps=5, batch_size=16, lr=0.05)
SIZES = [20, 37, 16, 5, 40, 1]  # short last batches, different step counts, a single example


def data(shape, n=200, classes=10):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, *shape)).astype(np.float32), rng.integers(0, classes, n).astype(np.int64)


def jobs_for(model, y, sizes=SIZES, masked=(), y_of=None):
    """One job per size: consecutive examples, a start per client, a random mask on the first
    parameter of the clients in ``masked``."""
    rng = np.random.default_rng(1)
    init = get_params(model)
    first = next(iter(dict(model.named_parameters())))
    jobs, off = [], 0
    for i, n in enumerate(sizes):
        start = {k: (v + np.float32(0.01 * i)).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in init.items()}
        mask = None
        if i in masked:
            mask = {first: rng.random(init[first].shape) > 0.5}
        jobs.append(Job(start, y if y_of is None else y_of(i), np.arange(off, off + n), seed=100 + i, mask=mask))
        off += n
    return jobs


def one_by_one(model, jobs, x, cfg, trainable=None, loss_fn=nn.functional.cross_entropy):
    out = []
    for j in jobs:
        t = trainable if trainable is not None else (set(j.mask) if j.mask is not None else None)
        stats = local_train(model, j.start, x, j.y, j.indices, cfg, seed=j.seed, trainable=t, mask=j.mask,
                            loss_fn=loss_fn)
        out.append((get_params(model), stats))
    return out


def assert_same(got, want, jobs, atol=1e-5, frozen=()):
    for j, (values, stats), (ref, ref_stats) in zip(jobs, got, want):
        assert stats.steps == ref_stats.steps and stats.examples == ref_stats.examples
        assert stats.loss == pytest.approx(ref_stats.loss, rel=1e-5, abs=1e-6)
        assert set(values) == set(ref)
        for k in ref:
            np.testing.assert_allclose(values[k].numpy(), ref[k], atol=atol, rtol=1e-4, err_msg=k)
        for k in frozen:  # untouched: exactly the start
            assert np.array_equal(values[k].numpy(), j.start[k]), k
        if j.mask is not None:
            for k, m in j.mask.items():  # coordinates outside the mask: exactly the start
                assert np.array_equal(values[k].numpy()[~m], j.start[k][~m]), k


@pytest.mark.parametrize("cfg", [SGD, ADAM, STEPS], ids=["sgd-momentum-wd", "adam", "step-budget"])
@pytest.mark.parametrize("name,options,shape", [("mlp", {"hidden": [32]}, (64,)),
                                                ("cnn", {"channels": [4, 8], "hidden": [16]}, (1, 8, 8))],
                         ids=["mlp", "cnn"])
def test_every_client_ends_where_one_by_one_training_takes_it(cfg, name, options, shape):
    x, y = data(shape)
    torch.manual_seed(0)
    model = build_model(name, shape, 10, options=options)
    jobs = jobs_for(model, y, masked=(1, 3))
    for j in jobs:  # a mask restricts training to the masked tensors (the worker's rule)
        if j.mask is not None:
            j.mask.update({k: np.ones(p.shape, bool) for k, p in model.named_parameters() if k not in j.mask})
    got = train_group(model, jobs, x, cfg, per_example=per_example_loss(Classification()))
    assert_same(got, one_by_one(model, jobs, x, cfg), jobs)


def test_equal_partitions_train_in_one_vmap_per_step():
    x, y = data((64,))
    torch.manual_seed(0)
    model = build_model("mlp", (64,), 10, options={"hidden": [32]})
    jobs = jobs_for(model, y, sizes=[32] * 5)
    got = train_group(model, jobs, x, ADAM, per_example=None)
    assert_same(got, one_by_one(model, jobs, x, ADAM), jobs)


def test_frozen_parameters_get_no_gradient_and_keep_their_start():
    x, y = data((64,))
    torch.manual_seed(0)
    model = build_model("mlp", (64,), 10, options={"hidden": [32, 16]})
    trainable = {"layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias"}  # depth: the last two
    jobs = jobs_for(model, y)
    got = train_group(model, jobs, x, SGD, trainable=trainable, per_example=per_example_loss(Classification()))
    assert_same(got, one_by_one(model, jobs, x, SGD, trainable=trainable), jobs,
                frozen=("layers.0.weight", "layers.0.bias"))
    assert all(p.requires_grad for p in model.parameters())


def test_without_a_per_example_loss_batches_of_each_length_train_apart():
    """A user task whose loss is not a mean over examples: no padding, one vmap per length."""
    x, y = data((64,))
    torch.manual_seed(0)
    model = build_model("mlp", (64,), 10, options={"hidden": [32]})

    def loss(out, target):  # not a mean of per-example terms
        return nn.functional.cross_entropy(out, target) ** 2

    jobs = jobs_for(model, y)
    got = train_group(model, jobs, x, SGD, loss_fn=loss, per_example=None)
    assert_same(got, one_by_one(model, jobs, x, SGD, loss_fn=loss), jobs)


def test_regression_and_per_client_targets():
    """Regression's mean squared error padded per example; each client reads its own targets array."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    targets = [rng.standard_normal(200).astype(np.float32) for _ in SIZES]
    torch.manual_seed(0)
    model = build_model("mlp", (8,), 1, options={"hidden": [16]})
    task = Regression()
    jobs = jobs_for(model, None, y_of=lambda i: targets[i])
    got = train_group(model, jobs, x, SGD, loss_fn=task.loss, per_example=per_example_loss(task))
    assert_same(got, one_by_one(model, jobs, x, SGD, loss_fn=task.loss), jobs)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


def test_batch_norm_statistics_are_each_clients_own():
    """Buffers are stacked too; batches of different lengths train apart (padding would change
    the batch statistics), and every client's running statistics are its own."""
    x, y = data((1, 8, 8))
    torch.manual_seed(0)
    model = BNNet()
    jobs = jobs_for(model, y, sizes=[20, 37, 16, 7, 40])
    got = train_group(model, jobs, x, SGD, per_example=per_example_loss(Classification()))
    assert_same(got, one_by_one(model, jobs, x, SGD), jobs, atol=1e-4)
    assert not np.array_equal(got[0][0]["bn.running_mean"].numpy(), got[1][0]["bn.running_mean"].numpy())


def test_a_model_with_dropout_is_refused():
    model = nn.Sequential(nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, 10))
    x, y = data((64,))
    with pytest.raises(NotImplementedError):
        train_group(model, jobs_for(model, y), x, SGD)


def test_the_group_size_depends_only_on_the_config():
    def cfg(**over):
        return from_dict({"train": {"vectorise": 8}}, [f"{k}={v}" for k, v in over.items()])

    assert group_size(cfg()) == 8 and group_size(cfg(**{"method.name": "clamp"})) == 8
    assert group_size(cfg(**{"train.vectorise": 1})) == 1
    assert group_size(cfg(**{"method.name": "fedbuff"})) == 1  # asynchronous: a resume regroups
    assert group_size(cfg(**{"method.name": "fedprox"})) == 1  # a per-step hook
    assert group_size(cfg(**{"devices.mode": "real"})) == 1  # real throttling, one device at a time
    assert dataclasses.replace(TrainConfig(), vectorise=3).vectorise == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_on_the_gpu_every_client_ends_where_cpu_training_takes_it():
    x, y = data((1, 8, 8))
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, options={"channels": [4, 8], "hidden": [16]})
    jobs = jobs_for(model, y, masked=(2,))
    jobs[2].mask.update({k: np.ones(p.shape, bool) for k, p in model.named_parameters() if k not in jobs[2].mask})
    want = one_by_one(model, jobs, x, SGD)
    got = train_group(model, jobs, x, SGD, device=torch.device("cuda"), per_example=per_example_loss(Classification()))
    assert next(model.parameters()).is_cuda
    assert_same(got, want, jobs, atol=1e-4)


def test_vectorised_cross_entropy_is_torch_s_bit_for_bit_without_importing_sympy():
    """Under ``vmap`` torch's cross-entropy runs a decomposition whose checks import sympy (about
    a second in every client actor); :func:`cross_entropy_rows` gives its numbers exactly."""
    import subprocess
    import sys

    from torch.func import functional_call, vmap

    from fedray.client.vectorised import cross_entropy_rows, vmap_loss

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
    P = {k: v.detach().unsqueeze(0).repeat(4, *([1] * v.dim())) for k, v in m.named_parameters()}
    x, y, w = torch.randn(4, 15, 8), torch.randint(0, 10, (4, 15)), torch.rand(4, 15)
    mean = vmap_loss(Classification())
    cases = [(mean, lambda o, t: nn.functional.cross_entropy(o, t), False),
             (cross_entropy_rows, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), True)]
    for ours, ref, rows in cases:
        out = []
        for f in (ours, ref):
            Q = {k: v.clone().requires_grad_() for k, v in P.items()}
            g = (lambda p, xb, yb, wb: (f(functional_call(m, p, (xb,)), yb) * wb).sum()) if rows else (
                lambda p, xb, yb, wb: f(functional_call(m, p, (xb,)), yb))
            loss = vmap(g)(Q, x, y, w)
            loss.sum().backward()
            out.append((loss.detach(), [Q[k].grad for k in P]))
        assert torch.equal(out[0][0], out[1][0]) and all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
    code = ("import sys, torch; from torch.func import vmap; from fedray.client.vectorised import cross_entropy_rows; "
            "vmap(cross_entropy_rows)(torch.randn(3, 5, 10), torch.randint(0, 10, (3, 5))); "
            "assert 'sympy' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
