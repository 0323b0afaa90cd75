"""Rebuild the comparison report (Markdown table, CSV, PNG plots) from run folders.

No retraining: everything comes from each run's ``summary.json``,
``metrics.parquet`` and ``config.yaml``.

Conventions:

- A *run folder* is a folder named ``<label>-s<seed>-<hash>`` (``-r<n>`` after it
  for a re-run; older fedray wrote ``<label>-s<seed>``) holding ``summary.json``
  (what ``fedray run`` and ``fedray compare`` write, see :mod:`fedray.runs`).
  Folders with other names (for example the ``run/`` folders inside Tune
  trials) are not runs of a comparison and are skipped.
- Runs are grouped by (experiment, label, config): the label is the method name
  or the ``label`` a compare config gave a method entry, the config is the hash
  of the run's ``config.yaml`` without its seed (:func:`fedray.runs.config_hash`;
  the folder name's hash when there is no ``config.yaml``), so runs that differ in
  anything but the seed are separate rows; rows that share a label are told apart
  by the config fields they differ in (``fedavg (train.lr=0.1)``). Of several
  runs of one config and seed (re-runs) the latest completed one counts.
- A cell is ``mean ± std`` over the group's seeds; std is the sample standard
  deviation (ddof=1), omitted for a single seed. Keys a summary lacks (or
  holds as null/NaN) are left out of the mean; a metric no run has is ``—``.
- Time to target: ``summary.json``'s ``time_to_target_s`` when present (null =
  not reached); otherwise the first evaluation's virtual second at which
  accuracy >= ``server.target_accuracy`` of the run's ``config.yaml``. Seeds
  that never reach it are excluded from the mean and counted: ``12.3 ± 1.0
  (2/3 reached)``; ``not reached`` when none did; ``—`` without a target.
- Plots (:mod:`fedray.report_plots`): evaluation accuracy against virtual
  seconds, cumulative bytes (up + down) and cumulative training FLOPs, all read
  from ``metrics.parquet`` in event order; per label the mean over its seeds
  with a min–max band, one colour per label, axes in human units, titled.
- ``report.html`` (:mod:`fedray.report_html`): the same table and plots in one
  file with the images inlined (no external resources; opens offline).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedray import report_html, report_plots
from fedray import runs as RUNS
from fedray.errors import DataError

DASH = "—"

# (column title, summary key, value kind)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("final accuracy", "final_accuracy", "accuracy"),
    ("time to target (virtual s)", "time_to_target_s", "seconds"),
    ("training FLOPs", "train_flops", "count"),
    ("bytes up", "bytes_up", "bytes"),
    ("bytes down", "bytes_down", "bytes"),
    ("SDIR", "sdir", "ratio"),
    ("layer SDIR", "sdir_layers", "ratio"),
    ("energy (J)", "energy_j", "joules"),
)


@dataclass
class RunRecord:
    """One run folder read back from disk."""

    path: Path
    experiment: str
    label: str
    seed: int
    summary: dict
    config: dict = field(default_factory=dict)
    config_hash: str | None = None
    rerun: int = 1

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or (self.config.get("method") or {}).get("name") or self.label)

    def value(self, key: str):
        """A summary number, or None when missing / null / NaN (time to target: see module doc)."""
        if key == "time_to_target_s" and key not in self.summary:
            return time_to_target(self)
        v = self.summary.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        return None if math.isnan(v) else v

    def events(self):
        """The run's event table as a pandas DataFrame (empty when the file is missing)."""
        import pandas as pd
        import pyarrow.parquet as pq

        p = self.path / "metrics.parquet"  # a folder of parts (a single file from older runs)
        if not p.exists():
            return pd.DataFrame()
        return pq.read_table(p).to_pandas()


def configured_target(rec: RunRecord) -> float | None:
    """``server.target_accuracy`` from the run's ``config.yaml``, or None."""
    t = (rec.config.get("server") or {}).get("target_accuracy")
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None


def target_known(rec: RunRecord) -> bool:
    """Whether time to target is defined for this run (summary has it, or a target is configured)."""
    return "time_to_target_s" in rec.summary or configured_target(rec) is not None


def time_to_target(rec: RunRecord) -> float | None:
    """First evaluation's virtual second with accuracy >= the configured target; None when not
    reached or no target is configured."""
    target = configured_target(rec)
    if target is None:
        return None
    df = rec.events()
    if df.empty or "event" not in df.columns:
        return None
    ev = df[df["event"] == "eval"]
    hit = ev[ev["accuracy"] >= target]
    return float(hit["virtual_s"].iloc[0]) if len(hit) else None


def find_runs(root: str | Path) -> list[RunRecord]:
    """Every run folder under ``root`` (``root`` itself may be one), sorted by experiment, label, seed."""
    import yaml

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"runs folder '{root}' does not exist")
    out = []
    for s in sorted(root.rglob("summary.json")):
        d = s.parent
        m = RUNS.parse(d.name)
        if not m:
            continue
        try:
            summary = json.loads(s.read_text())
        except (OSError, json.JSONDecodeError):
            raise DataError(f"'{s}' is not valid JSON") from None
        cfg = {}
        cp = d / "config.yaml"
        if cp.is_file():
            try:
                cfg = yaml.safe_load(cp.read_text()) or {}
            except yaml.YAMLError:
                raise DataError(f"'{cp}' is not valid YAML") from None
        exp = str(summary.get("experiment") or cfg.get("experiment") or d.parent.name)
        digest = RUNS.config_hash(cfg) if cfg else m["hash"]
        out.append(RunRecord(d, exp, m["label"], m["seed"], summary, cfg, digest, m["rerun"]))
    out.sort(key=lambda r: (r.experiment, r.label, r.config_hash or "", r.seed, r.rerun))
    return latest(out)


def latest(records: list[RunRecord]) -> list[RunRecord]:
    """One run per (experiment, label, config, seed): the latest completed one, else the latest."""
    best: dict[tuple, RunRecord] = {}
    for r in records:
        key = (r.experiment, r.label, r.config_hash, r.seed)
        old = best.get(key)
        if old is None or (r.summary.get("status", "completed") == "completed",
                           r.rerun) >= (old.summary.get("status", "completed") == "completed", old.rerun):
            best[key] = r
    keep = {id(r) for r in best.values()}
    return [r for r in records if id(r) in keep]


def _flat(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif f"{prefix}{k}" not in ("seed", "experiment"):
            out[f"{prefix}{k}"] = v
    return out


def group(records: list[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    """(experiment, shown label) -> its runs (one config, its seeds), in first-seen order. A label
    that several configs share gets the fields they differ in (at most 3) or their hash appended."""
    by_cfg: dict[tuple, list[RunRecord]] = {}
    for r in records:
        by_cfg.setdefault((r.experiment, r.label, r.config_hash), []).append(r)
    out: dict[tuple[str, str], list[RunRecord]] = {}
    for (exp, label, digest), runs in by_cfg.items():
        rivals = [v[0] for (e, lb, _), v in by_cfg.items() if (e, lb) == (exp, label)]
        name = label
        if len(rivals) > 1:
            flats = [_flat(x.config) for x in rivals]
            mine = _flat(runs[0].config)
            keys = sorted(k for k in set().union(*flats) if len({repr(f.get(k)) for f in flats}) > 1)
            shown = ", ".join(f"{k}={mine.get(k)}" for k in keys[:3])
            name = f"{label} ({shown or digest})"
        out[(exp, name)] = runs
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def fmt(x: float, kind: str) -> str:
    """One number in a table cell."""
    if kind == "accuracy":
        return f"{x:.4f}"
    if kind == "ratio":
        return f"{x:.3f}"
    if kind in ("seconds", "joules"):
        return f"{x:.4g}"
    if kind == "bytes":
        return _si(x, "B")
    return _si(x)


def cell(values: list, kind: str, *, n_total: int | None = None, target_known: bool = True) -> str:
    """``mean ± std`` over the non-missing values (see module doc for time to target)."""
    present = [v for v in values if v is not None]
    if kind == "seconds" and not target_known:
        return DASH
    if not present:
        return "not reached" if kind == "seconds" else DASH
    m, s = mean_std(present)
    text = fmt(m, kind) if s is None else f"{fmt(m, kind)} ± {fmt(s, kind)}"
    total = len(values) if n_total is None else n_total
    if kind == "seconds" and len(present) < total:
        text += f" ({len(present)}/{total} reached)"
    return text


def aggregate(records: list[RunRecord]) -> list[dict]:
    """One row per (experiment, label): raw per-seed values and their mean/std per column key."""
    rows = []
    for (exp, label), runs in group(records).items():
        row = {"experiment": exp, "label": label, "method": runs[0].method, "seeds": [r.seed for r in runs],
               "values": {}, "target_known": any(target_known(r) for r in runs)}
        for _, key, _ in COLUMNS:
            row["values"][key] = [r.value(key) for r in runs]
        rows.append(row)
    return rows


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The table as text cells: (header, one list of cells per method label)."""
    many = len({r["experiment"] for r in rows}) > 1
    head = (["experiment"] if many else []) + ["method", "seeds"] + [c[0] for c in COLUMNS]
    body = []
    for r in rows:
        cells = ([r["experiment"]] if many else []) + [r["label"], str(len(r["seeds"]))]
        for _, key, kind in COLUMNS:
            cells.append(cell(r["values"][key], kind, target_known=r["target_known"]))
        body.append(cells)
    return head, body


def markdown(rows: list[dict]) -> str:
    """The Markdown table (one row per method label)."""
    head, body = table_cells(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    """Machine-readable table: ``<key>_mean``, ``<key>_std`` (empty when undefined), ``<key>_n``."""
    keys = [c[1] for c in COLUMNS]
    header = ["experiment", "label", "method", "seeds"]
    for k in keys:
        header += [f"{k}_mean", f"{k}_std", f"{k}_n"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            line = [r["experiment"], r["label"], r["method"], " ".join(map(str, r["seeds"]))]
            for k in keys:
                present = [v for v in r["values"][k] if v is not None]
                if present:
                    m, s = mean_std(present)
                    line += [repr(m), "" if s is None else repr(s), len(present)]
                else:
                    line += ["", "", 0]
            w.writerow(line)


def curves(rec: RunRecord) -> dict[str, np.ndarray]:
    """Evaluation accuracy with virtual seconds, cumulative bytes (up + down) and cumulative training FLOPs."""
    df = rec.events()
    if df.empty or "event" not in df.columns:
        return {}
    zero = np.zeros(len(df))
    up = df["bytes_up"].fillna(0).to_numpy(float) if "bytes_up" in df else zero
    down = df["bytes_down"].fillna(0).to_numpy(float) if "bytes_down" in df else zero
    flops = df["train_flops"].fillna(0).to_numpy(float) if "train_flops" in df else zero
    is_eval = (df["event"] == "eval").to_numpy()
    return {"accuracy": df["accuracy"].to_numpy(float)[is_eval],
            "virtual_s": df["virtual_s"].to_numpy(float)[is_eval],
            "bytes": np.cumsum(up + down)[is_eval],
            "train_flops": np.cumsum(flops)[is_eval]}


def plot(records: list[RunRecord], out: Path) -> list[Path]:
    """The three PNGs of :mod:`fedray.report_plots` (mean and min–max band over seeds per label)."""
    many = len({r.experiment for r in records}) > 1
    groups = {(f"{exp}/{label}" if many else label): [curves(r) for r in runs]
              for (exp, label), runs in group(records).items()}
    return report_plots.plot(groups, sorted({r.experiment for r in records}), out)


def compact_section(records: list[RunRecord]) -> list[str]:
    """Markdown lines listing every client's compact model (``compact_by_client`` of the runs that
    train physically smaller models, e.g. CA-HFP): per method label, the distinct sizes and the
    clients that train each (the first seed's run; a client's size does not depend on the seed)."""
    lines = []
    for (exp, label), runs in group(records).items():
        per = runs[0].summary.get("compact_by_client")
        if not isinstance(per, dict) or not per:
            continue
        sizes: dict[tuple, list[int]] = {}
        for c, v in per.items():
            sizes.setdefault((int(v["flops"]), int(v["params"])), []).append(int(c))
        for (flops, params), clients in sorted(sizes.items(), reverse=True):
            lines.append(f"| {label} | {fmt(flops, 'count')} | {fmt(params, 'count')} | "
                         f"{len(clients)}: {', '.join(map(str, sorted(clients)))} |")
    if not lines:
        return []
    return ["Compact model of every client (forward FLOPs per example, trainable parameters):", "",
            "| method | FLOPs | parameters | clients |", "|---|---|---|---|", *lines, ""]


def write_report(root: str | Path, out: str | Path | None = None, *, only=None) -> dict:
    """Read every run folder under ``root`` and write ``report.md``, ``report.csv`` and the plots
    into ``out`` (default ``<root>/report``). ``only`` (run folder paths) restricts the report to
    those runs (``fedray compare`` passes its own). Returns the paths and the aggregated rows."""
    records = find_runs(root)
    if only is not None:
        keep = {Path(x).resolve() for x in only}
        records = [r for r in records if r.path.resolve() in keep]
    if not records:
        raise DataError(f"no run folders (<method>-s<seed>-<hash>/summary.json) under '{root}'")
    out = Path(out) if out is not None else Path(root) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    table = markdown(rows)
    plots = plot(records, out)
    exps = sorted({r.experiment for r in records})
    title = f"fedray report: {', '.join(exps)}"
    intro = f"{len(records)} runs from {root}; table cells are mean ± std over seeds (sample std)."
    md = [f"# {title}", "", intro.replace(str(root), f"`{root}`"), "", table]
    glossary = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
    explained = "Every metric (SDIR, time to target, sparse FLOPs, energy, ...) is explained in docs/metrics.md"
    md += [f"{explained.replace('docs/metrics.md', f'[docs/metrics.md]({glossary})')}.", ""]
    md += compact_section(records)
    for p in plots:
        md += [f"![{p.stem}]({p.name})", ""]
    md += [f"Plots: the mean over seeds per method; {report_plots.BAND}.", ""]
    (out / "report.md").write_text("\n".join(md))
    write_csv(rows, out / "report.csv")
    page = report_html.write(out / "report.html", title, f"{intro} {explained} ({glossary}).", *table_cells(rows),
                             plots, f"Mean over seeds per method; {report_plots.BAND}.")
    return {"dir": out, "markdown": out / "report.md", "csv": out / "report.csv", "html": page, "plots": plots,
            "rows": rows, "table": table, "runs": len(records)}
