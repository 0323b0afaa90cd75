"""Overhead of fedray vs a plain PyTorch loop on workload W (foundation issue).

Runs fedray's FedAvg (Ray actors, object store, aggregator actor, virtual
clock, recorder) and the plain single-process loop of ``plain_fedavg.py`` on
the same data, in one process tree, and prints the ratio of steady-state
seconds per round (mean over the rounds after a warm-up: wall time from the end
of the warm-up to the end of the run, divided by the rounds; Ray start and actor
creation excluded). fedray's round times are the aggregator's own completion
stamps (``wall_s`` of the ``aggregate`` events). ``--heterogeneity`` instead
compares fedray with the tiered device population (virtual-clock bookkeeping on)
against a homogeneous one (device issue).

    python tools/bench_overhead.py                 # fedray / plain loop
    python tools/bench_overhead.py --actors 0      # the same, the aggregator training the clients
    python tools/bench_overhead.py --heterogeneity # tiered / homogeneous
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def fedray_round_s(cfg_dict: dict, warmup: int) -> tuple[float, float]:
    """(mean seconds per aggregation after warm-up, final accuracy) of one fedray run."""
    import pyarrow.parquet as pq

    from fedray.config import from_dict
    from fedray.runtime.runner import Runner

    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict(cfg_dict, [f"runtime.out_dir={tmp}", "runtime.tensorboard=false"])
        s = Runner(cfg, progress=False).run()
        df = pq.read_table(os.path.join(s["run_dir"], "metrics.parquet")).to_pandas()
    wall = df[df["event"] == "aggregate"]["wall_s"].to_numpy()
    return float((wall[-1] - wall[warmup]) / (len(wall) - 1 - warmup)), s["final_accuracy"]


def main() -> None:
    import ray

    from fedray.config import from_dict
    from plain_fedavg import plain_fedavg, workload_w

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--actors", type=int, default=2, help="client actors (0: the aggregator trains, no Ray call per round)")
    ap.add_argument("--heterogeneity", action="store_true")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians)")
    a = ap.parse_args()
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")  # started once, excluded from the timings
    base = workload_w(a.rounds, **{"cluster.num_client_actors": a.actors})
    hetero = {**base, "devices": {"tiers": "clamp", "link": "lognormal", "load_sigma": 0.3, "noise_sigma": 0.2}}
    rows = []
    for _ in range(a.reps):  # interleaved, so both sides see the same machine conditions
        if a.heterogeneity:
            on, acc_a = fedray_round_s(hetero, a.warmup)
            off, acc_b = fedray_round_s(base, a.warmup)
        else:
            on, acc_a = fedray_round_s(base, a.warmup)
            plain = plain_fedavg(from_dict(base))
            off, acc_b = float(np.mean(plain["round_s"][a.warmup + 1:])), plain["final_accuracy"]
        rows.append((on, off, on / off))
        print(f"  rep {len(rows)}: {on * 1e3:7.2f} vs {off * 1e3:7.2f} ms/round, ratio {on / off:.3f}", flush=True)
    on, off, ratio = (float(np.median([r[i] for r in rows])) for i in range(3))
    if a.heterogeneity:
        print(f"fedray FedAvg, tiered devices : {on * 1e3:7.2f} ms/round (final accuracy {acc_a:.4f})")
        print(f"fedray FedAvg, homogeneous    : {off * 1e3:7.2f} ms/round (final accuracy {acc_b:.4f})")
        print(f"ratio heterogeneity on / off  : {ratio:.3f}  (median of {a.reps}; target <= 1.05)")
    else:
        print(f"fedray FedAvg ({a.actors} client actors): {on * 1e3:7.2f} ms/round (final accuracy {acc_a:.4f})")
        print(f"plain PyTorch loop           : {off * 1e3:7.2f} ms/round (final accuracy {acc_b:.4f})")
        print(f"ratio fedray / plain         : {ratio:.3f}  (median of {a.reps}; target <= 2.0)")


if __name__ == "__main__":
    main()
