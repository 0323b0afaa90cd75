"""The report's plots: test accuracy against virtual time, bytes and training FLOPs.

Conventions:

- One colour per method label. Several seeds of a label are drawn as one line, their *mean*,
  with a shaded band from the *minimum to the maximum* over the seeds (the legend says so).
  The seeds are put on a common x grid first: the union of their x values from the latest first
  evaluation on, each seed linearly interpolated between its evaluations and holding its last
  accuracy after its end (a finished run keeps its final model). One seed is one plain line.
- Axes in human units: the data are divided by a unit chosen from the largest value (B, kB, MB,
  GB, TB; FLOP, kFLOP ... PFLOP; s, min, h) and the unit is written in the axis label, so
  matplotlib never shows a ``1e9`` offset.
- Every plot has a title naming what it shows and the experiment(s).

This module knows nothing of run folders: :mod:`fedray.report` hands it, per label, the curves
of its seeds (``{"accuracy", "virtual_s", "bytes", "train_flops"}`` arrays).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# (x key, axis quantity, unit family, title, file name)
PLOTS = (("virtual_s", "virtual time", "seconds", "Test accuracy vs virtual time", "accuracy_vs_virtual_time.png"),
         ("bytes", "bytes up + down", "bytes", "Test accuracy vs communication", "accuracy_vs_bytes.png"),
         ("train_flops", "training compute", "flops", "Test accuracy vs training compute", "accuracy_vs_flops.png"))

BAND = "band: min–max over seeds"
_DECIMAL = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def human_unit(vmax: float, family: str) -> tuple[float, str]:
    """(divisor, unit) so that ``vmax / divisor`` reads well: bytes -> kB/MB/GB/TB (decimal),
    flops -> kFLOP ... PFLOP, seconds -> s / min (>= 2 min) / h (>= 2 h)."""
    v = abs(float(vmax)) if np.isfinite(vmax) else 0.0
    if family == "seconds":
        return (3600.0, "h") if v >= 7200 else (60.0, "min") if v >= 120 else (1.0, "s")
    base = {"bytes": "B", "flops": "FLOP"}[family]
    for factor, prefix in _DECIMAL:
        if v >= factor:
            return factor, prefix + base
    return 1.0, base


def mean_band(seeds: list[dict], xkey: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, min, max) of accuracy over seeds on their common grid (see module doc)."""
    series = [(np.asarray(c[xkey], float), np.asarray(c["accuracy"], float)) for c in seeds]
    series = [(x[np.isfinite(y)], y[np.isfinite(y)]) for x, y in series]
    series = [(x[np.argsort(x, kind="stable")], y[np.argsort(x, kind="stable")]) for x, y in series if len(x)]
    if not series:
        return (np.empty(0),) * 4
    start = max(x[0] for x, _ in series)
    grid = np.unique(np.concatenate([x for x, _ in series]))
    grid = grid[grid >= start]
    ys = np.stack([np.interp(grid, x, y) for x, y in series])  # np.interp holds the last value after the end
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def figures(groups: dict[str, list[dict]], experiments: list[str]):
    """One matplotlib figure per entry of :data:`PLOTS`: ``[(file name, figure), ...]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where = ", ".join(experiments)
    out = []
    for xkey, quantity, family, title, fname in PLOTS:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        curves = {name: [c for c in seeds if c and len(c["accuracy"])] for name, seeds in groups.items()}
        vmax = max((float(np.nanmax(c[xkey])) for cs in curves.values() for c in cs if len(c[xkey])), default=0.0)
        div, unit = human_unit(vmax, family)
        banded = False
        for i, (name, cs) in enumerate(curves.items()):
            if not cs:
                continue
            color = f"C{i % 10}"
            x, mean, lo, hi = mean_band(cs, xkey)
            label = name if len(cs) == 1 else f"{name} (mean of {len(cs)} seeds)"
            ax.plot(x / div, mean, color=color, lw=1.6, marker="." if len(x) < 3 else None, label=label)
            if len(cs) > 1:
                ax.fill_between(x / div, lo, hi, color=color, alpha=0.2, lw=0)
                banded = True
        ax.ticklabel_format(axis="both", style="plain", useOffset=False)
        ax.set_xlabel(f"{quantity} ({unit})")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{title} — {where}", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title=BAND if banded else None, title_fontsize=7)
        fig.tight_layout()
        out.append((fname, fig))
    return out


def plot(groups: dict[str, list[dict]], experiments: list[str], out: Path) -> list[Path]:
    """Write the PNGs of :func:`figures` into ``out``; returns their paths."""
    import matplotlib.pyplot as plt

    paths = []
    for fname, fig in figures(groups, experiments):
        p = Path(out) / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
