"""Heterogeneous devices at run time: stragglers and deadlines, real throttling."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from fedray.client.actor import ClientActor, Task, train_call
from fedray.config import from_dict
from fedray.methods.base import Assignment
from fedray.runtime.runner import run
from fedray.runtime.setup import prepare

pytestmark = pytest.mark.ray


def tiered(tmp_path, method, **over):
    base = {"experiment": "tiers", "method": {"name": method},
            "data": {"num_clients": 50, "cache_dir": str(tmp_path / "cache")},
            "devices": {"tiers": "clamp", "link": "lognormal", "reference_flops": 2e6},
            "server": {"rounds": 8, "clients_per_round": 10, "eval_every": 4},
            "runtime": {"progress": False, "tensorboard": False, "out_dir": str(tmp_path / "runs")}}
    return from_dict(base, [f"{k}={v}" for k, v in over.items()])


def test_deadline_fedavg_excludes_stragglers(ray_session, tmp_path):
    plain = run(tiered(tmp_path, "fedavg"))
    dead = run(tiered(tmp_path, "fedavg_deadline"))
    assert plain["sdir"] == 1.0
    assert dead["sdir"] < 1.0 and dead["late"] > 0
    assert dead["virtual_s"] / dead["rounds"] < plain["virtual_s"] / plain["rounds"]
    # the synchronous round lasts as long as its slowest client
    t = pq.read_table(f"{plain['run_dir']}/metrics.parquet").to_pandas()
    ups = t[t.event == "update"]
    agg = t[t.event == "aggregate"].virtual_s.to_numpy()
    ends = ups.groupby("round").virtual_s.max().to_numpy()
    assert np.allclose(agg, ends)
    by_tier = plain["participation_by_tier"]
    assert set(by_tier) == {"very_slow", "normal", "very_fast"}


def test_real_throttling_slows_a_quarter_speed_device_about_4x(ray_session, tmp_path):
    """Same work, alternating a 1x and a 0.25x device on one actor so both see the same machine."""
    cfg = from_dict({"data": {"num_clients": 10, "cache_dir": str(tmp_path)},
                     "model": {"name": "cnn", "options": {"channels": [16, 32], "hidden": 64}},
                     "devices": {"mode": "real"}, "train": {"local_steps": 60, "batch_size": 64}})
    s = prepare(cfg)
    ds = s.dataset
    shared = [ray.put({"x": ds.x_train, "y": ds.y_train}), ray.put(s.partitions)]
    actor = ClientActor.remote(cfg, ds.input_shape, ds.num_classes)
    params = ray.put(s.params)
    ray.get(train_call(actor, params, [Task(100, 0, Assignment(0))], shared))  # warm-up
    tasks = [Task(i, 0, Assignment(0), speed=1.0 if i % 2 == 0 else 0.25) for i in range(10)]
    out = ray.get(train_call(actor, params, tasks, shared)[0])
    assert all(h.error is None for h in out)
    # median over adjacent (1x, 0.25x) pairs: one pair disturbed by another tenant of a shared
    # machine does not decide the result
    ratios = sorted(slow.wall_s / fast.wall_s for fast, slow in zip(out[0::2], out[1::2]))
    assert 3.0 <= ratios[len(ratios) // 2] <= 5.0, ratios


def test_real_mode_run_reports_measured_seconds(ray_session, tmp_path):
    cfg = tiered(tmp_path, "fedavg", **{"devices.mode": "real", "server.rounds": 2, "data.num_clients": 20,
                                        "server.clients_per_round": 4})
    s = run(cfg)
    t = pq.read_table(f"{s['run_dir']}/metrics.parquet").to_pandas()
    ups = t[t.event == "update"]
    # in real mode the round time is the measured training time plus simulated communication
    assert np.allclose(ups.round_s, ups.client_wall_s + ups.comm_s + 2 * 0.05, rtol=1e-6)
    # and the next round starts when that measured round ended
    ends = t[t.event == "aggregate"].virtual_s.to_numpy()
    assert np.allclose(ups.groupby("round").t_start.min().to_numpy()[1:], ends[:-1])


def test_unavailable_and_empty_battery_devices_are_not_selected(ray_session, tmp_path):
    """Online/offline windows and batteries gate selection; drops are events, never stalls."""
    from fedray.devices.population import profiles
    from fedray.devices.cost import available

    cfg = from_dict({"experiment": "battery", "data": {"num_clients": 20, "cache_dir": str(tmp_path / "c")},
                     "devices": {"reference_flops": 2e6, "availability": 0.7, "availability_cycle_s": 200,
                                 "dropout_prob": 0.2, "low_battery": 0.5,
                                 "tiers": [{"name": "phone", "fraction": 1.0, "battery_j": 2.0, "recharge_w": 0.01,
                                            "compute_power_w": 5.0}]},
                     "server": {"rounds": 10, "clients_per_round": 4, "eval_every": 10},
                     "runtime": {"progress": False, "tensorboard": False, "out_dir": str(tmp_path)}})
    s = run(cfg)
    assert s["rounds"] == 10 and s["dropped"] > 0
    t = pq.read_table(f"{s['run_dir']}/metrics.parquet").to_pandas()
    disp = t[t.event.isin(["update", "drop", "reject", "late"])]
    profs = profiles(cfg)
    for c, t0 in zip(disp.client_id, disp.t_start):  # every dispatched device was online at its start
        assert available(profs[int(c)], t0, 1.0, seed=cfg.seed, low=0.0)
    # one dispatch costs more than half of the 2 J battery and recharging to 50% takes >= 50 s,
    # so no device is dispatched twice within 50 virtual seconds
    for _, g in disp.groupby("client_id"):
        starts = np.sort(g.t_start.to_numpy())
        assert (np.diff(starts) >= 50.0 - 1e-6).all(), starts
    assert (disp.energy_j > 0).all()
