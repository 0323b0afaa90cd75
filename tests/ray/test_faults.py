"""A run survives a client actor that dies mid-round: Ray restarts it, the training call is retried,
and since training is a pure function of its inputs the result equals an undisturbed run."""
from __future__ import annotations

import os
import signal

import pytest
import ray

from fedray.config import from_dict
from fedray.runtime.runner import Runner, run

pytestmark = pytest.mark.ray


def cfg(tmp_path, name):
    return from_dict({"experiment": name, "data": {"num_clients": 20, "cache_dir": str(tmp_path / "c")},
                      "server": {"rounds": 5, "clients_per_round": 6, "eval_every": 5},
                      "cluster": {"num_client_actors": 2},
                      "runtime": {"progress": False, "tensorboard": False, "out_dir": str(tmp_path)}})


@ray.remote
def _pid_of(actor):
    return ray.get(actor.pid.remote())


class CrashingRunner(Runner):
    """Kills the process of client actor 0 right after the third dispatch batch went out."""

    calls = 0

    def _start(self):
        super()._start()
        groups = self.dispatcher.groups

        def crashing(recs):
            out = groups(recs)
            CrashingRunner.calls += 1
            if CrashingRunner.calls == 3:
                actor = next(iter(self.pools.values()))[0]
                os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
            return out

        self.dispatcher.groups = crashing


def test_crashed_actor_is_restarted_and_run_is_unchanged(ray_session, tmp_path):
    ref = run(cfg(tmp_path, "ref"))
    crashed = CrashingRunner(cfg(tmp_path, "crash")).run()
    assert crashed["rounds"] == 5
    assert crashed["model_sha256"] == ref["model_sha256"]
    assert crashed["dropped"] == 0
