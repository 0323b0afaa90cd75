"""An elastic client pool on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``):
``cluster.client_actors: {min: 1, max: 3}`` starts on one 1-CPU node, grows when a 2-CPU node
joins mid-run (the new actors get trainings), loses the first node mid-run (its actor is
replaced, the run goes on with the others), and ends with the model and the metrics of an
undisturbed run with a fixed pool of one actor.

The cluster runs in a subprocess so it never meets the session's shared Ray instance.
"""
from __future__ import annotations

import textwrap

import pytest

from tests.runkit import run_python

pytestmark = pytest.mark.cluster

SCRIPT = textwrap.dedent('''
    import json, sys, time
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster
    from fedray.config import from_dict
    from fedray.metrics.recorder import WALL_COLUMNS
    from fedray.runtime import pool as P, progress
    from fedray.runtime.runner import Runner

    out = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    first = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")

    def cfg(name, actors):
        return from_dict({
            "experiment": "elastic", "data": {"num_clients": 16, "cache_dir": out + "/cache"},
            "model": {"name": "mlp", "options": {"hidden": [24]}},
            "devices": {"tiers": "clamp", "reference_flops": 2e6, "dropout_prob": 0.1},
            "server": {"rounds": 30, "clients_per_round": 4, "eval_every": 5},
            "cluster": {**actors, "rounds_per_call": 1},  # one round a call: the hooks act between rounds
            "runtime": {"progress": False, "tensorboard": False, "out_dir": out + "/" + name, "flush_s": 0.1}})

    def table(run_dir):
        t = pq.read_table(run_dir + "/metrics.parquet").to_pandas()
        return t.drop(columns=[c for c in WALL_COLUMNS if c in t.columns])

    ref = Runner(cfg("fixed", {"num_client_actors": 1, "max_restarts": 0})).run()

    seen = {"ready": [], "used_after_grow": set(), "grown": False, "second": None}
    route = P.ActorPool.route

    def routed(self, key, dispatch_id):
        i = route(self, key, dispatch_id)
        if seen["grown"]:
            seen["used_after_grow"].add(i)
        return i

    P.ActorPool.route = routed
    call = progress.Progress.__call__

    def hooked(self, res, t, rnd):
        call(self, res, t, rnd)
        pool = self.run.pool
        seen["ready"].append(sum(pool.ready))
        if res["version"] == 8 and seen["second"] is None:
            seen["second"] = cluster.add_node(num_cpus=2)
            deadline = time.time() + 120
            while sum(pool.ready) < 3 and time.time() < deadline:  # the pool grows onto the new node
                pool.refresh(wait=2.0, num=3 - sum(pool.ready))
            seen["grown"] = True
        if res["version"] == 16 and first in cluster.worker_nodes:
            cluster.remove_node(first)

    progress.Progress.__call__ = hooked
    el = Runner(cfg("elastic", {"client_actors": {"min": 1, "max": 3}, "actor_wait_s": 120})).run()
    print("RESULT " + json.dumps({
        "ready": seen["ready"], "used_after_grow": sorted(seen["used_after_grow"]),
        "same_model": el["model_sha256"] == ref["model_sha256"],
        "same_table": bool(table(el["run_dir"]).equals(table(ref["run_dir"]))),
        "status": el["status"], "version": el["version"], "replaced": el["actor_replacements"],
        "second_node": seen["second"].node_id, "placement": el["placement"]}))
    ray.shutdown()
    cluster.shutdown()
''')


def test_the_pool_grows_and_shrinks_with_the_cluster_and_the_run_is_unchanged(tmp_path):
    r = run_python(["-c", SCRIPT, str(tmp_path)])
    assert r["status"] == "completed" and r["version"] == 30
    assert r["ready"][0] == 1 and max(r["ready"]) == 3  # started with one actor, grew to three
    assert {1, 2} <= set(r["used_after_grow"])  # the new node's actors trained clients
    assert r["ready"][-1] == 2 and r["replaced"] >= 1  # the lost node's actor is gone (replaced, pending)
    assert set(r["placement"]["None"]) >= {r["second_node"]}
    assert r["same_model"] and r["same_table"]
