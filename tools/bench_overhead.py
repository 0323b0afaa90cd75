"""Overhead of fedray vs a plain PyTorch loop on workload W (foundation issue).

Runs fedray's FedAvg (Ray actors, object store, aggregator actor, virtual
clock, recorder) and the plain single-process loop of ``plain_fedavg.py`` on
the same data, in one process tree, and prints the ratio of steady-state
seconds per round (median over rounds after a warm-up; Ray start and actor
creation excluded). ``--heterogeneity`` instead compares fedray with the
tiered device population (virtual-clock bookkeeping on) against a homogeneous
one (device issue).

    python tools/bench_overhead.py                 # fedray / plain loop
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
    """(median seconds per aggregation after warm-up, final accuracy) of one fedray run."""
    import pyarrow.parquet as pq

    from fedray.config import from_dict
    from fedray.runtime.loop import Runner

    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict(cfg_dict, [f"runtime.out_dir={tmp}", "runtime.tensorboard=false"])
        s = Runner(cfg, progress=False).run()
        df = pq.read_table(os.path.join(s["run_dir"], "metrics.parquet")).to_pandas()
    wall = df[df["event"] == "aggregate"]["wall_s"].to_numpy()
    per = np.diff(wall)[warmup:]
    return float(np.median(per)), s["final_accuracy"]


def main() -> None:
    import ray

    from fedray.config import from_dict
    from plain_fedavg import plain_fedavg, workload_w

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--heterogeneity", action="store_true")
    a = ap.parse_args()
    ray.init(include_dashboard=False, logging_level="ERROR")  # started once, excluded from the timings
    base = workload_w(a.rounds, **{"cluster.num_client_actors": a.actors})
    if a.heterogeneity:
        on, acc_on = fedray_round_s({**base, "devices": {"tiers": "clamp", "link": "lognormal",
                                                         "load_sigma": 0.3, "noise_sigma": 0.2}}, a.warmup)
        off, acc_off = fedray_round_s(base, a.warmup)
        print(f"fedray FedAvg, tiered devices : {on * 1e3:7.2f} ms/round (final accuracy {acc_on:.4f})")
        print(f"fedray FedAvg, homogeneous    : {off * 1e3:7.2f} ms/round (final accuracy {acc_off:.4f})")
        print(f"ratio heterogeneity on / off  : {on / off:.3f}  (target <= 1.05)")
        return
    fed, acc_f = fedray_round_s(base, a.warmup)
    plain = plain_fedavg(from_dict(base))
    p = float(np.median(plain["round_s"][a.warmup:]))
    print(f"fedray FedAvg ({a.actors} client actors): {fed * 1e3:7.2f} ms/round (final accuracy {acc_f:.4f})")
    print(f"plain PyTorch loop           : {p * 1e3:7.2f} ms/round (final accuracy {plain['final_accuracy']:.4f})")
    print(f"ratio fedray / plain         : {fed / p:.3f}  (target <= 2.0)")


if __name__ == "__main__":
    main()
