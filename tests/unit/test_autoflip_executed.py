"""AutoFLIP judged on what runs: its structured part trains a physically smaller model (executed
FLOPs fall), and its FedAvg baseline with the same server momentum; no Ray."""
from __future__ import annotations

import numpy as np

from fedray.channel import Channel
from fedray.client.worker import ClientWorker, Task
from fedray.config import from_dict
from fedray.models.spec import model_spec
from fedray.submodel import masks as M
from fedray.submodel.encode import decode, encode
from fedray.submodel.encode import Payload
from fedray.submodel.width import keep_mask, mask_keep
from fedray.update import Update
from tests import kit

HIDDEN = (8, 6)  # MLP 64 -> 8 -> 6 -> 10


def cfg_for(method: dict):
    return from_dict({"method": method, "data": {"name": "digits", "num_clients": 10},
                      "model": {"name": "mlp", "options": {"hidden": list(HIDDEN)}},
                      "train": {"batch_size": 8, "local_epochs": 1}})


def explored(params, quiet_rows=(0, 1, 2), seed=0):
    """Exploring copies in which rows ``quiet_rows`` of the first layer barely move (their mean
    guidance is far below the quantile, so the structured part removes those neurons)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(3):
        m = {k: (v + rng.normal(size=v.shape)).astype(v.dtype) for k, v in params.items()}
        for r in quiet_rows:
            m["layers.0.weight"][r] = params["layers.0.weight"][r] + 1e-4 * rng.normal(size=64)
        out.append(m)
    return out


def item(did, client, values, mask=None, n=10, base=0):
    h = Update(dispatch_id=did, client_id=client, base_version=base, num_examples=n)
    return h, Payload(encode(values, mask).entries, {}), None


def test_mask_keep_reads_the_channels_a_mask_covers():
    info, params = kit.model_info("mlp", {"hidden": list(HIDDEN)})
    spec = info.try_spec()
    keep = {"layers.0": np.array([1, 3, 4]), "layers.1": np.array([0, 5])}
    mask = keep_mask(spec, params, keep)
    mask["layers.0.weight"][3] = False  # weights of a kept neuron all pruned: its bias keeps it
    got = mask_keep(spec, mask)
    assert {k: v.tolist() for k, v in got.items()} == {"layers.0": [1, 3, 4], "layers.1": [0, 5]}
    none = {k: np.zeros_like(v, dtype=bool) for k, v in mask.items()}
    assert {k: v.tolist() for k, v in mask_keep(spec, none).items()} == {"layers.0": [0], "layers.1": [0]}


def test_structured_autoflip_trains_a_compact_model_with_lower_executed_flops():
    info, params = kit.model_info("mlp", {"hidden": list(HIDDEN)})
    spec = info.try_spec()
    cfg = cfg_for({"name": "autoflip", "q": 0.3})
    core = kit.core_for(cfg, params, info)
    res = core.receive([item(i, i, m) for i, m in enumerate(explored(params))], force=True)
    mask = res["messages"][0]["mask"]
    assert not mask["layers.0.bias"][[0, 1, 2]].any() and not mask["layers.1.weight"][:, [0, 1, 2]].any()
    planner = kit.planner_for(cfg, info, examples=np.full(10, 40))
    planner.receive(res["messages"][0])
    sub = planner.plan(0, 1).submodel
    assert sub.keep["layers.0"].tolist() == [3, 4, 5, 6, 7] and M.equal(sub.mask, mask)
    channel = Channel(info.like)
    cost = sub.cost(info, channel)
    full = spec.train_flops(spec.layer_names, 1)
    sizes = sub.sizes()
    # executed FLOPs: the compact model's dense training FLOPs, below the full model's (FedAvg's)
    assert cost.flops_per_example == info.compact_train_flops(sizes) < full
    # sparse FLOPs beside them: every compact layer's forward scaled by its weight's density inside it
    cspec = info.compact_spec(sizes)
    dens = {layer.name: mask[layer.weight_key].sum() / np.prod(cspec.shapes[layer.weight_key])
            for layer in cspec.layers}
    want = sum(layer.forward_flops * dens[layer.name] for layer in cspec.layers) / cspec.forward_flops()
    assert cost.sparse_factor == np.float64(want) and 0 < cost.sparse_factor < 1
    # the client trains the compact model; it sends exactly the mask's coordinates, as predicted
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=40).astype(np.int64)
    worker = ClientWorker(cfg, {"x": x, "y": y}, [np.arange(40)], (64,), 10)
    a = planner.plan(0, 1)
    u = worker.run_task(core.params, Task(10, 1, a))
    assert u.error is None
    (compact,) = worker._compact.values()
    assert model_spec(compact, (64,)).train_flops(cspec.layer_names, 1) == cost.flops_per_example
    assert u.bytes_up == cost.bytes_up == u.payload.nbytes == channel.mask_nbytes(mask)
    values, sent = decode(u.payload, spec.shapes)
    assert M.equal(sent, {k: m for k, m in mask.items() if m.any()})
    for k in params:  # pruned coordinates stay zero inside the compact model too
        assert not np.any(values[k][~mask[k]])
    res = core.receive([(u.header(), u.payload, channel.expected(sub, cost.bytes_up, info))], force=True)
    assert res["results"] == [(10, None)] and res["aggregated"]
    for k in params:
        assert not np.any(core.params[k][~mask[k]])


def test_unstructured_autoflip_keeps_the_full_model():
    info, params = kit.model_info("mlp", {"hidden": list(HIDDEN)})
    cfg = cfg_for({"name": "autoflip", "q": 0.3, "structured": False})
    core = kit.core_for(cfg, params, info)
    res = core.receive([item(i, i, m) for i, m in enumerate(explored(params))], force=True)
    planner = kit.planner_for(cfg, info)
    planner.receive(res["messages"][0])
    sub = planner.plan(0, 1).submodel
    assert sub.keep is None and sub.cost(info, Channel(info.like)).flops_per_example == \
        info.try_spec().train_flops(info.try_spec().layer_names, 1)


def test_fedavg_server_momentum_by_hand():
    """FedAvgM: v <- beta v + (theta - mean), theta <- theta - v on the parameters; buffers take the mean."""
    info, params = kit.model_info("mlp", {"hidden": list(HIDDEN)})
    core = kit.core_for(from_dict({"method": {"name": "fedavg", "server_momentum": 0.9}}), params, info)
    plain = kit.core_for(from_dict({"method": "fedavg"}), params, info)
    k = "layers.1.weight"
    x0 = params[k].astype(np.float64)
    a, b = ({kk: np.full_like(v, val) for kk, v in params.items()} for val in (1.0, 3.0))
    for c in (core, plain):  # mean 2.5 by example count
        c.receive([item(0, 0, a, n=10), item(1, 1, b, n=30)], force=True)
    v1 = x0 - 2.5
    np.testing.assert_allclose(core.params[k], x0 - v1, rtol=1e-6)  # the first step is the mean
    np.testing.assert_allclose(plain.params[k], 2.5)
    for c in (core, plain):
        c.receive([item(2, 0, a, n=10, base=1)], force=True)
    v2 = 0.9 * v1 + (2.5 - 1.0)
    np.testing.assert_allclose(core.params[k], 2.5 - v2, rtol=1e-5)
    np.testing.assert_allclose(plain.params[k], 1.0)
    assert core.server.state.velocity is not None and plain.server.state.velocity is None
