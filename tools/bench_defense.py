"""What the defence stage costs the aggregator, against the aggregation it guards.

Builds VGG-11's CIFAR state dict (about 9.2 M float32 parameters; ``--model mlp`` for the
quickstart's) and K dense client updates (trained values, as FedAvg sends them), then times in
one process, interleaved, ``--reps`` times (medians):

- ``aggregate``: :func:`fedray.aggregation.rules.weighted_mean` of the K updates (the FedAvg
  step the defences sit around);
- ``guard``: the default norm guard (:meth:`Defense.screen` with the default ``defense:``);
- ``clip``: ``defense.clip: adaptive`` (the updates stacked, clipped and written back);
- ``median`` / ``trimmed_mean`` / ``multi_krum``: :meth:`Defense.combine` with the rule.

Each is printed with its ratio to ``aggregate`` from the same run.

    python tools/bench_defense.py [--model vgg11|mlp] [--k 10] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def build(model: str, k: int, seed: int = 0):
    import torch

    from fedray.aggregation.accumulate import Contribution
    from fedray.methods.base import Entry
    from fedray.models import build_model
    from fedray.update import Update

    torch.manual_seed(seed)
    net = build_model("vgg11", (3, 32, 32), 10) if model == "vgg11" else build_model("mlp", (64,), 10,
                                                                                          options={"hidden": [128]})
    params = {n: t.detach().numpy().copy() for n, t in net.state_dict().items()}
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(k):
        vals = {n: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) if np.issubdtype(v.dtype, np.floating)
                else v.copy() for n, v in params.items()}
        mask = {n: np.ones(v.shape, bool) for n, v in params.items()}
        entries.append(Entry(Update(dispatch_id=i, client_id=i, base_version=0, num_examples=10, kind="model"),
                             Contribution(vals, mask, 10.0)))
    return params, entries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("vgg11", "mlp"), default="vgg11")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    from fedray.aggregation import rules
    from fedray.aggregation.defense import Defense
    from fedray.config import from_dict
    from fedray.methods import registry
    from fedray.methods.base import ServerContext

    params, entries = build(args.model, args.k)

    def defense(**over):
        cfg = from_dict({"data": {"num_clients": 100}, "server": {"clients_per_round": args.k}},
                        [f"defense.{k}={v}" for k, v in over.items()])
        server = registry.get("fedavg").Server(ServerContext(cfg, "fedavg", cfg.method.params, None, 100))
        return Defense(cfg, server)

    paths = {
        "aggregate": lambda: rules.weighted_mean(params, [e.contribution for e in entries]),
        "guard": lambda: defense().screen(params, entries, 0),
        "clip": lambda: defense(clip="adaptive").screen(params, entries, 0),
        "median": lambda: defense(rule="median").combine(params, entries, 0),
        "trimmed_mean": lambda: defense(rule="trimmed_mean", beta=0.2).combine(params, entries, 0),
        "multi_krum": lambda: defense(rule="multi_krum", f=2).combine(params, entries, 0),
    }
    times = {k: [] for k in paths}
    for _ in range(args.reps):
        for name, fn in paths.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    n = sum(v.size for v in params.values())
    base = statistics.median(times["aggregate"])
    print(f"{args.model}: {n / 1e6:.2f} M parameters, K = {args.k} updates, median of {args.reps}")
    print("| path | seconds | x aggregate |")
    print("|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.3f} | {m / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
