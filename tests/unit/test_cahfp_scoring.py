"""CA-HFP: scoring every T rounds (channel sets fixed in between), scoring on the server from
aggregated curvature, and the size of every client's compact model; no Ray."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd

from fedray.channel import Channel
from fedray.client.worker import ClientWorker, Task
from fedray.config import from_dict
from fedray.metrics.definitions import compact_by_client
from fedray.pruning.curvature import group_scores, group_terms
from fedray.submodel.encode import Payload, decode, encode
from fedray.update import Update
from tests import kit

HIDDEN = (8, 6)  # MLP 64 -> 8 -> 6 -> 10


def setup(method: dict):
    info, params = kit.model_info("mlp", {"hidden": list(HIDDEN)})
    cfg = from_dict({"method": {"name": "cahfp", "ratios": [0.5], **method},
                     "data": {"name": "digits", "num_clients": 10},
                     "model": {"name": "mlp", "options": {"hidden": list(HIDDEN)}},
                     "train": {"batch_size": 8, "local_epochs": 1}})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=40).astype(np.int64)
    worker = ClientWorker(cfg, {"x": x, "y": y}, [np.arange(40)], (64,), 10)
    return cfg, info, params, kit.planner_for(cfg, info, examples=np.full(10, 40)), worker


def kept_of(u, spec):
    """The channels an update trained, read from its payload (slices of the first two layers)."""
    _, mask = decode(u.payload, spec.shapes)
    return {"layers.0": np.flatnonzero(mask["layers.0.bias"]).tolist(),
            "layers.1": np.flatnonzero(mask["layers.1.bias"]).tolist()}


def kept_slice(info, spec):
    """The mask of channels 0-3 of layer 0 and 0-2 of layer 1 (any set of those sizes costs the same)."""
    from fedray.submodel.width import keep_mask

    return keep_mask(spec, info.like, {"layers.0": np.arange(4), "layers.1": np.arange(3)})


def test_score_every_keeps_a_clients_channel_set_between_rescoring():
    cfg, info, params, planner, worker = setup({"score_every": 3})
    spec = info.try_spec()
    plans = [planner.plan(0, v) for v in range(7)]
    assert [a.setting("score") for a in plans] == [True, False, False, True, False, False, True]
    assert [dict(a.info)["scored"] for a in plans] == [True, False, False, True, False, False, True]
    rescore, reuse = plans[0].submodel, plans[1].submodel
    assert rescore.extra_flops > 0 and reuse.extra_flops == 0 and reuse.extras == ()
    channel = Channel(info.like)
    assert reuse.cost(info, channel).bytes_up < rescore.cost(info, channel).bytes_up  # no kept/ indices
    # a scoring dispatch downloads the full model (it scores on it); a reusing one only its compact
    # model: 4 of 8 and 3 of 6 channels, by hand (weights, biases and the next layer's inputs)
    assert rescore.cost(info, channel).bytes_down == channel.mask_nbytes(None)
    kept_values = 4 * 64 + 4 + 3 * 4 + 3 + 10 * 3 + 10
    assert reuse.cost(info, channel).bytes_down == channel.mask_nbytes(info.slice_mask(reuse.widths))
    assert reuse.cost(info, channel).bytes_down == channel.mask_nbytes(kept_slice(info, spec))
    assert int(sum(v.sum() for v in kept_slice(info, spec).values())) == kept_values
    # a scoring dispatch stores its pick; the next ones train exactly that set, whatever the model
    u0 = worker.run_task(params, Task(0, 0, plans[0]))
    assert u0.error is None and set(u0.payload.state) == {"kept/layers.0", "kept/layers.1"}
    first = kept_of(u0, spec)
    assert first == {k[len("kept/"):]: v.tolist() for k, v in u0.payload.state.items()}
    moved = {k: (v + np.random.default_rng(1).normal(size=v.shape)).astype(v.dtype) for k, v in params.items()}
    for did, (a, model) in enumerate([(plans[1], moved), (plans[2], params)], start=1):
        u = worker.run_task(model, Task(did, did, a, state=u0.payload.state))
        assert u.error is None and kept_of(u, spec) == first and u.payload.aux == {} and u.payload.state is None
        assert u.bytes_up == a.submodel.cost(info, channel).bytes_up
    # a hand-made stored set is what the client trains (not a fresh score)
    mine = {"kept/layers.0": np.array([0, 2, 5, 7], np.int32), "kept/layers.1": np.array([1, 3, 4], np.int32)}
    u = worker.run_task(moved, Task(9, 1, plans[1], state=mine))
    assert kept_of(u, spec) == {"layers.0": [0, 2, 5, 7], "layers.1": [1, 3, 4]}
    # a client told to reuse its set that has none scores again (and stores its new pick)
    u = worker.run_task(params, Task(10, 1, plans[1]))
    assert u.error is None and kept_of(u, spec) == {k[len("kept/"):]: v.tolist() for k, v in u.payload.state.items()}
    # the scoring versions are the planner's state (checkpointed)
    again = kit.planner_for(cfg, info, examples=np.full(10, 40))
    again.load_state_dict(pickle.loads(pickle.dumps(planner.state_dict())))
    assert again.plan(0, 7).setting("score") is False and again.plan(0, 9).setting("score") is True


def test_score_every_one_is_todays_behaviour():
    cfg, info, params, planner, worker = setup({})
    assert all(planner.plan(0, v).setting("score") for v in range(3))
    u = worker.run_task(params, Task(0, 0, planner.plan(0, 3)))
    assert u.payload.state is None and set(u.payload.aux) == {"kept/layers.0", "kept/layers.1"}


def test_group_terms_are_linear_so_aggregated_terms_score_the_aggregated_curvature():
    info, params = kit.model_info("mlp", {"hidden": list(HIDDEN)})
    spec = info.try_spec()
    rng = np.random.default_rng(0)
    keys = list(spec.param_keys)
    gs = [{k: rng.normal(size=params[k].shape) for k in keys} for _ in range(2)]
    hs = [{k: rng.random(size=params[k].shape) for k in keys} for _ in range(2)]
    w = (10.0, 30.0)
    terms = [group_terms(spec, params, g, h) for g, h in zip(gs, hs)]
    mean_g = {k: (w[0] * gs[0][k] + w[1] * gs[1][k]) / 40 for k in keys}
    mean_h = {k: (w[0] * hs[0][k] + w[1] * hs[1][k]) / 40 for k in keys}
    want = group_scores(spec, params, mean_g, mean_h)
    for layer in want:
        got = np.abs(((w[0] * terms[0][layer] + w[1] * terms[1][layer]) / 40).sum(axis=0))
        np.testing.assert_allclose(got, want[layer], rtol=1e-10)
    # by hand on one neuron: S = |sum_j -g_j w_j + 0.5 h_j w_j^2| over its weight row and bias
    g, h = gs[0], hs[0]
    by_hand = sum(float(np.sum(-g[k][2] * params[k][2] + 0.5 * h[k][2] * params[k][2] ** 2))
                  for k in ("layers.0.weight", "layers.0.bias"))
    np.testing.assert_allclose(terms[0]["layers.0"].sum(axis=0)[2], by_hand, rtol=1e-6)


def test_server_scoring_aggregates_curvature_and_clients_pick_by_it():
    cfg, info, params, planner, worker = setup({"scoring": "server", "score_every": 2})
    spec = info.try_spec()
    core = kit.core_for(cfg, params, info)
    core.server.start(params)
    assert all(not v.any() for v in core.server.broadcast().values())  # zeros: nobody scored yet
    a = planner.plan(0, 0)
    sub = a.submodel
    names = sorted(e.name for e in sub.extras)
    assert names == ["kept/layers.0", "kept/layers.1", "terms/layers.0", "terms/layers.1"]
    channel = Channel(info.like)
    cost = sub.cost(info, channel)
    # the scores the client receives are counted in its download: 4 bytes per channel
    assert cost.bytes_down == channel.mask_nbytes(None) + 4 * (8 + 6)
    u = worker.run_task(params, Task(0, 0, a, state=None), broadcast=core.server.broadcast())
    assert u.error is None and u.bytes_up == cost.bytes_up == u.payload.nbytes
    assert u.payload.aux["terms/layers.0"].shape == (2, 8) and u.payload.aux["terms/layers.0"].dtype == np.float32
    own = kept_of(u, spec)  # no server scores yet: its own top channels
    t0 = u.payload.aux
    # server: the example-weighted mean of the arrived terms, by hand
    t1 = {k: (np.asarray(v) * -3.0 + 1.0).astype(np.float32) for k, v in t0.items() if k.startswith("terms/")}
    h1 = Update(dispatch_id=1, client_id=1, base_version=0, num_examples=30)
    p1 = Payload(encode({k: np.zeros_like(v) for k, v in params.items()}, decode(u.payload, spec.shapes)[1]).entries,
                 {**{k: v for k, v in t0.items() if k.startswith("kept/")}, **t1})
    res = core.receive([(u.header(), u.payload, channel.expected(sub, cost.bytes_up, info)),
                        (h1, p1, channel.expected(sub, cost.bytes_up, info))], force=True)
    assert res["results"] == [(0, None), (1, None)]
    for layer in ("layers.0", "layers.1"):
        mean = (40 * t0["terms/" + layer].astype(np.float64) + 30 * t1["terms/" + layer].astype(np.float64)) / 70
        np.testing.assert_allclose(core.server.state.scores[layer], np.abs(mean.sum(axis=0)), rtol=1e-6)
    # a scoring client keeps the server's top channels by its keep ratio (0.5: 4 of 8, 3 of 6)
    scores = {"scores/layers.0": np.array([0, 9, 0, 8, 0, 7, 0, 6], np.float32),
              "scores/layers.1": np.array([5, 0, 0, 4, 3, 0], np.float32)}
    u2 = worker.run_task(params, Task(2, 2, planner.plan(0, 2)), broadcast=scores)
    assert kept_of(u2, spec) == {"layers.0": [1, 3, 5, 7], "layers.1": [0, 3, 4]} != own
    assert u2.payload.state["kept/layers.0"].tolist() == [1, 3, 5, 7]
    # between rescoring it trains the stored set and sends no terms
    u3 = worker.run_task(params, Task(3, 3, planner.plan(0, 3), state=u2.payload.state), broadcast=scores)
    assert kept_of(u3, spec) == kept_of(u2, spec) and u3.payload.aux == {}


def test_every_clients_compact_model_is_recorded_and_summarised():
    cfg, info, params, planner, worker = setup({"ratios": [1.0, 0.5]})
    spec = info.try_spec()
    infos = [dict(planner.plan(c, 0).info) for c in range(10)]
    full = [i for i in infos if i["keep_ratio"] == 1.0][0]
    half = [i for i in infos if i["keep_ratio"] == 0.5][0]
    assert full["compact_flops"] == spec.forward_flops() and full["compact_params"] == spec.num_params()
    # by hand, MLP 64 -> 4 -> 3 -> 10: forward 2*in*out + out per layer; params in*out + out
    assert half["compact_flops"] == (2 * 64 * 4 + 4) + (2 * 4 * 3 + 3) + (2 * 3 * 10 + 10)
    assert half["compact_params"] == (64 * 4 + 4) + (4 * 3 + 3) + (3 * 10 + 10)
    rows = pd.DataFrame([{"event": "update", "client_id": c, **infos[c]} for c in range(10)]
                        + [{"event": "eval", "client_id": None}])
    out = compact_by_client(rows[rows["event"] == "update"])
    assert out["compact_by_client"]["0"] == {"flops": infos[0]["compact_flops"], "params": infos[0]["compact_params"]}
    assert out["compact_flops_mean"] == np.mean([i["compact_flops"] for i in infos])
