"""Flower's side of ``bench_flower.py``: workload W in Flower's simulation engine.

Runs in Flower's own virtual environment (Flower pins its own Ray), started by
``bench_flower.py`` as ``python tools/_flower_side.py SPEC.json``; never imported by
fedray, its tests or CI. The data, the partition (the client index arrays), the
initial model parameters and the train settings come from the driver, which got
them from fedray's ``prepare``; the model is built by fedray's own factory and each
client trains with fedray's own ``local_train`` (both need only torch and numpy),
so only the federation machinery differs from fedray's side.

Flower's current API: ``run_simulation`` with a ``ServerApp`` (``FedAvg.start``,
``fraction_train`` = clients_per_round / num_clients, no federated evaluation,
centralised ``evaluate_fn`` on the test split after every round) and a
``ClientApp`` (``@app.train()``), on the Ray backend with one CPU per client actor.
Round ends are stamped inside ``evaluate_fn`` (Flower calls it once before the first
round and once after every round), so Ray start and actor creation are excluded.
Prints one JSON line: ``{"stamps": [...], "train_s": [...], "fit_s": [...], "accuracy": [...]}``
(per round; ``train_s``/``fit_s``: the clients' seconds in the ClientApp / in ``local_train``,
summed over the round's clients).
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

SPEC_ENV = "FEDRAY_FLOWER_SPEC"  # path of the spec JSON, read in every Ray worker too
_CACHE: dict = {}


def _state() -> dict:
    """The spec, the arrays and a model, loaded once per process (driver or client actor)."""
    if not _CACHE:
        from fedray.models.factory import build_model

        with open(os.environ[SPEC_ENV]) as f:
            spec = json.load(f)
        z = np.load(spec["arrays"])
        offsets = z["part_offsets"]
        parts = [z["part_index"][offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        torch.set_num_threads(spec["torch_threads"])
        model = build_model(spec["model"], tuple(spec["input_shape"]), spec["num_classes"],
                            options=spec["model_options"])
        _CACHE.update(spec=spec, x_train=z["x_train"], y_train=z["y_train"],
                      x_test=torch.from_numpy(z["x_test"]), y_test=torch.from_numpy(z["y_test"]),
                      parts=parts, init={k[2:]: z[k] for k in z.files if k.startswith("p:")},
                      model=model, train=SimpleNamespace(**spec["train"]))
    return _CACHE


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One client's local epoch with fedray's ``local_train``, timed; replies the weights."""
    from fedray import seeding
    from fedray.client.trainer import local_train

    st = _state()
    t0 = time.perf_counter()
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    params = {k: v.numpy() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
    idx = st["parts"][pid]
    model = st["model"]
    t1 = time.perf_counter()
    local_train(model, params, st["x_train"], st["y_train"], idx, st["train"],
                seed=seeding.derive(st["spec"]["seed"], "train", rnd, pid))
    t2 = time.perf_counter()
    arrays = ArrayRecord(model.state_dict())
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({
        "num-examples": len(idx), "fit-s": t2 - t1, "train-s": time.perf_counter() - t0})})
    return Message(content=content, reply_to=msg)


server_app = ServerApp()
STAMPS: list[float] = []  # perf_counter at each evaluate_fn call (round 0 = before round 1)
TRAIN_S: list[float] = []  # per round: the clients' seconds in ``train``, summed over the clients
FIT_S: list[float] = []  # per round: of which in ``local_train``, summed over the clients
ACC: list[float] = []


def _sum_train_s(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    s = {k: float(sum(r["metrics"][k] for r in records)) for k in ("train-s", "fit-s")}
    TRAIN_S.append(s["train-s"])
    FIT_S.append(s["fit-s"])
    return MetricRecord(s)


def _evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    st = _state()
    model = st["model"]
    model.load_state_dict(arrays.to_torch_state_dict())
    with torch.no_grad():
        acc = float((model(st["x_test"]).argmax(1) == st["y_test"]).float().mean())
    model.train()
    ACC.append(acc)
    STAMPS.append(time.perf_counter())
    return MetricRecord({"accuracy": acc})


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    st = _state()
    spec = st["spec"]
    random.seed(spec["seed"])  # FedAvg samples nodes with ``random.sample``
    strategy = FedAvg(fraction_train=spec["clients_per_round"] / spec["num_clients"], fraction_evaluate=0.0,
                      min_train_nodes=spec["clients_per_round"], min_available_nodes=spec["num_clients"],
                      train_metrics_aggr_fn=_sum_train_s)
    initial = ArrayRecord({k: torch.from_numpy(v) for k, v in st["init"].items()})
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=spec["rounds"], evaluate_fn=_evaluate)


def run(spec_path: str) -> dict:
    from flwr.simulation import run_simulation

    os.environ[SPEC_ENV] = os.path.abspath(spec_path)
    spec = _state()["spec"]
    actors = spec["actors"]
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=spec["num_clients"],
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": actors, "num_gpus": 0, "address": "local",
                                      "logging_level": logging.ERROR, "log_to_driver": False}})
    if len(TRAIN_S) != spec["rounds"]:  # Flower logs a failing ClientApp and goes on without its reply
        raise SystemExit(f"only {len(TRAIN_S)} of {spec['rounds']} rounds got training replies (see the log)")
    return {"stamps": STAMPS, "train_s": TRAIN_S, "fit_s": FIT_S, "accuracy": ACC}


if __name__ == "__main__":
    # Import this file as the module ``_flower_side`` (its folder is sys.path[0], which Flower
    # hands to the Ray workers), so the apps pickle by reference and each client actor keeps its
    # data and model in this module's cache instead of receiving them with every message.
    import _flower_side

    out = _flower_side.run(sys.argv[1])
    print("FLOWER_RESULT " + json.dumps(out), flush=True)
