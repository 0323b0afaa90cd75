"""Vectorised vs one-by-one local training: what one client actor's call costs (issue 14).

One call of K tasks (K clients of workload W: digits, 100 IID clients, batch 16, SGD lr 0.05,
1 local epoch) through :class:`fedray.client.worker.ClientWorker` -- prepare, train,
finalize and encode every update, as a client actor does -- once with ``train.vectorise: 1``
(one by one) and once with the K dispatches in one group (trained together). The two sides
alternate in one process, so both see the same machine; the speedup is the median of the
per-repetition ratios. The updates of the two sides are compared too (largest difference of
any coordinate, and of the training loss).

    python tools/bench_vmap.py                          # mlp and cnn, 10 / 50 / 100 clients
    python tools/bench_vmap.py --models cnn --clients 100 --reps 9
    python tools/bench_vmap.py --models leaf_cnn --data mnist_5k --clients 10 --threads 2 \
        --train batch_size=32 local_epochs=2 --force   # the mnist_5k reproductions' client work
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODELS = {"mlp": {"hidden": [128]}, "cnn": {"channels": [32, 64], "hidden": [128]},
          "vgg11": {"batch_norm": True, "width": 0.25}, "leaf_cnn": {}}


def workers(model: str, group: int, *, device: str = "cpu", data=None, num_clients: int = 100, cache=None,
            train: dict | None = None, data_name: str = "digits", threads: int = 1,
            options: dict | None = None):
    """``(one-by-one worker, vectorised worker, setup-like (params, partitions))`` for ``model`` on
    workload W's data (or ``data = (x, y, partitions, input_shape, num_classes)``)."""
    from fedray.client.worker import ClientWorker
    from fedray.config import from_dict
    from plain_fedavg import workload_w

    def cfg(v):
        over = {"model.name": model, "model.options": options if options is not None else MODELS.get(model, {}),
                "train.vectorise": v,
                "runtime.device": device, "data.num_clients": num_clients, "data.name": data_name,
                "cluster.torch_threads": threads,
                "data.cache_dir": cache or os.path.join(tempfile.gettempdir(), "fedray_bench_cache")}
        over.update({f"train.{k}": v2 for k, v2 in (train or {}).items()})
        if data is not None:
            over["data.name"] = "digits"  # only the worker's shapes come from the given arrays
        return from_dict(workload_w(1, **over))

    one, vec = cfg(1), cfg(group)
    if data is None:
        from fedray.runtime.setup import prepare

        s = prepare(one)
        x, y, parts = s.dataset.x_train, s.dataset.y_train, s.partitions
        shape, classes = s.dataset.input_shape, s.dataset.num_classes
    else:
        x, y, parts, shape, classes = data
    a = ClientWorker(one, {"x": x, "y": y}, parts, shape, classes)
    b = ClientWorker(vec, {"x": x, "y": y}, parts, shape, classes)
    from fedray.client.trainer import get_params

    return a, b, get_params(a.model)


def tasks_for(k: int, num_clients: int, seed: int = 0):
    """K tasks of one round: dispatches 0..K-1 for a seeded sample of K clients."""
    from fedray.client.worker import Task
    from fedray.methods.base import Assignment

    clients = np.sort(np.random.default_rng(seed).choice(num_clients, size=k, replace=False))
    return [Task(d, 0, Assignment(client_id=int(c))) for d, c in enumerate(clients)]


def difference(a, b, shapes) -> tuple[float, float]:
    """Largest |coordinate| and |train loss| difference between two calls' updates."""
    from fedray.submodel.encode import decode

    worst, loss = 0.0, 0.0
    for u, v in zip(a, b):
        assert u.error is None and v.error is None, (u.error, v.error)
        assert u.steps == v.steps
        x, _ = decode(u.payload, shapes)
        y, _ = decode(v.payload, shapes)
        worst = max(worst, max(float(np.abs(x[k] - y[k]).max()) for k in x))
        loss = max(loss, abs(u.train_loss - v.train_loss))
    return worst, loss


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure(one, vec, params, tasks, reps: int) -> dict:
    """Interleaved timings of one call each way: medians (seconds) and the median ratio."""
    shapes = {k: v.shape for k, v in params.items()}
    a = one.run(params, tasks)  # warm-up (and the updates compared)
    b = vec.run(params, tasks)
    diff, dloss = difference(a, b, shapes)
    t_one, t_vec = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        one.run(params, tasks)
        sync(one.device)
        t1 = time.perf_counter()
        vec.run(params, tasks)
        sync(vec.device)
        t2 = time.perf_counter()
        t_one.append(t1 - t0)
        t_vec.append(t2 - t1)
    ratios = np.array(t_one) / np.array(t_vec)
    return {"one": float(np.median(t_one)), "vec": float(np.median(t_vec)), "speedup": float(np.median(ratios)),
            "diff": diff, "dloss": dloss}


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=list(MODELS))
    ap.add_argument("--clients", nargs="+", type=int, default=[10, 50, 100])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default="digits", choices=["digits", "mnist_5k"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (cluster.torch_threads)")
    ap.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE",
                    help="train.* overrides, e.g. batch_size=32 local_epochs=2")
    ap.add_argument("--options", type=yaml.safe_load, default=None, metavar="YAML",
                    help="model options instead of the table's, e.g. '{width: 0.25}'")
    ap.add_argument("--force", action="store_true",
                    help="vectorise past fedray.client.vectorised.CPU_MAX_FLOPS too (what the limit avoids)")
    a = ap.parse_args()
    import torch

    if a.force:
        import fedray.client.worker

        fedray.client.worker.CPU_MAX_FLOPS = float("inf")

    train = {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in a.train)}
    for model in a.models:
        one, vec, params = workers(model, max(a.clients), device=a.device, train=train, data_name=a.data,
                                   threads=a.threads, options=a.options)
        if model == a.models[0]:
            print(f"torch {torch.__version__}, {a.device}, {torch.get_num_threads()} torch thread(s) per worker, "
                  f"{a.data}, train {train or 'as workload W'}; "
                  f"one call of K tasks, median of {a.reps} interleaved repetitions")
            print(f"{'model':6} {'clients':>7} {'one-by-one':>11} {'vectorised':>11} {'speedup':>8} {'max |dw|':>9} "
                  f"{'max |dloss|':>11}")
        for k in a.clients:
            r = measure(one, vec, params, tasks_for(k, 100), a.reps)
            print(f"{model:6} {k:7d} {r['one'] * 1e3:8.1f} ms {r['vec'] * 1e3:8.1f} ms {r['speedup']:7.2f}x "
                  f"{r['diff']:9.2e} {r['dloss']:11.2e}", flush=True)


if __name__ == "__main__":
    main()
