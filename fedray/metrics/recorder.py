"""The one recorder: TensorBoard scalars with fixed tags + a Parquet event table.

Every method writes the same tag names, so runs of different methods overlay
in TensorBoard. Each event (a client update, a drop, a rejection, an
aggregation) is one row of ``metrics.parquet``; the table is written on
``flush``/``close`` atomically (temp file + rename), so an interrupted run
keeps what was flushed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

# columns every table has, with their types (others are inferred)
COLUMNS: dict[str, pa.DataType] = {
    "event": pa.string(),
    "round": pa.int64(),
    "version": pa.int64(),
    "dispatch_id": pa.int64(),
    "client_id": pa.int64(),
    "examples": pa.int64(),
    "train_loss": pa.float64(),
    "bytes_up": pa.int64(),
    "bytes_down": pa.int64(),
    "train_flops": pa.int64(),
    "wall_s": pa.float64(),
    "virtual_s": pa.float64(),
    "accuracy": pa.float64(),
    "loss": pa.float64(),
    "reason": pa.string(),
}

# columns that carry wall-clock measurements (excluded from determinism checks)
WALL_COLUMNS = ("wall_s", "client_wall_s")

TAGS = ("eval/accuracy", "eval/loss", "cost/bytes_up", "cost/bytes_down", "cost/train_flops", "time/wall_s",
        "time/virtual_s")


def _schema(rows: list[Mapping[str, Any]]) -> pa.Schema:
    names: list[str] = list(COLUMNS)
    for r in rows:
        for k in r:
            if k not in COLUMNS and k not in names:
                names.append(k)
    fields = []
    for n in names:
        if n in COLUMNS:
            fields.append(pa.field(n, COLUMNS[n]))
        else:
            vals = [r[n] for r in rows if r.get(n) is not None]
            t = pa.array(vals).type if vals else pa.null()
            if pa.types.is_integer(t) and any(isinstance(v, float) for v in vals):
                t = pa.float64()
            fields.append(pa.field(n, t))
    return pa.schema(fields)


def write_json(path: Path, data: Mapping) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


class Recorder:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.dir / "tb"))

    def event(self, **row) -> None:
        self.rows.append(row)

    def scalars(self, step: int, values: Mapping[str, float], *, virtual_s: float | None = None) -> None:
        """Scalars at aggregation ``step``; with ``virtual_s`` each tag is also
        written as ``<tag>@virtual_s`` with the virtual second as its step."""
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is None:
                continue
            self.writer.add_scalar(tag, float(v), int(step))
            if virtual_s is not None:
                self.writer.add_scalar(f"{tag}@virtual_s", float(v), int(round(virtual_s)))

    def histogram(self, tag: str, values, step: int) -> None:
        if self.writer is not None and len(values):
            import numpy as np

            self.writer.add_histogram(tag, np.asarray(values, dtype=np.float64), int(step))

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=_schema(self.rows))

    def flush(self) -> None:
        path = self.dir / "metrics.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(self.table(), tmp)
        os.replace(tmp, path)
        if self.writer is not None:
            self.writer.flush()

    def close(self, summary: Mapping | None = None) -> None:
        self.flush()
        if summary is not None:
            write_json(self.dir / "summary.json", summary)
        if self.writer is not None:
            self.writer.close()
