"""Resource-constrained placement on a real two-node Ray cluster (``ray.cluster_utils.Cluster``).

The cluster runs in a subprocess so it never meets the session's shared Ray instance.
"""
from __future__ import annotations

import textwrap

import pytest

from tests.runkit import run_python

pytestmark = pytest.mark.cluster

SCRIPT = textwrap.dedent('''
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from fedray.config import from_dict
    from fedray.runtime.runner import run

    out_dir = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    edge = cluster.add_node(num_cpus=2, resources={"device:edge": 4})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    cfg = from_dict({
        "experiment": "placement",
        "data": {"num_clients": 20, "cache_dir": out_dir + "/cache"},
        "devices": {"actor_per_tier": True, "placement": "pack", "tiers": [
            {"name": "edge", "fraction": 0.5, "speed_range": [0.3, 0.6], "resources": {"device:edge": 1},
             "num_cpus": 0.5},
            {"name": "server", "fraction": 0.5, "speed_range": [1.0, 2.0], "num_cpus": 0.5}]},
        "cluster": {"num_client_actors": 4},
        "server": {"rounds": 3, "clients_per_round": 6, "eval_every": 3},
        "runtime": {"progress": False, "tensorboard": False, "out_dir": out_dir}})
    s = run(cfg)
    print("RESULT " + json.dumps({"placement": s["placement"], "edge_node": edge.node_id,
                                  "rounds": s["rounds"], "accuracy": s["final_accuracy"],
                                  "tiers": s["participation_by_tier"]}))
    ray.shutdown()
    cluster.shutdown()
''')


def test_edge_clients_only_on_the_edge_node(tmp_path):
    r = run_python(["-c", SCRIPT, str(tmp_path)], timeout=300)
    assert r["rounds"] == 3 and 0 <= r["accuracy"] <= 1
    assert set(r["placement"]["edge"]) == {r["edge_node"]}  # edge actors only where device:edge exists
    assert r["tiers"]["edge"]["aggregated"] > 0 and r["tiers"]["server"]["aggregated"] > 0
