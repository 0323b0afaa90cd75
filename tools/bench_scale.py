"""Registered clients vs cost: setup, seconds per round and the driver's peak memory (issue 14).

FedAvg on lazy FedProx synthetic data (``data.options.lazy: true``: every user's examples
are generated when a client trains them; 20 examples a user, 60 features, the quickstart's
MLP), ``--per-round`` clients a round, ``--rounds`` rounds, 2 client actors. Each population
size runs in its own process (so its peak RSS is its own), the sizes interleaved ``--reps``
times; printed per size: ``setup_s`` (data, partition, population, Ray actors: the run's
``setup_s``), steady seconds per round (the aggregator's completion stamps after
``--warmup`` rounds, as ``bench_overhead.py``), the driver's peak RSS, and the ratio of each
size's seconds per round to the smallest size's (medians over the repetitions).

    python tools/bench_scale.py                              # 1,000 and 10,000,000 clients
    python tools/bench_scale.py --sizes 1000 1000000 --rounds 20
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def child(n: int, per_round: int, rounds: int, warmup: int) -> dict:
    import pyarrow.parquet as pq
    import ray

    from fedray.config import load
    from fedray.runtime.runner import Runner

    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load("configs/quickstart.yaml", [
            "data.name=synthetic", f"data.num_clients={n}", "model.options={}",
            "data.options={lazy: true, num_users: %d, samples_per_user: 20}" % n,
            f"server.clients_per_round={per_round}", f"server.rounds={rounds}", "server.target_accuracy=null",
            "runtime.progress=false", "runtime.tensorboard=false", f"runtime.out_dir={tmp}",
            f"data.cache_dir={tmp}/cache"])
        s = Runner(cfg, progress=False).run()
        df = pq.read_table(os.path.join(s["run_dir"], "metrics.parquet")).to_pandas()
    wall = df[df["event"] == "aggregate"]["wall_s"].to_numpy()
    return {"n": n, "setup_s": s["setup_s"], "round_s": float((wall[-1] - wall[warmup]) / (len(wall) - 1 - warmup)),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "accuracy": s["final_accuracy"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000_000])
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print("RESULT " + json.dumps(child(a.child, a.per_round, a.rounds, a.warmup)))
        return 0
    runs: dict[int, list[dict]] = {n: [] for n in a.sizes}
    for rep in range(a.reps):
        for n in a.sizes:
            t = time.time()
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--per-round", str(a.per_round),
                                  "--rounds", str(a.rounds), "--warmup", str(a.warmup)],
                                 capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "token"})
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                return 1
            r = json.loads(line[0][7:])
            runs[n].append(r)
            print(f"  rep {rep + 1} {n:>11,} clients: setup {r['setup_s']:6.2f} s, {r['round_s'] * 1e3:7.1f} ms/round, "
                  f"peak RSS {r['rss_mb']:7.0f} MB, accuracy {r['accuracy']:.3f} ({time.time() - t:.0f} s)", flush=True)

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])

    base = med([r["round_s"] for r in runs[a.sizes[0]]])
    for n in a.sizes:
        rs = med([r["round_s"] for r in runs[n]])
        print(f"{n:>11,} registered: setup {med([r['setup_s'] for r in runs[n]]):6.2f} s, {rs * 1e3:7.1f} ms/round "
              f"(x{rs / base:.3f} of {a.sizes[0]:,}), driver peak RSS {max(r['rss_mb'] for r in runs[n]):7.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
