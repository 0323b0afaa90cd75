"""Chaos soak: a run on a local multi-node Ray cluster while client actors, the aggregator and
worker nodes are killed at intervals; it must complete with the model and the metrics of an
undisturbed run.

    python tools/chaos.py [CONFIG] [--set a.b=v ...] [--nodes 2] [--every 3] [--kills 12] [--seed 0]

The cluster (``ray.cluster_utils.Cluster``: a head with no CPUs for the driver and the
aggregator, ``--nodes`` worker nodes with ``--cpus`` each) runs inside this process. First the
config runs undisturbed; then it runs again while, every ``--every`` seconds, a chaos thread
kills (in turn) a random client actor's process, the aggregator's process, or a random worker
node (a new node joins a few seconds later, as with an autoscaler). Kills stop after
``--kills`` or when the run ends. The run's virtual time does not depend on wall time, so the
two runs must agree bit for bit: the script prints the kills survived, the wall-time cost
(disturbed / undisturbed) and exits 1 if the model bytes or the metrics table (wall columns
aside) differ or the run did not complete.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default=os.path.join(HERE, "..", "configs", "quickstart.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=v")
    ap.add_argument("--nodes", type=int, default=2, help="worker nodes (default 2)")
    ap.add_argument("--cpus", type=int, default=1, help="CPUs of each worker node (default 1)")
    ap.add_argument("--every", type=float, default=3.0, help="seconds between kills (default 3)")
    ap.add_argument("--kills", type=int, default=12, help="at most this many kills (default 12)")
    ap.add_argument("--seed", type=int, default=0, help="which actor / node is killed (default 0)")
    ap.add_argument("--out", default=None, help="folder of the two runs (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return ap.parse_args(argv)


class Chaos:
    """Kills, in turn, a client actor, the aggregator and a worker node of ``runner``'s run, which
    goes on in another thread (Ray starts nodes from the main thread only)."""

    KINDS = ("actor", "aggregator", "actor", "node")

    def __init__(self, runner, cluster, a):
        self.runner, self.cluster, self.a = runner, cluster, a
        self.rng = random.Random(a.seed)
        self.kills: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.result, self.failure = None, None

    def _run(self):
        try:
            self.result = self.runner.run()
        except BaseException as e:  # reported by the main thread
            self.failure = e

    def __call__(self) -> dict:
        import ray

        worker = threading.Thread(target=self._run, daemon=True)
        t0 = time.time()
        worker.start()
        while True:
            worker.join(self.a.every)
            if not worker.is_alive() or len(self.kills) >= self.a.kills:
                break
            r = self.runner
            if getattr(r, "scheduler", None) is None:  # not started yet
                continue
            kind = self.KINDS[len(self.kills) % len(self.KINDS)]
            try:
                if kind == "actor":
                    ready = [i for i, ok in enumerate(r.pool.ready) if ok]
                    pid = ray.get(r.pool.actors[self.rng.choice(ready)].pid.remote(), timeout=10)
                    os.kill(pid, signal.SIGKILL)
                elif kind == "aggregator":
                    os.kill(ray.get(r.aggregator.pid.remote(), timeout=10), signal.SIGKILL)
                else:  # a node leaves; another joins a moment later (an autoscaler's replacement)
                    node = self.rng.choice(sorted(self.cluster.worker_nodes, key=lambda n: n.unique_id))
                    self.cluster.remove_node(node)
                    time.sleep(min(2.0, self.a.every / 2))
                    self.cluster.add_node(num_cpus=self.a.cpus)
            except Exception as e:  # the target was already gone (being replaced): the next one
                self.errors.append(f"{kind}: {type(e).__name__}")
                self.kills.append((round(time.time() - t0, 2), f"missed {kind}"))
                continue
            self.kills.append((round(time.time() - t0, 2), kind))
        worker.join()
        if self.failure is not None:
            raise self.failure
        return self.result


def main(argv=None) -> int:
    a = parse(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster

    from fedray import config as C
    from fedray.metrics.recorder import WALL_COLUMNS
    from fedray.runtime.runner import Runner

    out = a.out or tempfile.mkdtemp(prefix="fedray-chaos-")
    base = C.load(a.config, a.overrides)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(a.nodes):
        cluster.add_node(num_cpus=a.cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")

    def cfg(name):
        return C.from_dict(C.to_dict(base), [f"runtime.out_dir={out}/{name}", "runtime.progress=false",
                                             f"cluster.max_aggregator_restarts={a.kills + 1}",
                                             f"cluster.actor_wait_s={max(120.0, 10 * a.every)}"])

    def table(run_dir):
        t = pq.read_table(os.path.join(run_dir, "metrics.parquet")).to_pandas()
        return t.drop(columns=[c for c in WALL_COLUMNS if c in t.columns])

    try:
        ref = Runner(cfg("undisturbed")).run()
        chaos = Chaos(Runner(cfg("chaos")), cluster, a)
        hit = chaos()
    finally:
        ray.shutdown()
        cluster.shutdown()
    same_model = hit["model_sha256"] == ref["model_sha256"]
    same_table = bool(table(hit["run_dir"]).equals(table(ref["run_dir"])))
    done = [k for k in chaos.kills if not k[1].startswith("missed")]
    result = {"kills": len(done), "by_kind": {k: sum(1 for _, x in done if x == k) for k in
                                                    ("actor", "aggregator", "node")},
              "aggregator_recoveries": hit["aggregator_recoveries"], "actor_replacements": hit["actor_replacements"],
              "status": hit["status"], "same_model": same_model, "same_metrics": same_table,
              "wall_undisturbed_s": round(ref["wall_s"], 2), "wall_chaos_s": round(hit["wall_s"], 2),
              "wall_ratio": round(hit["wall_s"] / max(ref["wall_s"], 1e-9), 3), "kill_log": chaos.kills,
              "skipped": chaos.errors, "runs": out}
    if a.json:
        print(json.dumps(result))
    else:
        print(f"kills survived: {result['kills']} ({result['by_kind']}); aggregator restored "
              f"{result['aggregator_recoveries']} times, actors replaced {result['actor_replacements']} times")
        print(f"status {hit['status']}; same model: {same_model}; same metrics: {same_table}")
        print(f"wall time: {result['wall_undisturbed_s']} s undisturbed, {result['wall_chaos_s']} s with chaos "
              f"(x{result['wall_ratio']})")
    ok = hit["status"] == "completed" and same_model and same_table
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
