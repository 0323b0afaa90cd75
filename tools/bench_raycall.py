"""What one Ray actor call costs on this machine, with workload W's shapes (issue 14).

An aggregator-like actor calls a client-like actor and waits, ``--reps`` times per case,
interleaved, on a fresh local Ray: the floor of every round that goes through a client actor.

- ``empty``: no arguments, one small return value (Ray's own round trip);
- ``model``: the MLP 64-128-10 model (38 KB, by value, as fedray sends small models);
- ``round``: the model down and 10 update dicts back (as 11 objects: fedray's headers + payloads).

    python tools/bench_raycall.py [--reps 1000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None) -> int:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--updates", type=int, default=10)
    a = ap.parse_args(argv)
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", num_cpus=2)

    @ray.remote
    class Client:
        def empty(self):
            return 1

        def model(self, params):
            return 1

        def round(self, params, n):
            return ([{"dispatch_id": i} for i in range(n)], *[{k: v + 1 for k, v in params.items()} for _ in range(n)])

    @ray.remote
    class Server:
        def __init__(self, client):
            self.c = client

        def time(self, case: str, reps: int, n: int) -> float:
            params = {"w1": np.zeros((64, 128), np.float32), "b1": np.zeros(128, np.float32),
                      "w2": np.zeros((128, 10), np.float32), "b2": np.zeros(10, np.float32)}
            call = {"empty": lambda: self.c.empty.remote(), "model": lambda: self.c.model.remote(params),
                    "round": lambda: self.c.round.options(num_returns=n + 1).remote(params, n)}[case]
            ray.get(call())
            t0 = time.perf_counter()
            for _ in range(reps):
                ray.get(call())
            return (time.perf_counter() - t0) / reps * 1e3

    s = Server.remote(Client.remote())
    out: dict[str, list[float]] = {"empty": [], "model": [], "round": []}
    for _ in range(3):
        for case in out:
            out[case].append(ray.get(s.time.remote(case, a.reps, a.updates)))
    for case, ms in out.items():
        print(f"{case:6s} {np.median(ms):6.3f} ms per call (median of 3 x {a.reps})")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
