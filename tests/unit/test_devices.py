"""Device profiles, populations, trace files and the FedScale converter (no Ray)."""
from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from fedray.devices.columns import build_population
from fedray.devices.profile import (
    DeviceProfile,
    PopulationSpec,
    TierSpec,
    clamp_tiers,
    homogeneous,
    tier_counts,
)
from fedray.devices.traces import DeviceTrace, convert_fedscale, read_traces, write_traces
from fedray.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]


def _rows():
    # client 3 rows deliberately out of time order
    return {
        "client_id": [3, 3, 3, 7],
        "t_s": [10.0, 0.0, 20.0, 0.0],
        "cpu_load": [0.5, 0.0, 0.25, 0.1],
        "download_bps": [2e6, 1e6, 3e6, 5e6],
        "upload_bps": [2e5, 1e5, 3e5, 5e5],
        "available": [False, True, True, True],
    }


# ----------------------------------------------------------------------------- traces


def test_trace_lookup_is_piecewise_constant():
    tr = DeviceTrace(
        t_s=[0.0, 10.0, 20.0],
        cpu_load=[0.0, 0.5, 0.25],
        download_bps=[1e6, 2e6, 3e6],
        upload_bps=[1e5, 2e5, 3e5],
        available=[True, False, True],
    )
    assert tr.at(-5.0)["cpu_load"] == 0.0  # before the first row: first row holds
    assert tr.at(0.0)["download_bps"] == 1e6
    assert tr.at(9.999)["download_bps"] == 1e6
    assert tr.at(10.0) == {"cpu_load": 0.5, "download_bps": 2e6, "upload_bps": 2e5,
                           "available": False, "battery_level": None}
    assert tr.at(19.0)["available"] is False
    assert tr.at(1e9)["upload_bps"] == 3e5  # last row holds forever


def test_trace_period_wraps():
    tr = DeviceTrace(t_s=[0.0, 50.0], cpu_load=[0, 0], download_bps=[1, 1], upload_bps=[1, 1],
                     available=[True, False], battery_level=[1.0, 0.5], period_s=100.0)
    assert [tr.at(t)["available"] for t in (49.0, 50.0, 149.0, 150.0, 199.0, 200.0)] == [
        True, False, True, False, False, True]
    assert tr.at(260.0)["battery_level"] == 0.5


def test_trace_rejects_unsorted_times():
    with pytest.raises(ValueError):
        DeviceTrace(t_s=[1.0, 0.0], cpu_load=[0, 0], download_bps=[1, 1], upload_bps=[1, 1], available=[1, 1])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_read_traces_csv_and_parquet(tmp_path, suffix):
    path = tmp_path / f"tr{suffix}"
    table = pa.table(_rows())
    if suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    traces = read_traces(path)
    assert sorted(traces) == [3, 7]
    t3 = traces[3]
    np.testing.assert_array_equal(t3.t_s, [0.0, 10.0, 20.0])
    np.testing.assert_array_equal(t3.cpu_load, [0.0, 0.5, 0.25])
    np.testing.assert_array_equal(t3.available, [True, False, True])
    assert t3.at(15.0)["download_bps"] == 2e6
    assert traces[7].at(3.0)["upload_bps"] == 5e5
    assert t3.battery_level is None and t3.speed is None and t3.period_s is None


def test_read_traces_accepts_01_availability_and_optional_columns(tmp_path):
    rows = _rows()
    rows["available"] = [0, 1, 1, 1]
    rows["speed"] = [0.5, 0.5, 0.5, 2.0]
    rows["battery_level"] = [0.9, 1.0, 0.8, 0.3]
    path = tmp_path / "tr.csv"
    pacsv.write_csv(pa.table(rows), path)
    traces = read_traces(path)
    assert traces[3].speed == 0.5 and traces[7].speed == 2.0
    assert traces[3].at(12.0) == {"cpu_load": 0.5, "download_bps": 2e6, "upload_bps": 2e5,
                                  "available": False, "battery_level": 0.9}


def test_read_traces_missing_column_names_file_and_column(tmp_path):
    rows = _rows()
    del rows["upload_bps"]
    path = tmp_path / "bad.csv"
    pacsv.write_csv(pa.table(rows), path)
    with pytest.raises(DataError) as info:
        read_traces(path)
    msg = str(info.value)
    assert "bad.csv" in msg and "upload_bps" in msg and "\n" not in msg


def test_read_traces_bad_values_and_files(tmp_path):
    rows = _rows()
    rows["cpu_load"] = [0.5, 1.0, 0.2, 0.1]
    path = tmp_path / "load.csv"
    pacsv.write_csv(pa.table(rows), path)
    with pytest.raises(DataError, match="cpu_load"):
        read_traces(path)
    rows = _rows()
    rows["speed"] = [0.5, 0.6, 0.5, 2.0]  # not constant for client 3
    path = tmp_path / "speed.parquet"
    pq.write_table(pa.table(rows), path)
    with pytest.raises(DataError, match="speed"):
        read_traces(path)
    with pytest.raises(DataError, match="not found"):
        read_traces(tmp_path / "nope.parquet")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="x.json"):
        read_traces(tmp_path / "x.json")


def test_write_then_read_roundtrip(tmp_path):
    tr = {5: DeviceTrace(t_s=[0, 1], cpu_load=[0.1, 0.2], download_bps=[1, 2], upload_bps=[3, 4],
                         available=[True, False], speed=1.5, period_s=2.0)}
    back = read_traces(write_traces(tr, tmp_path / "rt.parquet"))[5]
    np.testing.assert_array_equal(back.cpu_load, [0.1, 0.2])
    assert back.speed == 1.5 and back.period_s == 2.0


def _fedscale_files(tmp_path):
    cap = {1: {"computation": 10.0, "communication": 800.0},
           2: {"computation": 20.0, "communication": 1600.0},
           3: {"computation": 40.0, "communication": 80.0}}
    beh = {10: {"duration": 200, "active": [0.0, 100.0], "inactive": [50.0], "finish_time": 200.0},
           20: {"duration": 60, "active": [30.0], "inactive": [10.0], "finish_time": 60.0}}
    cap_p, beh_p = tmp_path / "cap.pkl", tmp_path / "beh.pkl"
    cap_p.write_bytes(pickle.dumps(cap))
    beh_p.write_bytes(pickle.dumps(beh))
    return cap_p, beh_p


def test_convert_fedscale(tmp_path):
    cap_p, beh_p = _fedscale_files(tmp_path)
    out = tmp_path / "out.parquet"
    written = convert_fedscale(cap_p, beh_p, out)
    traces = read_traces(out)
    assert sorted(traces) == sorted(written) == [0, 1, 2]
    # speeds vs the median computation (20 ms/sample)
    assert [traces[i].speed for i in range(3)] == [2.0, 1.0, 0.5]
    # 800 kbit/s = 100_000 bytes/s, both directions
    assert traces[0].at(0)["download_bps"] == 100_000.0 and traces[0].at(0)["upload_bps"] == 100_000.0
    assert traces[2].at(0)["upload_bps"] == 10_000.0
    # client 0 <- behaviour 10: on at 0, off at 50, on at 100, period 200
    t0 = traces[0]
    np.testing.assert_array_equal(t0.t_s, [0.0, 50.0, 100.0])
    assert [t0.at(t)["available"] for t in (0, 49, 50, 99, 100, 199, 250, 300)] == [
        True, True, False, False, True, True, False, True]
    # client 1 <- behaviour 20: first event is "off" at 10, so on before it
    t1 = traces[1]
    assert [t1.at(t)["available"] for t in (0, 9, 10, 29, 30, 59, 65, 75)] == [
        True, True, False, False, True, True, True, False]
    # client 2 cycles back to behaviour 10
    np.testing.assert_array_equal(traces[2].available, t0.available)
    assert traces[2].period_s == 200.0


def test_convert_fedscale_options_and_errors(tmp_path):
    cap_p, _ = _fedscale_files(tmp_path)
    out = tmp_path / "out.csv"
    traces = convert_fedscale(cap_p, None, out, num_clients=5, reference_ms_per_sample=10.0, cpu_load=0.2)
    assert len(traces) == 5
    back = read_traces(out)
    assert back[3].speed == 1.0 and back[4].speed == 0.5  # cycles over 3 capacity entries
    assert back[4].at(1e6) == {"cpu_load": 0.2, "download_bps": 200_000.0, "upload_bps": 200_000.0,
                               "available": True, "battery_level": None}
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({1: {"computation": 1.0}}))
    with pytest.raises(DataError, match="communication"):
        convert_fedscale(bad, None, out)


def test_fedscale_cli(tmp_path):
    cap_p, beh_p = _fedscale_files(tmp_path)
    out = tmp_path / "cli.parquet"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "fedscale_traces.py"), str(cap_p),
                          "--behavior", str(beh_p), "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sorted(read_traces(out)) == [0, 1, 2]
    res = subprocess.run([sys.executable, str(REPO / "tools" / "fedscale_traces.py"), str(tmp_path / "none.pkl"),
                          "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 2 and "none.pkl" in res.stderr


# ----------------------------------------------------------------------------- populations


def test_tier_counts_exact():
    assert tier_counts(100, [0.1, 0.8, 0.1]) == [10, 80, 10]
    assert tier_counts(50, [0.1, 0.8, 0.1]) == [5, 40, 5]
    assert tier_counts(7, [0.1, 0.8, 0.1]) == [1, 5, 1]  # 0.7->1, 5.6->6, 0.7->1 ; -1 to largest
    assert tier_counts(7, [0.5, 0.5]) == [3, 4]
    assert tier_counts(3, [0.1, 0.8, 0.1]) == [0, 3, 0]


def test_clamp_population_proportions_and_ranges():
    spec = PopulationSpec(tiers=clamp_tiers())
    pop = build_population(100, spec, seed=3)
    assert [p.client_id for p in pop] == list(range(100))
    by_tier = {}
    for p in pop:
        by_tier.setdefault(p.tier, []).append(p)
    assert {k: len(v) for k, v in by_tier.items()} == {"very_slow": 10, "normal": 80, "very_fast": 10}
    ranges = {"very_slow": (0.3, 0.6), "normal": (0.8, 1.4), "very_fast": (1.8, 2.5)}
    for name, ps in by_tier.items():
        lo, hi = ranges[name]
        assert all(lo <= p.speed <= hi for p in ps)
    for p in pop:
        assert math.isclose(p.flops_per_s, p.speed * 2e9)
        assert p.bw_sigma == 0.0  # link="fixed"
    # tiers are shuffled, not contiguous
    assert [p.tier for p in pop[:10]] != ["very_slow"] * 10


def test_population_deterministic_by_seed():
    spec = PopulationSpec(tiers=clamp_tiers(), link="lognormal", link_means="random")
    a = build_population(40, spec, seed=11)
    b = build_population(40, spec, seed=11)
    c = build_population(40, spec, seed=12)
    assert list(a) == list(b)
    assert [p.speed for p in a] != [p.speed for p in c]
    assert all(p.bw_sigma == 0.3 for p in a)
    assert all(0.4e6 <= p.upload_bps <= 5e6 and 1.5e6 <= p.download_bps <= 20e6 for p in a)


def test_homogeneous_and_linear_links():
    spec = PopulationSpec(tiers=homogeneous(), link="lognormal", link_means="linear")
    pop = build_population(10, spec, seed=0)
    assert all(p.speed == 1.0 and p.flops_per_s == 2e9 for p in pop)
    np.testing.assert_allclose([p.download_bps for p in pop], np.linspace(20e6, 1.5e6, 10))
    np.testing.assert_allclose([p.upload_bps for p in pop], np.linspace(5e6, 0.4e6, 10))
    assert build_population(1, spec, seed=0)[0].download_bps == 20e6


def test_tier_attributes_reach_profiles():
    tiers = (TierSpec("edge", 0.5, speed_range=(0.5, 0.5), resources={"device:edge": 1}, num_cpus=0.5,
                      battery_j=1000.0, battery_level_range=(0.2, 0.4), recharge_w=2.0),
             TierSpec("server", 0.5, speed_range=(3.0, 3.0), num_gpus=1.0))
    pop = build_population(4, PopulationSpec(tiers=tiers, reference_flops=1e9, dropout_prob=0.1,
                                             availability=0.7), seed=1)
    edge = [p for p in pop if p.tier == "edge"]
    assert len(edge) == 2
    for p in edge:
        assert p.resources == {"device:edge": 1.0} and p.num_cpus == 0.5 and p.flops_per_s == 5e8
        assert 0.2 <= p.battery_level <= 0.4 and p.battery_j == 1000.0 and p.recharge_w == 2.0
    assert all(p.dropout_prob == 0.1 and p.availability == 0.7 for p in pop)


def test_population_from_trace(tmp_path):
    rows = _rows()
    rows["speed"] = [0.5, 0.5, 0.5, 2.0]
    path = tmp_path / "tr.parquet"
    pq.write_table(pa.table(rows), path)
    pop = build_population(3, PopulationSpec(trace_path=str(path)), seed=0)
    assert [p.speed for p in pop] == [0.5, 2.0, 0.5]  # ids 3, 7, 3 (cycled)
    assert pop[0].trace is pop[2].trace and pop[1].trace.at(0)["cpu_load"] == 0.1
    assert pop[0].download_bps == pytest.approx(2e6)  # mean of the trace rows


def test_bad_specs_raise_config_errors():
    with pytest.raises(ConfigError, match="devices.tiers"):
        PopulationSpec(tiers=(TierSpec("a", 0.5), TierSpec("b", 0.4)))
    with pytest.raises(ConfigError, match="devices.tiers.a.speed_range"):
        TierSpec("a", 1.0, speed_range=(0.0, 1.0))
    with pytest.raises(ConfigError, match="devices.link"):
        PopulationSpec(link="wifi")
    with pytest.raises(ConfigError, match="devices.cpu_load"):
        DeviceProfile(client_id=0, tier="x", speed=1.0, flops_per_s=1.0, cpu_load=1.0)
    with pytest.raises(ConfigError, match="num_clients"):
        build_population(0, PopulationSpec(), seed=0)
