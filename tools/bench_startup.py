"""Fixed cost of one run: a 6-round FedAvg run on digits (20 clients, 5 a round, 2 client actors),
repeated in one process on an already started Ray, as every run of a ``fedray compare`` sweep or of
the test suite pays it. Prints per repetition the whole ``run()`` call, its setup (actor processes
started, model and data sent) and its wall time (the rounds, whose first call warms the actors up).

    python tools/bench_startup.py            # 5 repetitions after one warm-up
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    import ray

    from fedray.config import from_dict
    from fedray.runtime.runner import run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.reps + 1):
            cfg = from_dict({"experiment": "startup", "data": {"num_clients": 20, "cache_dir": f"{tmp}/cache"},
                             "server": {"rounds": 6, "clients_per_round": 5, "eval_every": 2},
                             "cluster": {"num_client_actors": 2},
                             "runtime": {"progress": False, "tensorboard": False, "out_dir": f"{tmp}/runs{i}"}})
            t0 = time.time()
            s = run(cfg)
            total = time.time() - t0
            if i:  # the first one also imports fedray's modules in this process
                rows.append((total, s["setup_s"], s["wall_s"]))
                print(f"  rep {i}: run {total:.2f} s (setup {s['setup_s']:.2f} s, rounds {s['wall_s']:.2f} s)", flush=True)
    med = [statistics.median(r[k] for r in rows) for k in range(3)]
    print(f"6-round run: {med[0]:.2f} s (setup {med[1]:.2f} s, rounds {med[2]:.2f} s), median of {a.reps}")


if __name__ == "__main__":
    main()
