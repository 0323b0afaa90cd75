"""One accounting path: what a cut dispatch spent, the shared server link, server egress,
measured telemetry in real mode, layer-level SDIR and the per-client state store (no Ray)."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from fedray.channel import Channel
from fedray.client.state import ClientStateStore
from fedray.config import from_dict
from fedray.devices.cost import CostModel, ServerLink, cut_at, measured, transfer_intervals
from fedray.devices.profile import DeviceProfile
from fedray.metrics.definitions import sdir_layers, summarize
from fedray.runtime.accounting import Accounting
from fedray.runtime.dispatch import Inflight
from fedray.client.worker import Task
from fedray.methods.base import Assignment, Planner
from fedray.submodel.submodel import SubmodelCost
from fedray.update import Update


def _profile(**kw) -> DeviceProfile:
    base = dict(client_id=0, tier="t", speed=1.0, flops_per_s=2e9, download_bps=1e6, upload_bps=5e5,
                latency_s=0.1, compute_power_w=4.0, radio_power_w=2.0)
    base.update(kw)
    return DeviceProfile(**base)


ARGS = dict(train_flops=1_000_000_000, bytes_down=1_000_000, bytes_up=1_000_000, seed=0, round_key=0)


# ------------------------------------------------------------------ a dispatch cut by a deadline

def test_cut_at_counts_each_phase_in_proportion():
    p = _profile()
    c = CostModel().estimate(p, t_start=0.0, **ARGS)  # latency 0.1, download 1, compute 0.5, upload 2
    during_compute = cut_at(p, c, 0.1 + 1.0 + 0.25)
    assert (during_compute.bytes_down, during_compute.bytes_up) == (10**6, 0)
    assert during_compute.train_flops == 5 * 10**8
    assert during_compute.energy_j == pytest.approx(2.0 * 1.0 + 4.0 * 0.25)
    # regression: a client cut during its upload has sent part of it, one cut before has sent nothing
    during_upload = cut_at(p, c, 0.1 + 1.0 + 0.5 + 0.5)
    assert during_upload.bytes_up == 250_000 and during_upload.train_flops == 10**9
    assert during_upload.energy_j == pytest.approx(2.0 * (1.0 + 0.5) + 4.0 * 0.5)
    during_download = cut_at(p, c, 0.1 + 0.5)
    assert (during_download.bytes_down, during_download.bytes_up, during_download.train_flops) == (500_000, 0, 0)
    done = cut_at(p, c, 100.0)
    assert (done.bytes_down, done.bytes_up, done.train_flops) == (10**6, 10**6, 10**9)


# ------------------------------------------------------------------ the shared server link

def test_server_link_shares_the_capacity_among_overlapping_transfers():
    """Regression: ``shared_server_bps`` only capped each client (the loop never counted the
    transfers that share the link): five downloads that start together each get a fifth."""
    model = CostModel(shared_server_bps=1e6)
    p = _profile(download_bps=10e6, upload_bps=10e6)
    alone = [model.estimate(p, t_start=0.0, **{**ARGS, "round_key": i}) for i in range(5)]
    link = ServerLink()
    ivs = [transfer_intervals(c, 0.0) for c in alone]
    shares = link.shares([d for d, _ in ivs], [u for _, u in ivs])
    assert shares == [(5, 5)] * 5
    shared = model.estimate(p, t_start=0.0, concurrent=5, concurrent_up=5, **ARGS)
    assert shared.download_s == pytest.approx(10**6 / (1e6 / 5)) and alone[0].download_s == pytest.approx(1.0)
    link.add([d for d, _ in ivs], [u for _, u in ivs])
    # a later transfer overlapping the scheduled ones shares with them; after they end it has the link
    late = model.estimate(p, t_start=0.5, **ARGS)
    d, u = transfer_intervals(late, 0.5)
    assert link.shares([d], [u])[0][0] == 6
    link.prune(1e9)
    assert link.shares([d], [u]) == [(1, 1)]


# ------------------------------------------------------------------ server egress

def test_egress_counts_shared_pieces_once_per_version():
    like = {"w": np.zeros(100, np.float32)}
    sent = set()
    assert Channel.egress(None, 400, 0, sent) == 400  # unicast: every client its own bytes
    pieces = (("a", 100), ("b", 50))
    assert Channel.egress(pieces, 150, 0, sent) == 150
    assert Channel.egress(pieces[:1], 100, 0, sent) == 0  # piece a of version 0 already went out
    assert Channel.egress(pieces, 150, 1, sent) == 150  # a new version sends its pieces again
    assert Channel(like).mask_nbytes(None) == 400


# ------------------------------------------------------------------ real mode: measured telemetry

class _Recorder:
    def __init__(self):
        self.rows = []

    def event(self, **row):
        self.rows.append(row)


class _Observing(Planner):
    def __init__(self):
        self.seen = []

    def observe(self, header):
        self.seen.append(dict(header.telemetry))


class _Dispatcher:
    def __init__(self, profile):
        self.profiles = [profile]
        self.slow = np.array([False])
        self.busy = np.array([True])

    def release(self, c):
        self.busy[c] = False


def test_real_mode_planner_observes_the_measured_round_time():
    """Regression: in ``devices.mode: real`` adaptive methods observed the *predicted* round time
    while the clock ran on the measured one."""
    p = _profile()
    cost = CostModel().estimate(p, t_start=0.0, **ARGS)  # predicted compute 0.5 s
    tele = {"round_s": cost.total_s, "compute_s": cost.compute_s, "comm_s": cost.download_s + cost.upload_s}
    task = Task(0, 0, Assignment(0), telemetry=tele)
    sc = SubmodelCost(1, 0, 1.0, cost.bytes_down, cost.bytes_up, None, 1)
    rec = Inflight(cost.total_s, 0, task, cost, 0.0, "update", 0, cost.energy_j, cost.train_flops, sub=sc,
                   bytes_up=cost.bytes_up, bytes_down=cost.bytes_down)
    header = Update(0, 0, 0, 10, telemetry=tele, wall_s=3.0)  # the device measured 3 s of compute
    cfg = from_dict({"devices": {"mode": "real"}})
    planner, recorder = _Observing(), _Recorder()
    acc = Accounting(cfg, _Dispatcher(p), planner, recorder, 0.0)
    acc.record([rec], {"results": [(0, None)], "staleness": [0], "headers": [[header]], "done_at": 0.0}, window=0)
    expected = measured(p, cost, 3.0)
    assert planner.seen[0]["round_s"] == pytest.approx(expected.total_s) == pytest.approx(3.0 + 1.0 + 2.0 + 0.2)
    assert planner.seen[0]["compute_s"] == 3.0
    assert recorder.rows[0]["round_s"] == pytest.approx(expected.total_s)  # the clock and the planner agree


# ------------------------------------------------------------------ layer-level SDIR

def test_sdir_layers_counts_discarded_layers():
    """Regression: SDIR counted an update as included even when CLAMP / MA-CLAMP discarded its
    layers; ``sdir_layers`` is the share of the slow devices' trained layers that were aggregated."""
    rows = [
        # window 0: a slow client trained 3 layers, 1 was aggregated; a fast one is ignored
        {"event": "update", "slow": True, "window": 0, "client_id": 0, "layers": 3, "layers_included": 1.0},
        {"event": "update", "slow": False, "window": 0, "client_id": 1, "layers": 3, "layers_included": 3.0},
        # window 1: one slow update fully aggregated, one slow drop (trained for nothing)
        {"event": "update", "slow": True, "window": 1, "client_id": 0, "layers": 2, "layers_included": 2.0},
        {"event": "drop", "slow": True, "window": 1, "client_id": 2, "layers": 2, "layers_included": 0.0},
    ]
    df = pd.DataFrame(rows)
    assert sdir_layers(df) == pytest.approx((1 / 3 + 2 / 4) / 2)
    out = summarize(pa.Table.from_pylist(rows), slow_total=2)
    assert out["sdir"] == pytest.approx((1.0 + 0.5) / 2)  # update-level: both slow updates counted
    assert out["sdir_layers"] < out["sdir"]


# ------------------------------------------------------------------ the per-client store

def test_client_state_store_counts_transfers_and_survives_a_checkpoint():
    store = ClientStateStore()
    assert store.get(3) is None and store.bytes_out == 0
    store.put(3, {"c": np.ones(4, np.float32)})
    assert store.bytes_in == 16 and 3 in store and len(store) == 1
    assert store.get(3)["c"].tolist() == [1.0] * 4 and store.bytes_out == 16
    again = ClientStateStore()
    again.load_state_dict(pickle.loads(pickle.dumps(store.state_dict())))
    assert again.peek(3)["c"].tolist() == [1.0] * 4 and (again.bytes_in, again.bytes_out) == (16, 16)
