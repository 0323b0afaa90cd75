"""A million registered clients in CI size: the driver stays small and a round touches only
the clients it selects (issue 14; ``tools/bench_scale.py`` runs ten million)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.ray

CHILD = textwrap.dedent("""
    import json, resource, sys, ray
    from fedray.config import load
    from fedray.runtime.runner import Runner
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    n, out = int(sys.argv[3]), sys.argv[2]
    cfg = load("configs/quickstart.yaml", ["data.name=synthetic", f"data.num_clients={n}", "model.options={}",
               "data.options={lazy: true, num_users: %d, samples_per_user: 20}" % n,
               "server.clients_per_round=100", "server.rounds=4", "server.target_accuracy=null",
               "runtime.progress=false", "runtime.tensorboard=false", f"runtime.out_dir={out}"])
    s = Runner(cfg, progress=False).run()
    print("RESULT " + json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "rounds": s["rounds"], "setup_s": s["setup_s"]}))
""")


def _driver(addr, out, n):
    p = subprocess.run([sys.executable, "-c", CHILD, addr, str(out), str(n)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "RAY_AUTH_MODE": "token"})
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, p.stderr[-3000:]
    r = json.loads(line[0][7:])
    assert r["rounds"] == 4
    return r


def test_a_million_registered_clients_fit_in_a_small_driver(ray_session, tmp_path):
    addr = ray_session.get_runtime_context().gcs_address
    small, big = _driver(addr, tmp_path / "k", 1_000), _driver(addr, tmp_path / "m", 1_000_000)
    # what the population costs, not what torch and Ray's client cost: the driver's peak was 733 MB
    # with a thousand clients and 805 MB with a million here, but 1,201 MB with a million on a CI
    # machine. A profile object per client took 2.45 GiB more at a million.
    assert big["rss_mb"] - small["rss_mb"] < 300 and big["setup_s"] < 60, (small, big)
