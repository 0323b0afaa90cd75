"""The one recorder: TensorBoard scalars with fixed tags + a Parquet event table, streamed.

Every method writes the same tag names, so runs of different methods overlay in TensorBoard.
Each event (a client update, a drop, a rejection, an aggregation, an evaluation) is one row of
``metrics.parquet``. Rows are written as they happen: every :meth:`Recorder.flush` (the runner
flushes every ``runtime.flush_s`` seconds, at every checkpoint and at the end) appends one
part file ``metrics.parquet/part-NNNNNN.parquet`` (written to a temporary name, then renamed,
so a part is whole or absent) and flushes TensorBoard. ``metrics.parquet`` is therefore a
Parquet *dataset* -- ``pandas.read_parquet`` and ``pyarrow.parquet.read_table`` read the folder
as one table -- that is readable while the run goes on, and a run killed by anything keeps
every row up to its last flush. The driver keeps no rows beyond the current part (flat memory).

Every part has the same schema, fixed at the first flush: the known columns of
:data:`COLUMNS` and the ones the runner declares (the task's metrics, the per-client spread),
plus the columns of the first part's rows (a method's ``info`` columns: ``depth``, ``width``...,
the same for every dispatch). A row with a column outside the schema is a programming error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

# columns every table has, with their types
COLUMNS: dict[str, pa.DataType] = {
    "event": pa.string(),
    "round": pa.int64(),
    "version": pa.int64(),
    "window": pa.int64(),
    "dispatch_id": pa.int64(),
    "client_id": pa.int64(),
    "tier": pa.string(),
    "slow": pa.bool_(),
    "t_start": pa.float64(),
    "virtual_s": pa.float64(),
    "round_s": pa.float64(),
    "compute_s": pa.float64(),
    "comm_s": pa.float64(),
    "bytes_down": pa.int64(),
    "bytes_up": pa.int64(),
    "egress_bytes": pa.int64(),
    "train_flops": pa.int64(),
    "sparse_train_flops": pa.int64(),
    "energy_j": pa.float64(),
    "layers": pa.int64(),
    "layers_included": pa.float64(),
    "reason": pa.string(),
    "malicious": pa.bool_(),
    "update_norm": pa.float64(),
    "staleness": pa.int64(),
    "examples": pa.int64(),
    "train_loss": pa.float64(),
    "client_wall_s": pa.float64(),
    "buffer": pa.int64(),
    "fill_s": pa.float64(),
    "wall_s": pa.float64(),
    "accuracy": pa.float64(),
    "loss": pa.float64(),
}

# columns that carry wall-clock measurements (excluded from determinism checks)
WALL_COLUMNS = ("wall_s", "client_wall_s")

TAGS = ("eval/accuracy", "eval/loss", "cost/bytes_up", "cost/bytes_down", "cost/train_flops", "time/wall_s",
        "time/virtual_s")

PART = "part-{:06d}.parquet"

# what a fresh run removes from its folder before it starts (with the earlier parts and event files)
STALE = ("summary.json", "config.yaml", "model.npz")


def _inferred(values: list) -> pa.DataType:
    t = pa.array(values).type if values else pa.float64()
    if pa.types.is_integer(t) and any(isinstance(v, float) for v in values):
        t = pa.float64()
    return t


def write_json(path: Path, data: Mapping) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


def parts(path: Path) -> list[Path]:
    """The part files of a metrics dataset, in order."""
    return sorted(Path(path).glob("part-*.parquet"))


class Recorder:
    """``columns``: extra ``{name: type}`` the runner knows of (the task's metrics...).
    ``resume_parts``: keep this many existing parts (a resumed run) and delete the rest;
    ``purge_step``: TensorBoard events at or after this step are purged (a resumed run)."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, columns: Mapping[str, pa.DataType] = (),
                 resume_parts: int | None = None, purge_step: int | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.parquet"
        if self.path.is_file():  # a single-file table of an older fedray: this run replaces it
            self.path.unlink()
        if resume_parts is None:  # a fresh run: nothing of an earlier run in this folder stays beside its rows
            stale = [self.dir / n for n in STALE] + sorted((self.dir / "tb").glob("events.out.tfevents.*"))
            for p in stale:
                p.unlink(missing_ok=True)
        self.path.mkdir(exist_ok=True)
        existing = parts(self.path)
        keep = 0 if resume_parts is None else resume_parts
        for p in existing[keep:]:
            p.unlink()
        self.parts = min(keep, len(existing))
        self.schema: pa.Schema | None = pq.read_schema(existing[0]) if self.parts else None
        self.declared = {**COLUMNS, **dict(columns)}
        self.rows: list[dict] = []
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.dir / "tb"), purge_step=purge_step)

    # ------------------------------------------------------------ rows
    def event(self, **row) -> None:
        self.rows.append(row)

    def _schema(self, rows: list[Mapping[str, Any]]) -> pa.Schema:
        names = list(self.declared)
        for r in rows:
            names.extend(k for k in r if k not in self.declared and k not in names)
        fields = []
        for n in names:
            t = self.declared.get(n) or _inferred([r[n] for r in rows if r.get(n) is not None])
            fields.append(pa.field(n, t))
        return pa.schema(fields)

    def flush(self) -> None:
        """Write the rows since the last flush as one part; flush TensorBoard."""
        if self.rows:
            if self.schema is None:
                self.schema = self._schema(self.rows)
            known = set(self.schema.names)
            extra = sorted({k for r in self.rows for k in r} - known)
            if extra:
                raise ValueError(f"metrics rows have columns outside the table's schema: {extra}")
            table = pa.Table.from_pylist(self.rows, schema=self.schema)
            path = self.path / PART.format(self.parts)
            tmp = path.with_name("." + path.name + ".tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, path)
            self.parts += 1
            self.rows = []
        if self.writer is not None:
            self.writer.flush()

    def truncate(self, keep: int, purge_step: int | None = None) -> None:
        """Forget everything after the first ``keep`` parts (a run rolled back to a checkpoint):
        later parts are deleted, unwritten rows dropped, TensorBoard events from ``purge_step`` on
        purged."""
        for p in parts(self.path)[keep:]:
            p.unlink()
        self.parts, self.rows = keep, []
        if self.writer is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer.close()
            self.writer = SummaryWriter(log_dir=str(self.dir / "tb"), purge_step=purge_step)

    def table(self) -> pa.Table:
        """Every row of the run so far (flushed first), read back from disk."""
        self.flush()
        if not self.parts:
            return pa.Table.from_pylist([], schema=self.schema or self._schema([]))
        return pq.read_table(self.path)

    # ------------------------------------------------------------ TensorBoard
    def scalars(self, step: int, values: Mapping[str, float], *, virtual_s: float | None = None) -> None:
        """Scalars at aggregation ``step``; with ``virtual_s`` each tag is also written as
        ``<tag>@virtual_s``: the same step, and the virtual second (exact, not rounded) as its time,
        so TensorBoard's *Relative* horizontal axis plots it against virtual time (from the first
        point; *Wall* shows the virtual clock as a date from 1970-01-01 00:00:00). A step, unlike a
        time, is what a resumed run's purge of events after its checkpoint goes by."""
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is None:
                continue
            self.writer.add_scalar(tag, float(v), int(step))
            if virtual_s is not None:
                self.writer.add_scalar(f"{tag}@virtual_s", float(v), int(step), walltime=float(virtual_s))

    def hparams(self, hp: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """One HParams session (``hp``, with ``metrics`` written as scalars at step 0)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        for part in hparams(dict(hp), dict(metrics)):
            self.writer.file_writer.add_summary(part)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, 0)

    def text(self, tag: str, text: str, step: int) -> None:
        """A Markdown text summary (TensorBoard's Text tab)."""
        if self.writer is not None:
            self.writer.add_text(tag, text, int(step))

    def histogram(self, tag: str, values: Iterable[float], step: int) -> None:
        values = list(values)
        if self.writer is not None and len(values):
            import numpy as np

            self.writer.add_histogram(tag, np.asarray(values, dtype=np.float64), int(step))

    def close(self, summary: Mapping | None = None) -> None:
        self.flush()
        if summary is not None:
            write_json(self.dir / "summary.json", summary)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
