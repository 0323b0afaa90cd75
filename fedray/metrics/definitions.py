"""Metric definitions shared by every method (computed from the event table).

SDIR (slow-device inclusion ratio; every metric is explained in docs/metrics.md): a device is *slow* when
its speed factor is below 0.8. Each dispatch is resolved in an aggregation
*window* (the model version the server had when the update arrived, was
dropped or was discarded). Per window: the fraction of the slow devices'
dispatches resolved there whose update was actually aggregated (event
``update``; ``drop``, ``late`` and ``reject`` are not). SDIR is the mean over
the windows that saw at least one slow dispatch, or 1.0 when no slow device
was ever selected (nothing was excluded). ``slow_coverage`` is the mean over
windows of the fraction of *all* slow devices that contributed in the window.

SDIR counts an update as included even when the server then discarded some of its layers
(CLAMP aggregates only the depth every client trained; MA-CLAMP only layers trained by
enough clients). ``sdir_layers`` is the layer-level inclusion: per window, the layers the
slow devices' resolved dispatches trained that were actually aggregated (``layers_included``
of each row) over all the layers they trained (``layers``; a dropped or rejected dispatch
trained its layers for nothing), and the mean over the windows that saw a slow dispatch
(1.0 when no slow device was selected).
"""
from __future__ import annotations

import math

import pyarrow as pa

RESOLVED = ("update", "drop", "late", "reject")


def _col(df, name, default=None):
    return df[name] if name in df.columns else default


def sdir(df, slow_total: int) -> tuple[float, float]:
    """(SDIR, slow coverage) from an event DataFrame with ``event, slow, window, client_id``."""
    if "slow" not in df.columns or len(df) == 0:
        return 1.0, 0.0
    res = df[df["event"].isin(RESOLVED) & (df["slow"] == True)]  # noqa: E712
    if len(res) == 0:
        return 1.0, 0.0
    g = res.groupby("window")
    ratio = g.apply(lambda x: float((x["event"] == "update").mean()), include_groups=False)
    cover = g.apply(lambda x: x.loc[x["event"] == "update", "client_id"].nunique(), include_groups=False)
    coverage = float((cover / slow_total).mean()) if slow_total else 0.0
    return float(ratio.mean()), coverage


def sdir_layers(df) -> float:
    """Layer-level SDIR (see the module docstring) from ``event, slow, window, layers, layers_included``."""
    if "layers" not in df.columns or len(df) == 0:
        return 1.0
    res = df[df["event"].isin(RESOLVED) & (df["slow"] == True)]  # noqa: E712
    if len(res) == 0:
        return 1.0
    g = res.groupby("window")[["layers", "layers_included"]].sum()
    g = g[g["layers"] > 0]
    return float((g["layers_included"] / g["layers"]).mean()) if len(g) else 1.0


def summarize(table: pa.Table, *, slow_total: int, metric: str = "accuracy") -> dict:
    """Derived summary metrics: SDIR (update and layer level), participation by tier,
    staleness, FLOPs per point of the task's primary metric."""
    df = table.to_pandas()
    out: dict = {}
    out["sdir"], out["slow_coverage"] = sdir(df, slow_total)
    out["sdir_layers"] = sdir_layers(df)
    ups = df[df["event"] == "update"] if len(df) else df
    if "tier" in df.columns and len(df):
        disp = df[df["event"].isin(RESOLVED)].groupby("tier").size()
        agg = ups.groupby("tier").size()
        out["participation_by_tier"] = {str(t): {"dispatched": int(disp.get(t, 0)), "aggregated": int(agg.get(t, 0))}
                                        for t in sorted(disp.index)}
    if "staleness" in df.columns and len(ups):
        s = ups["staleness"].dropna().astype(int)
        out["staleness_hist"] = {str(k): int(v) for k, v in s.value_counts().sort_index().items()}
        out["staleness_mean"] = float(s.mean()) if len(s) else 0.0
    if "compact_flops" in df.columns and len(df):
        out.update(compact_by_client(df[df["event"].isin(RESOLVED)]))
    ev = df[df["event"] == "eval"] if len(df) else df
    if len(ev) and metric in ev.columns:
        best = float(ev[metric].max())
        flops = float(df["train_flops"].fillna(0).sum())
        out["flops_per_accuracy_point"] = flops / (100 * best) if best > 0 else math.inf
    return out


def compact_by_client(rows) -> dict:
    """Every client's compact model (the ``compact_flops`` / ``compact_params`` its dispatches
    recorded; a client's keep ratio is fixed, so the last one): ``compact_by_client`` =
    ``{client: {"flops": forward FLOPs per example, "params": trainable parameters}}`` and the
    means over the clients, ``compact_flops_mean`` / ``compact_params_mean``."""
    rows = rows.dropna(subset=["compact_flops"])
    if not len(rows):
        return {}
    last = rows.groupby("client_id")[["compact_flops", "compact_params"]].last()
    per = {str(int(c)): {"flops": int(r["compact_flops"]), "params": int(r["compact_params"])}
           for c, r in last.iterrows()}
    return {"compact_by_client": per, "compact_flops_mean": float(last["compact_flops"].mean()),
            "compact_params_mean": float(last["compact_params"].mean())}
