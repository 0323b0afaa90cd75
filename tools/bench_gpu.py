"""The GPU benchmark (issue 14): vectorised vs one-by-one client training, 100 clients per round.

One short, prepared script; on a machine with a GPU it takes a few minutes. Without one it
runs the same steps on the CPU, smaller, and says so (a smoke run, not the benchmark).

1. Agreement: one call of 10 CNN clients trained together on the device vs one by one
   (largest coordinate difference of the updates).
2. One client actor's call of 100 tasks (what ``train_many`` does: prepare, train, finalize,
   encode), one by one vs trained together, interleaved repetitions, medians:
   the CNN on digits (100 IID clients, batch 16, SGD lr 0.05, 1 local epoch) and VGG-11 with
   batch norm on CIFAR-shaped random data (100 clients x 50 images, 3x32x32).
3. End to end: ``fedray run`` FedAvg, CNN, 100 clients per round, ``runtime.device: auto``,
   2 client actors with half a GPU each, ``train.vectorise`` 1, 50 and 100: seconds per round
   (the aggregator's completion stamps, after the first two rounds: one per actor warms up).
4. PR-FL's published setup on VGG-11 (``configs/experiments/prfl_paper.yaml`` unchanged but for
   ``data.name=mnist_5k --set model.name=vgg11``, ``runtime.device: auto``): PR-FL and FedAsync,
   seed 0, to a virtual-time budget (``--prfl-budget``; 20 s on the CPU): wall seconds per
   aggregation, accuracy and time to target of each.

    python tools/bench_gpu.py                   # everything (GPU: a few minutes)
    python tools/bench_gpu.py --skip-run        # steps 1-2 only (no Ray)
    python tools/bench_gpu.py --only-prfl       # step 4 only
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def cifar_like(clients: int, per_client: int, seed: int = 0):
    """``(x, y, partitions, input_shape, classes)``: random 3x32x32 images, 10 classes."""
    from fedray.data.partition import partition

    rng = np.random.default_rng(seed)
    n = clients * per_client
    x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x, y, partition(y, clients, "iid", seed=seed), (3, 32, 32), 10


def worker_bench(device: str, gpu: bool, reps: int, group: int) -> None:
    from bench_vmap import MODELS, measure, tasks_for, workers

    print("\n== 1. agreement (10 CNN clients, trained together vs one by one, on the device)")
    one, vec, params = workers("cnn", 10, device=device)
    r = measure(one, vec, params, tasks_for(10, 100), 1)
    print(f"max |dw| {r['diff']:.2e}, max |dloss| {r['dloss']:.2e}")
    print(f"\n== 2. one call of 100 clients (median of {reps} interleaved repetitions)")
    print(f"{'model':28} {'one-by-one':>11} {'vectorised':>11} {'speedup':>8} {'max |dw|':>9}")
    vgg_width, per_client = (1.0, 50) if gpu else (0.125, 16)
    MODELS["vgg11"] = {"batch_norm": True, "width": vgg_width}
    cases = [("cnn", "cnn 32-64-128, digits", None),
             ("vgg11", f"vgg11 bn x{vgg_width:g}, {per_client} img/client", cifar_like(100, per_client))]
    for model, label, data in cases:
        t0 = time.perf_counter()
        try:
            one, vec, params = workers(model, group, device=device, data=data)
            r = measure(one, vec, params, tasks_for(100, 100), reps)
        except RuntimeError as e:  # out of memory on a small GPU: say so, go on
            print(f"{label:28} failed: {str(e).splitlines()[0]} (try --group 25)")
            continue
        print(f"{label:28} {r['one'] * 1e3:8.1f} ms {r['vec'] * 1e3:8.1f} ms {r['speedup']:7.2f}x "
              f"{r['diff']:9.2e}   ({time.perf_counter() - t0:.0f} s)", flush=True)
        del one, vec
        _free(device)


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_bench(gpu: bool, rounds: int) -> None:
    import pyarrow.parquet as pq
    import ray

    from fedray.config import from_dict
    from fedray.runtime.runner import Runner
    from plain_fedavg import workload_w

    print(f"\n== 3. fedray run: FedAvg, CNN, 100 clients per round, {rounds} rounds, 2 client actors"
          + (" with 0.5 GPU each" if gpu else " (CPU)"))
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    for v in (1, 50, 100):  # one by one; two groups (one per actor); one group per round
        with tempfile.TemporaryDirectory() as tmp:
            over = {"model.name": "cnn", "server.clients_per_round": 100, "server.eval_every": rounds,
                    "train.vectorise": v, "runtime.device": "auto", "runtime.tensorboard": False,
                    "runtime.out_dir": tmp, "cluster.num_client_actors": 2,
                    "cluster.client_actor.num_gpus": 0.5 if gpu else 0.0,
                    "data.cache_dir": os.path.join(tempfile.gettempdir(), "fedray_bench_cache")}
            t0 = time.perf_counter()
            s = Runner(from_dict(workload_w(rounds, **over)), progress=False).run()
            df = pq.read_table(os.path.join(s["run_dir"], "metrics.parquet")).to_pandas()
        wall = df[df["event"] == "aggregate"]["wall_s"].to_numpy()
        per = (wall[-1] - wall[1]) / max(len(wall) - 2, 1)  # each actor's first call warms torch.func up
        print(f"train.vectorise {v:3d}: {per * 1e3:8.1f} ms/round after the second, final accuracy "
              f"{s['final_accuracy']:.4f} ({time.perf_counter() - t0:.0f} s in all)", flush=True)
    ray.shutdown()


def prfl_plan(gpu: bool, budget: float, out: str):
    """Step 4's compare plan: ``prfl_paper.yaml`` on mnist_5k and VGG-11, PR-FL and FedAsync, seed 0."""
    from fedray import comparison

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sets = ["data.name=mnist_5k", "model.name=vgg11", "runtime.device=auto", f"server.max_virtual_s={budget}",
            "compare.methods=[{name: prfl, interval_s: 1.0}, {name: fedasync, alpha: 0.6}]", "compare.seeds=[0]",
            f"cluster.client_actor.num_gpus={0.5 if gpu else 0.0}", "runtime.tensorboard=false"]
    sets += [] if gpu else ["server.eval_every=1"]  # the smoke run's few aggregations are all evaluated
    return comparison.plan(os.path.join(root, "configs", "experiments", "prfl_paper.yaml"), sets, out=out)


def prfl_bench(gpu: bool, budget: float) -> None:
    from fedray import comparison

    print(f"\n== 4. PR-FL's published setup on VGG-11 (mnist_5k 28x28, 10 clients), seed 0, {budget:g} virtual s"
          + (", 2 client actors with 0.5 GPU each" if gpu else " (CPU)"))
    with tempfile.TemporaryDirectory() as tmp:
        res = comparison.run(prfl_plan(gpu, budget, tmp), progress=False)
    for s in res["summaries"]:
        per = s["wall_s"] / max(s["version"], 1)
        tta = s.get("time_to_target_s")
        print(f"{s['method']:9} {s['version']:5d} aggregations, {per * 1e3:8.1f} ms wall each, {s['wall_s']:6.0f} s in all; "
              f"accuracy {s['final_accuracy']:.4f}, time to {s.get('target_accuracy')}: "
              f"{'not reached' if tta is None else f'{tta:.1f} virtual s'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--group", type=int, default=100, help="clients trained together at most (a small GPU: 25)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--skip-run", action="store_true", help="no end-to-end fedray run (no Ray)")
    ap.add_argument("--only-prfl", action="store_true", help="only step 4 (PR-FL's setup on VGG-11)")
    ap.add_argument("--prfl-budget", type=float, default=None,
                    help="virtual seconds of step 4 (default: 600 with a GPU, 20 without)")
    a = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    t0 = time.perf_counter()
    if gpu:
        p = torch.cuda.get_device_properties(0)
        print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
    else:
        print(f"no GPU here: running the same steps on the CPU, smaller (a smoke run, not the GPU benchmark); "
              f"torch {torch.__version__}")
    device = "cuda" if gpu else "cpu"
    if not a.only_prfl:
        worker_bench(device, gpu, a.reps, a.group)
    if not a.skip_run and not a.only_prfl:
        run_bench(gpu, a.rounds)
    if not a.skip_run:
        prfl_bench(gpu, a.prfl_budget if a.prfl_budget is not None else (600.0 if gpu else 20.0))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
