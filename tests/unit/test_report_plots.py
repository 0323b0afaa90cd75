"""fedray.report_plots: titles, one mean line + min-max band per method, human units (no Ray)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedray import report_plots as P  # noqa: E402


def seed_curve(acc, xs):
    x = np.asarray(xs, float)
    return {"accuracy": np.asarray(acc, float), "virtual_s": x, "bytes": x * 2.0e8, "train_flops": x * 3.0e11}


@pytest.mark.parametrize("vmax,family,unit,div", [
    (512, "bytes", "B", 1.0), (2.5e6, "bytes", "MB", 1e6), (3.2e9, "bytes", "GB", 1e9), (4e12, "bytes", "TB", 1e12),
    (9e8, "flops", "MFLOP", 1e6), (7e9, "flops", "GFLOP", 1e9), (5e12, "flops", "TFLOP", 1e12),
    (90, "seconds", "s", 1.0), (300, "seconds", "min", 60.0), (9000, "seconds", "h", 3600.0)])
def test_human_units(vmax, family, unit, div):
    assert P.human_unit(vmax, family) == (div, unit)


def test_mean_band_interpolates_and_holds_the_last_value():
    a = {"accuracy": np.array([0.2, 0.6]), "virtual_s": np.array([1.0, 3.0])}
    b = {"accuracy": np.array([0.4, 0.8, 0.9]), "virtual_s": np.array([1.0, 2.0, 4.0])}
    x, mean, lo, hi = P.mean_band([a, b], "virtual_s")
    np.testing.assert_allclose(x, [1, 2, 3, 4])
    ya = [0.2, 0.4, 0.6, 0.6]           # interpolated at 2, held after its end at 3
    yb = [0.4, 0.8, 0.85, 0.9]
    np.testing.assert_allclose(mean, np.mean([ya, yb], axis=0))
    np.testing.assert_allclose(lo, np.minimum(ya, yb))
    np.testing.assert_allclose(hi, np.maximum(ya, yb))


def test_one_titled_mean_line_and_band_per_method_in_human_units():
    groups = {"fedavg": [seed_curve([0.2, 0.5, 0.7], [1, 2, 3]), seed_curve([0.3, 0.6, 0.8], [1, 2, 3]),
                         seed_curve([0.1, 0.4, 0.9], [1, 2, 3])],
              "clamp": [seed_curve([0.3, 0.5], [1, 3])]}
    figs = P.figures(groups, ["exp"])
    assert [f for f, _ in figs] == [p[-1] for p in P.PLOTS]
    units = {"accuracy_vs_virtual_time.png": "(s)", "accuracy_vs_bytes.png": "(MB)",
             "accuracy_vs_flops.png": "(GFLOP)"}
    try:
        for fname, fig in figs:
            ax = fig.axes[0]
            fig.canvas.draw()
            assert ax.get_title().startswith("Test accuracy vs") and "exp" in ax.get_title()
            lines = ax.get_lines()
            assert len(lines) == 2  # one mean line per method, not one per seed
            assert len({ln.get_color() for ln in lines}) == 2
            np.testing.assert_allclose(lines[0].get_ydata(), [0.2, 0.5, 0.8])  # mean of the three seeds
            assert len(ax.collections) == 1  # the band of the 3-seed method; one seed has none
            legend = ax.get_legend()
            assert "min–max" in legend.get_title().get_text()
            assert "fedavg (mean of 3 seeds)" in [t.get_text() for t in legend.get_texts()]
            assert ax.get_xlabel().endswith(units[fname])
            assert ax.xaxis.get_offset_text().get_text() == ""  # no 1e9 offset
            assert max(lines[0].get_xdata()) <= 1000
    finally:
        for _, fig in figs:
            plt.close(fig)
