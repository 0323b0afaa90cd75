"""A client worker's call with ``train.vectorise`` > 1 gives the updates one-by-one training
gives (within float rounding) for methods with full models, depth (frozen layers + masks),
compact width slices and client state; tasks that cannot train together (hooks, injected
failures) train alone, and the call's order and errors are kept."""
from __future__ import annotations

import numpy as np
import pytest

from fedray.client.worker import ClientWorker, Task
from fedray.config import from_dict
from fedray.runtime.setup import prepare
from fedray.submodel.encode import decode
from tests import kit

CNN = {"name": "cnn", "options": {"channels": [4, 8], "hidden": [16]}}
METHODS = {"fedavg": {}, "clamp": {}, "cahfp": {}, "heterofl": {}, "fedper": {}, "fedprox": {}}


def config(tmp_path, name, vectorise, **over):
    base = {"method": {"name": name, **METHODS[name]}, "model": CNN,
            "data": {"name": "digits", "num_clients": 12, "cache_dir": str(tmp_path / "cache")},
            "train": {"vectorise": vectorise, "momentum": 0.5, "weight_decay": 1e-3},
            "devices": {"tiers": "clamp"}}
    return from_dict(base, [f"{k}={v}" for k, v in over.items()])


def call(tmp_path, name, **over):
    """The same call's updates from a vectorising worker and a one-by-one one, and the first."""
    one, vec = config(tmp_path, name, 1, **over), config(tmp_path, name, 4, **over)
    s = prepare(one)
    info = s.model
    planner = kit.planner_for(one, info, s.examples)
    message = kit.server_for(one, info).start(s.params)
    if message:
        planner.receive(message)
    tasks = [Task(d, 0, planner.plan(c, 0), fail={5: "raise", 7: "nan"}.get(d)) for d, c in enumerate(range(12))]
    data = {"x": s.dataset.x_train, "y": s.dataset.y_train}
    workers = [ClientWorker(c, data, s.partitions, s.dataset.input_shape, s.dataset.num_classes) for c in (one, vec)]
    return [w.run(s.params, tasks) for w in workers], workers[1], {k: v.shape for k, v in s.params.items()}


@pytest.mark.parametrize("name", list(METHODS))
def test_a_vectorised_call_gives_the_one_by_one_updates(tmp_path, name):
    (want, got), worker, shapes = call(tmp_path, name)
    # 11 tasks trained (one failed before); CA-HFP's and HeteroFL's slices differ by tier (groups of a
    # shape), HeteroFL's narrower slices register scaler hooks and FedProx has a step hook (alone)
    assert worker.together == {"fedavg": 11, "clamp": 11, "fedper": 11, "fedprox": 0}.get(name, worker.together)
    assert worker.together > 0 or name == "fedprox"
    for u, v in zip(want, got):
        assert (u.dispatch_id, u.client_id, u.steps, u.error is None) == (v.dispatch_id, v.client_id, v.steps,
                                                                          v.error is None)
        if u.error is not None:
            assert u.error == v.error
            continue
        assert v.train_loss == pytest.approx(u.train_loss, rel=1e-5)
        a, ma = decode(u.payload, shapes)
        b, mb = decode(v.payload, shapes)
        assert set(a) == set(b) and all(np.array_equal(ma[k], mb[k]) for k in ma)
        for k in a:
            np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=1e-4, err_msg=k)
        assert set(u.payload.aux) == set(v.payload.aux)
        for k in u.payload.aux:
            np.testing.assert_allclose(v.payload.aux[k], u.payload.aux[k], atol=1e-5)
        assert (u.payload.state is None) == (v.payload.state is None)
        for k in (u.payload.state or {}):
            np.testing.assert_allclose(v.payload.state[k], u.payload.state[k], atol=1e-5)
        assert u.bytes_up == v.bytes_up


def test_only_tasks_of_one_dispatch_group_train_together(tmp_path):
    """Groups of 4 dispatches: a call with dispatches 2..9 trains {2, 3}, {4..7} and {8, 9}."""
    cfg = config(tmp_path, "fedavg", 4)
    s = prepare(cfg)
    w = ClientWorker(cfg, {"x": s.dataset.x_train, "y": s.dataset.y_train}, s.partitions, s.dataset.input_shape,
                     s.dataset.num_classes)
    seen = []
    original = w._train_together

    def spy(ps):
        seen.append([p.task.dispatch_id for p in ps])
        return original(ps)

    w._train_together = spy
    from fedray.methods.base import Assignment

    ups = w.run(s.params, [Task(d, 0, Assignment(client_id=d)) for d in range(2, 10)])
    assert seen == [[2, 3], [4, 5, 6, 7], [8, 9]]
    assert [u.dispatch_id for u in ups] == list(range(2, 10)) and all(u.error is None for u in ups)


def test_on_the_cpu_a_model_past_the_flop_limit_trains_one_by_one(tmp_path):
    """Vectorising a module that costs more than CPU_MAX_FLOPS per example is slower on the CPU
    (the LEAF CNN on 28x28 ran at 0.26x): its tasks train one by one, a small model's together."""
    from fedray.client.vectorised import CPU_MAX_FLOPS
    from fedray.methods.base import Assignment

    done = {}
    for label, channels, hidden in (("small", [4, 8], [16]), ("big", [64, 128], [256])):
        cfg = config(tmp_path, "fedavg", 4, **{"model.options": {"channels": channels, "hidden": hidden}})
        s = prepare(cfg)
        w = ClientWorker(cfg, {"x": s.dataset.x_train, "y": s.dataset.y_train}, s.partitions,
                         s.dataset.input_shape, s.dataset.num_classes)
        ups = w.run(s.params, [Task(d, 0, Assignment(client_id=d)) for d in range(4)])
        assert all(u.error is None for u in ups)
        done[label] = (w._train_flops(w.model), w.together)
    assert done["small"][0] <= CPU_MAX_FLOPS < done["big"][0], done
    assert done["small"][1] == 4 and done["big"][1] == 0, done


def test_counting_flops_on_a_read_only_array_warns_nothing():
    """A client actor's arrays are read-only views of Ray's object store: torch warned once in
    every actor when the FLOP count wrapped one without a copy."""
    import warnings

    from fedray.models import build_model
    from fedray.models.info import counted_train_flops

    x = np.zeros((2, 64), np.float32)
    x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flops = counted_train_flops(build_model("mlp", (64,), 10, options={"hidden": [8]}), x)
    assert flops == 3 * 2 * (64 * 8 + 8 * 10) - 2 * 64 * 8  # forward 2 MACs each; backward skips the input grad
