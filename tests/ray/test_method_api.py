"""The method API end to end on a shared local Ray: one accounting path for every method, the
fixed cost and aggregation bugs, per-client state, personal layers and the per-client spread."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from fedray import config as C
from fedray.config import from_dict
from fedray.devices.cost import CostModel
from fedray.methods import registry
from fedray.runtime.runner import model_digest, run
from fedray.runtime.setup import prepare
from fedray.devices import population
from tests import runkit

pytestmark = pytest.mark.ray

METHOD_PARAMS = {
    "fedasync": {"concurrency": 4}, "fedbuff": {"buffer_size": 3, "concurrency": 5, "server_momentum": 0.5},
    "fedfix": {"interval_s": 2.0, "concurrency": 5}, "prfl": {"interval_s": 2.0, "recompute_every": 2, "patience": 1},
    "autoflip": {"explore_epochs": 1}, "random_prune": {"explore_epochs": 1}, "clamp": {"initial_depth": 2},
    "ma_clamp": {"initial_depth": 2}, "fedpmt": {"depth": 2}, "cahfp": {"score_every": 2, "scoring": "server"},
    "fedavg": {"server_momentum": 0.9},
    "adaptive_masked_buff": {"buffer_size": 3, "concurrency": 5, "patience": 1, "score_every": 2},
}


def small(tmp_path, method: dict, **over):
    return runkit.small(tmp_path, method, "runs", **{"experiment": "api", "server.rounds": 4,
                                                     "devices.noise_sigma": 0.1, "runtime.checkpoint_every": 0,
                                                     **over})


def table(summary):
    return pq.read_table(os.path.join(summary["run_dir"], "metrics.parquet")).to_pandas()


@pytest.mark.parametrize("name", registry.names())
def test_virtual_time_and_totals_come_from_the_same_bytes_and_flops(ray_session, tmp_path, name):
    """For every registered method: each update's round time is the cost model's answer for the
    row's own FLOPs and bytes, the payload the server received had exactly the declared size
    and extra arrays, and ``summary.json`` and ``metrics.parquet`` hold the same totals."""
    cfg = small(tmp_path, {"name": name, **METHOD_PARAMS.get(name, {})})
    s = run(cfg)
    t = table(s)
    # (regression: adaptive_masked_buff's compact clients crashed in CA-HFP's client on a parameter
    # only CA-HFP has, and the run went on with the full-width clients alone)
    assert not {"size", "extras", "state", "client_error"} & set(s["rejected_by_reason"]), s.get("client_error")
    profiles = population.profiles(cfg)
    model = CostModel(noise_sigma=cfg.devices.noise_sigma)
    ups = t[t.event.isin(["update", "reject"])]
    assert len(ups) > 0
    for r in ups.itertuples():
        c = model.estimate(profiles[int(r.client_id)], train_flops=int(r.train_flops), bytes_down=int(r.bytes_down),
                           bytes_up=int(r.bytes_up), t_start=r.t_start, seed=cfg.seed, round_key=int(r.dispatch_id))
        assert r.round_s == pytest.approx(c.total_s, rel=1e-12), r
        assert r.energy_j == pytest.approx(c.energy_j, rel=1e-12)
    saved = json.loads((cfg.run_dir / "summary.json").read_text())
    for key, col in (("bytes_up", "bytes_up"), ("bytes_down", "bytes_down"), ("train_flops", "train_flops"),
                     ("sparse_train_flops", "sparse_train_flops"), ("server_egress", "egress_bytes")):
        assert saved[key] == int(t[col].fillna(0).sum()), key
    assert saved["energy_j"] == pytest.approx(float(t["energy_j"].fillna(0).sum()))
    assert saved["sparse_train_flops"] <= saved["train_flops"]


def test_ma_clamp_updates_layers_when_fewer_clients_than_per_round_are_available(ray_session, tmp_path):
    """Regression (|S| = max(arrivals, clients_per_round)): 10 per round but only 3 clients
    available gave a threshold of 5 and the model never changed."""
    tiers = [{"name": "dead", "fraction": 0.7, "battery_j": 1000.0, "battery_level_range": [0.0, 0.0]},
             {"name": "ok", "fraction": 0.3}]
    cfg = small(tmp_path, {"name": "ma_clamp", "initial_depth": 1, "rho": 0.5}, **{"data.num_clients": 10,
                "server.clients_per_round": 10, "server.rounds": 3, "devices.dropout_prob": 0.0})
    cfg = from_dict({**C.to_dict(cfg), "devices": {**C.to_dict(cfg.devices), "tiers": tiers}})
    initial = model_digest(prepare(cfg).params)
    s = run(cfg)
    ups = table(s).query("event == 'update'")
    assert len(ups) == 9 and ups.client_id.nunique() == 3  # three clients, every round
    assert s["model_sha256"] != initial
    assert s["sdir_layers"] == 1.0


def test_deadline_fedavg_counts_what_late_clients_really_sent(ray_session, tmp_path):
    """Regression: a late client was charged its full upload bytes."""
    cfg = small(tmp_path, {"name": "fedavg_deadline", "deadline_factor": 1.0},
                **{"devices.dropout_prob": 0.0, "server.rounds": 3})
    s = run(cfg)
    t = table(s)
    late, ups = t[t.event == "late"], t[t.event == "update"]
    assert len(late) > 0 and s["late"] == len(late)
    full = int(ups.bytes_up.iloc[0])
    # cut before or during the upload: nothing or a part of it (after the upload only the last
    # latency is missing: everything was sent)
    assert (late.bytes_up <= full).all() and (late.bytes_up < full).any()
    assert s["bytes_up"] == int(ups.bytes_up.sum() + late.bytes_up.sum())


def test_shared_server_link_is_shared_by_the_transfers_that_overlap(ray_session, tmp_path):
    """Regression: ``devices.shared_server_bps`` only capped each client. Four identical clients
    downloading and uploading together through a 1 MB/s server link each get a quarter of it."""
    over = {"devices.tiers": "homogeneous", "devices.link": "fixed", "devices.load_sigma": 0.0,
            "devices.noise_sigma": 0.0, "devices.dropout_prob": 0.0, "server.rounds": 2}
    alone = table(run(small(tmp_path / "a", {"name": "fedavg"}, **over)))
    shared = table(run(small(tmp_path / "s", {"name": "fedavg"}, **over, **{"devices.shared_server_bps": 1e6})))
    a, s = alone[alone.event == "update"], shared[shared.event == "update"]
    nbytes = int(a.bytes_down.iloc[0]) + int(a.bytes_up.iloc[0])
    np.testing.assert_allclose(s.comm_s.to_numpy(), nbytes / (1e6 / 4))
    assert (a.comm_s < s.comm_s / 3).all()


def test_heterofl_evaluates_resnet_with_recomputed_batch_norm_statistics(ray_session, tmp_path):
    """Regression: static batch norm evaluated with the initial statistics; the global model's
    are now recomputed on training data before every evaluation (and saved)."""
    cfg = small(tmp_path, {"name": "heterofl", "ratios": [1.0, 0.5]}, **{
        "model.name": "resnet18", "model.options": {"width": 0.125}, "server.rounds": 2,
        "devices.dropout_prob": 0.0})
    s = run(cfg)
    saved = np.load(os.path.join(s["run_dir"], "model.npz"))
    init = prepare(cfg).params
    var = "layer2.0.bn1.running_var"
    assert not np.allclose(saved[var], init[var]) and np.isfinite(saved[var]).all()
    assert int(saved["bn1.num_batches_tracked"]) > 0
    ups = table(s).query("event == 'update'")
    # the half-width clients' slices cut the residual stream too: a quarter of the convolutions' bytes
    assert ups[ups.width == 0.5].bytes_up.max() < 0.3 * ups[ups.width == 1.0].bytes_up.min()


def test_prfl_server_egress_is_below_sending_every_client_its_submodel(ray_session, tmp_path):
    cfg = small(tmp_path, {"name": "prfl", **METHOD_PARAMS["prfl"]}, **{"server.rounds": 6})
    s = run(cfg)
    t = table(s)
    assert 0 < s["server_egress"] < s["bytes_down"] == int(t.bytes_down.sum())


def test_client_state_is_independent_of_the_actors_and_its_bytes_are_counted(ray_session, tmp_path):
    """SCAFFOLD's control variates live in the per-client store: any number of client actors gives
    the same model; the model and ``c`` travel down, the delta and ``delta c`` up."""
    outs = [run(small(tmp_path / str(n), {"name": "scaffold"}, **{"cluster.num_client_actors": n,
                                                                "devices.dropout_prob": 0.0}))
            for n in (1, 3, 0)]  # 0: trained in the aggregator, on read-only views of the store's states
    assert outs[0]["model_sha256"] == outs[1]["model_sha256"] == outs[2]["model_sha256"]
    t = table(outs[0])
    ups = t[t.event == "update"]
    model_bytes = 4 * (64 * 24 + 24 + 24 * 12 + 12 + 12 * 10 + 10)
    params_bytes = model_bytes  # the MLP has no buffers: c covers every parameter
    assert (ups.bytes_down == model_bytes + params_bytes).all() and (ups.bytes_up == 2 * model_bytes).all()
    assert outs[0]["client_state_bytes"] > 0


def test_fedper_keeps_heads_on_the_clients_and_reports_the_per_client_spread(ray_session, tmp_path):
    cfg = small(tmp_path, {"name": "fedper"}, **{"server.rounds": 6, "server.client_eval_every": 3,
                                                 "devices.dropout_prob": 0.0})
    s = run(cfg)
    t = table(s)
    ups = t[t.event == "update"]
    body = 4 * (64 * 24 + 24 + 24 * 12 + 12)
    assert (ups.bytes_up == body).all()  # the head (layers.2) is never sent
    assert set(ups.bytes_down) == {body + 4 * (12 * 10 + 10), body}  # the first download has the head
    assert {"client_accuracy_mean", "client_accuracy_std", "client_accuracy_p10"} <= set(t.columns)
    spread = t[t.client_accuracy_mean.notna()]  # versions 3 (its own row) and 6 (with the global evaluation)
    assert list(spread.version) == [3, 6] and list(spread.event) == ["client_eval", "eval"]
    assert math.isfinite(s["client_accuracy_std"])
    saved = np.load(os.path.join(s["run_dir"], "model.npz"))
    assert np.array_equal(saved["layers.2.weight"], prepare(cfg).params["layers.2.weight"])  # global head untouched


def test_asynchronous_runs_report_the_per_client_spread_at_their_own_versions(ray_session, tmp_path):
    cfg = small(tmp_path, {"name": "fedbuff", "buffer_size": 2, "concurrency": 4},
                **{"server.client_eval_every": 2, "server.client_eval_clients": 5})
    s = run(cfg)
    t = table(s)
    spread = t[t.client_accuracy_mean.notna()]
    assert list(spread.version) == [2, 4] and 0 <= s["client_accuracy_min"] <= s["client_accuracy_mean"] <= 1
