"""Time-varying device conditions: the ``DeviceTrace`` type, its file format, and a FedScale converter.

File format (Parquet ``.parquet``/``.pq`` or CSV ``.csv``), one row per (client, change point):

=================  ========  ===============================================================
column             required  meaning
=================  ========  ===============================================================
``client_id``      yes       integer client id (>= 0)
``t_s``            yes       virtual seconds at which this row's values start to hold
``cpu_load``       yes       fraction of the CPU used by other work, ``0 <= load < 1``;
                             effective speed = ``speed * (1 - cpu_load)``
``download_bps``   yes       mean download bandwidth, bytes per second (> 0)
``upload_bps``     yes       mean upload bandwidth, bytes per second (> 0)
``available``      yes       bool (or 0/1): may the client be selected
``battery_level``  no        observed battery fraction ``0..1``
``speed``          no        static relative speed factor vs the reference device (constant
                             per client); overrides the tier draw when a population is
                             built from the trace
``period_s``       no        > 0: the trace repeats with this period (constant per client);
                             missing/0: the last row holds forever
=================  ========  ===============================================================

Lookup is piecewise constant: at time ``t`` the row with the largest ``t_s <= t`` holds
(before the first row, the first row holds). Rows of one client may come in any order;
they are sorted by ``t_s`` (stable, so among equal times the last row in the file wins).

``convert_fedscale`` turns FedScale's device capacity and behaviour pickles into this format.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fedray.errors import DataError

REQUIRED_COLUMNS = ("client_id", "t_s", "cpu_load", "download_bps", "upload_bps", "available")
OPTIONAL_COLUMNS = ("battery_level", "speed", "period_s")


@dataclass(frozen=True, eq=False)
class DeviceTrace:
    """Time-indexed conditions of one client (arrays of equal length, ``t_s`` ascending).

    ``speed`` and ``period_s`` are static per client; ``battery_level`` is optional.
    """

    t_s: np.ndarray
    cpu_load: np.ndarray
    download_bps: np.ndarray
    upload_bps: np.ndarray
    available: np.ndarray
    battery_level: np.ndarray | None = None
    speed: float | None = None
    period_s: float | None = None

    def __post_init__(self) -> None:
        conv = {
            "t_s": np.asarray(self.t_s, dtype=np.float64),
            "cpu_load": np.asarray(self.cpu_load, dtype=np.float64),
            "download_bps": np.asarray(self.download_bps, dtype=np.float64),
            "upload_bps": np.asarray(self.upload_bps, dtype=np.float64),
            "available": np.asarray(self.available, dtype=bool),
        }
        if self.battery_level is not None:
            conv["battery_level"] = np.asarray(self.battery_level, dtype=np.float64)
        n = conv["t_s"].shape
        if len(n) != 1 or n[0] == 0:
            raise ValueError("DeviceTrace needs a non-empty 1-D t_s")
        for name, arr in conv.items():
            if arr.shape != n:
                raise ValueError(f"DeviceTrace.{name} has shape {arr.shape}, expected {n}")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if not np.all(np.isfinite(conv["t_s"])) or np.any(np.diff(conv["t_s"]) < 0):
            raise ValueError("DeviceTrace.t_s must be finite and ascending")
        if self.period_s is not None and not self.period_s > 0:
            raise ValueError("DeviceTrace.period_s must be > 0 when given")

    def __len__(self) -> int:
        return int(self.t_s.shape[0])

    def index(self, t: float) -> int:
        """Row that holds at virtual time ``t`` (wrapped by ``period_s`` when set)."""
        if self.period_s:
            t = math.fmod(t, self.period_s)
            if t < 0:
                t += self.period_s
        i = int(np.searchsorted(self.t_s, t, side="right")) - 1
        return max(i, 0)

    def at(self, t: float) -> dict[str, Any]:
        """Conditions at virtual time ``t``: ``cpu_load, download_bps, upload_bps, available``
        and ``battery_level`` (None when the trace has none)."""
        i = self.index(t)
        return {
            "cpu_load": float(self.cpu_load[i]),
            "download_bps": float(self.download_bps[i]),
            "upload_bps": float(self.upload_bps[i]),
            "available": bool(self.available[i]),
            "battery_level": None if self.battery_level is None else float(self.battery_level[i]),
        }


# ----------------------------------------------------------------------------- reading


def _read_table(path: Path) -> pa.Table:
    if not path.is_file():
        raise DataError(f"{path}: trace file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
        if suffix == ".csv":
            return pacsv.read_csv(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read trace file ({str(err).splitlines()[0]})") from err
    raise DataError(f"{path}: trace file must end in .parquet, .pq or .csv")


def _column(table: pa.Table, path: Path, name: str, kind: str) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        raise DataError(f"{path}: column '{name}' has {col.null_count} empty value(s)")
    typ = col.type
    if kind == "bool":
        if pa.types.is_boolean(typ):
            return col.to_numpy(zero_copy_only=False).astype(bool)
        if pa.types.is_integer(typ) or pa.types.is_floating(typ):
            vals = col.to_numpy(zero_copy_only=False)
            if not np.all(np.isin(vals, (0, 1))):
                raise DataError(f"{path}: column '{name}' must be true/false or 0/1")
            return vals.astype(bool)
        if pa.types.is_string(typ) or pa.types.is_large_string(typ):
            low = pc.utf8_lower(pc.utf8_trim_whitespace(col)).to_numpy(zero_copy_only=False)
            truthy = np.isin(low, ("true", "1", "yes"))
            falsy = np.isin(low, ("false", "0", "no"))
            if not np.all(truthy | falsy):
                raise DataError(f"{path}: column '{name}' must be true/false or 0/1")
            return truthy
        raise DataError(f"{path}: column '{name}' must be true/false or 0/1, got {typ}")
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
        raise DataError(f"{path}: column '{name}' must be numeric, got {typ}")
    vals = col.to_numpy(zero_copy_only=False).astype(np.float64)
    if not np.all(np.isfinite(vals)):
        raise DataError(f"{path}: column '{name}' has non-finite values")
    if kind == "int":
        if np.any(vals != np.round(vals)) or np.any(vals < 0):
            raise DataError(f"{path}: column '{name}' must hold non-negative integers")
        return vals.astype(np.int64)
    return vals


def _static(values: np.ndarray, path: Path, name: str, cid: int) -> float:
    if np.any(values != values[0]):
        raise DataError(f"{path}: column '{name}' must be constant per client (client {cid})")
    return float(values[0])


def read_traces(path: str | os.PathLike) -> dict[int, DeviceTrace]:
    """Read a trace file (format in the module docstring) into ``{client_id: DeviceTrace}``.

    Raises ``DataError`` naming the file and the column for a missing column or a bad value.
    """
    path = Path(path)
    table = _read_table(path)
    for name in REQUIRED_COLUMNS:
        if name not in table.column_names:
            raise DataError(f"{path}: missing required column '{name}'")
    if table.num_rows == 0:
        raise DataError(f"{path}: trace file has no rows")
    cols: dict[str, np.ndarray] = {
        "client_id": _column(table, path, "client_id", "int"),
        "t_s": _column(table, path, "t_s", "float"),
        "cpu_load": _column(table, path, "cpu_load", "float"),
        "download_bps": _column(table, path, "download_bps", "float"),
        "upload_bps": _column(table, path, "upload_bps", "float"),
        "available": _column(table, path, "available", "bool"),
    }
    for name in OPTIONAL_COLUMNS:
        if name in table.column_names:
            cols[name] = _column(table, path, name, "float")
    load = cols["cpu_load"]
    if np.any((load < 0) | (load >= 1)):
        raise DataError(f"{path}: column 'cpu_load' must be in [0, 1)")
    for name in ("download_bps", "upload_bps"):
        if np.any(cols[name] <= 0):
            raise DataError(f"{path}: column '{name}' must be > 0 (bytes per second)")
    if "battery_level" in cols and np.any((cols["battery_level"] < 0) | (cols["battery_level"] > 1)):
        raise DataError(f"{path}: column 'battery_level' must be in [0, 1]")
    if "speed" in cols and np.any(cols["speed"] <= 0):
        raise DataError(f"{path}: column 'speed' must be > 0")
    if "period_s" in cols and np.any(cols["period_s"] < 0):
        raise DataError(f"{path}: column 'period_s' must be >= 0")

    order = np.lexsort((cols["t_s"], cols["client_id"]))  # by client, then time; stable
    cols = {k: v[order] for k, v in cols.items()}
    ids, starts = np.unique(cols["client_id"], return_index=True)
    bounds = list(starts) + [len(order)]
    out: dict[int, DeviceTrace] = {}
    for j, cid in enumerate(ids):
        sl = slice(bounds[j], bounds[j + 1])
        cid = int(cid)
        speed = _static(cols["speed"][sl], path, "speed", cid) if "speed" in cols else None
        period = _static(cols["period_s"][sl], path, "period_s", cid) if "period_s" in cols else None
        out[cid] = DeviceTrace(
            t_s=cols["t_s"][sl],
            cpu_load=cols["cpu_load"][sl],
            download_bps=cols["download_bps"][sl],
            upload_bps=cols["upload_bps"][sl],
            available=cols["available"][sl],
            battery_level=cols["battery_level"][sl] if "battery_level" in cols else None,
            speed=speed,
            period_s=period or None,
        )
    return out


def write_traces(traces: Mapping[int, DeviceTrace], path: str | os.PathLike) -> Path:
    """Write ``traces`` in the file format above (Parquet or CSV by suffix); returns the path.

    Optional columns are written when at least one trace has them; clients without a value
    get ``battery_level`` 1.0, ``speed`` 1.0, ``period_s`` 0 (= not periodic).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise DataError(f"{path}: trace file must end in .parquet, .pq or .csv")
    if not traces:
        raise DataError(f"{path}: no traces to write")
    items = sorted(traces.items())
    rep = [len(tr) for _, tr in items]
    cols: dict[str, Any] = {
        "client_id": np.repeat([cid for cid, _ in items], rep).astype(np.int64),
        "t_s": np.concatenate([tr.t_s for _, tr in items]),
        "cpu_load": np.concatenate([tr.cpu_load for _, tr in items]),
        "download_bps": np.concatenate([tr.download_bps for _, tr in items]),
        "upload_bps": np.concatenate([tr.upload_bps for _, tr in items]),
        "available": np.concatenate([tr.available for _, tr in items]),
    }
    if any(tr.battery_level is not None for _, tr in items):
        cols["battery_level"] = np.concatenate(
            [tr.battery_level if tr.battery_level is not None else np.ones(len(tr)) for _, tr in items]
        )
    if any(tr.speed is not None for _, tr in items):
        cols["speed"] = np.repeat([tr.speed if tr.speed is not None else 1.0 for _, tr in items], rep)
    if any(tr.period_s is not None for _, tr in items):
        cols["period_s"] = np.repeat([tr.period_s or 0.0 for _, tr in items], rep)
    table = pa.table(cols)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


# ----------------------------------------------------------------------------- FedScale


def _load_pickle(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: FedScale {what} file not found")
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh)
    except Exception as err:  # any unpickling failure is a bad input file
        raise DataError(f"{path}: cannot read FedScale {what} pickle ({type(err).__name__})") from err
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{path}: FedScale {what} file must hold a non-empty dict keyed by client id")
    return obj


def _field(entry: Any, path: Path, key: Any, name: str) -> Any:
    if not isinstance(entry, Mapping) or name not in entry:
        raise DataError(f"{path}: client {key!r} has no '{name}' field")
    return entry[name]


def _behavior_rows(entry: Mapping, path: Path, key: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """Change points (times, available) and period of one FedScale behaviour entry."""
    active = [float(x) for x in _field(entry, path, key, "active")]
    inactive = [float(x) for x in _field(entry, path, key, "inactive")]
    finish = float(_field(entry, path, key, "finish_time"))
    if not finish > 0:
        raise DataError(f"{path}: client {key!r} has finish_time <= 0")
    events = sorted([(t, 1, True) for t in active] + [(t, 0, False) for t in inactive])
    if not events:
        return np.array([0.0]), np.array([True]), finish
    # Before the first event the client is in the opposite state of that event.
    times = [0.0]
    states = [not events[0][2]]
    for t, _, state in events:
        t = min(max(t, 0.0), finish)
        if t == times[-1]:
            states[-1] = state
        else:
            times.append(t)
            states.append(state)
    return np.array(times), np.array(states, dtype=bool), finish


def convert_fedscale(
    capacity_path: str | os.PathLike,
    behavior_path: str | os.PathLike | None,
    out_path: str | os.PathLike,
    *,
    num_clients: int | None = None,
    reference_ms_per_sample: float | None = None,
    cpu_load: float = 0.0,
) -> dict[int, DeviceTrace]:
    """Convert FedScale device files into a fedray trace file; returns the traces written.

    Inputs (pickles; only convert files you trust, unpickling runs code):

    - ``capacity_path``: ``{client_id: {"computation": ms per sample, "communication": kbps}}``.
    - ``behavior_path`` (or None = always available):
      ``{client_id: {"duration", "inactive": [s...], "finish_time": s, "active": [s...]}}``.

    Our interpretation:

    - Output clients are ``0..num_clients-1`` (default: as many as capacity entries). Client
      ``i`` takes the ``i``-th capacity entry and the ``i``-th behaviour entry in sorted-key
      order, cycling when a file has fewer entries (FedScale also reuses its profiles).
    - ``speed = reference_ms_per_sample / computation``; the reference defaults to the median
      ``computation`` over the capacity file, so the median device has speed 1.0.
    - ``download_bps = upload_bps = communication * 1000 / 8`` (kbit/s to bytes/s; FedScale has
      one bandwidth for both directions). ``cpu_load`` is the given constant (FedScale has none).
    - Availability: ``active``/``inactive`` timestamps are switch-on/switch-off events; before the
      first event the client is in the opposite state of that event. The pattern repeats with
      period ``finish_time`` (written as ``period_s``), as FedScale evaluates ``t % finish_time``.
    """
    capacity_path = Path(capacity_path)
    cap = _load_pickle(capacity_path, "capacity")
    beh = None if behavior_path is None else _load_pickle(Path(behavior_path), "behavior")
    cap_keys = _sorted_keys(cap)
    n = len(cap_keys) if num_clients is None else int(num_clients)
    if n <= 0:
        raise DataError(f"{capacity_path}: num_clients must be > 0")
    if not 0.0 <= cpu_load < 1.0:
        raise DataError(f"{capacity_path}: cpu_load must be in [0, 1)")

    comp = {}
    comm = {}
    for k in cap_keys:
        c = float(_field(cap[k], capacity_path, k, "computation"))
        b = float(_field(cap[k], capacity_path, k, "communication"))
        if not (c > 0 and math.isfinite(c)):
            raise DataError(f"{capacity_path}: client {k!r} has computation <= 0")
        if not (b > 0 and math.isfinite(b)):
            raise DataError(f"{capacity_path}: client {k!r} has communication <= 0")
        comp[k], comm[k] = c, b
    ref = float(np.median(list(comp.values()))) if reference_ms_per_sample is None else float(reference_ms_per_sample)
    if not ref > 0:
        raise DataError(f"{capacity_path}: reference_ms_per_sample must be > 0")

    beh_keys = None
    if beh is not None:
        beh_keys = _sorted_keys(beh)

    traces: dict[int, DeviceTrace] = {}
    for i in range(n):
        ck = cap_keys[i % len(cap_keys)]
        bps = comm[ck] * 1000.0 / 8.0
        if beh_keys is None:
            times, avail, period = np.array([0.0]), np.array([True]), None
        else:
            bk = beh_keys[i % len(beh_keys)]
            times, avail, period = _behavior_rows(beh[bk], Path(behavior_path), bk)
        m = len(times)
        traces[i] = DeviceTrace(
            t_s=times,
            cpu_load=np.full(m, cpu_load),
            download_bps=np.full(m, bps),
            upload_bps=np.full(m, bps),
            available=avail,
            speed=ref / comp[ck],
            period_s=period,
        )
    write_traces(traces, out_path)
    return traces


def _sorted_keys(d: Mapping) -> list:
    """Keys in sorted order; mixed key types (e.g. int and str) sort by ``repr``."""
    try:
        return sorted(d)
    except TypeError:
        return sorted(d, key=repr)
