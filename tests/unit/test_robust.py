"""Robust rules (fedray.aggregation.robust): hand-computed values, masked coverage, Krum's
error, and the properties the rules promise (permutation invariance, close to the mean on a
symmetric honest set, inside the honest coordinate-wise hull)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedray.aggregation import robust
from fedray.aggregation.robust import Stack


def stack(rows, cover=None, w=None) -> Stack:
    u = np.asarray(rows, dtype=np.float64)
    if u.ndim == 1:
        u = u[:, None]
    c = None if cover is None else np.asarray(cover, bool).reshape(u.shape)
    if c is not None:
        u = np.where(c, u, 0.0)
    return Stack({"w": u}, {"w": c}, np.ones(len(u)) if w is None else np.asarray(w, dtype=np.float64))


def test_weighted_mean_per_coordinate_over_the_covering_updates():
    s = stack([[1.0, 10.0], [3.0, 0.0]], cover=[[1, 1], [1, 0]], w=[1, 3])
    np.testing.assert_allclose(robust.weighted_mean(s)["w"], [(1 + 9) / 4, 10.0])


def test_coordinate_median_hand_values():
    assert robust.coordinate_median(stack([1, 2, 3, 10]))["w"][0] == 2.5  # even: the midpoint
    assert robust.coordinate_median(stack([1, 5, 2]))["w"][0] == 2
    assert robust.coordinate_median(stack([1, 2, 3], w=[1, 1, 3]))["w"][0] == 3  # weighted
    # masked: coordinate 1 is covered by the first two only -> median of (10, 20)
    s = stack([[1, 10], [2, 20], [3, 1e9]], cover=[[1, 1], [1, 1], [1, 0]])
    np.testing.assert_allclose(robust.coordinate_median(s)["w"], [2, 15])


def test_trimmed_mean_hand_values():
    assert robust.trimmed_mean(stack([1, 2, 3, 100]), 0.25)["w"][0] == 2.5  # floor(0.25 x 4) = 1 cut each end
    assert robust.trimmed_mean(stack([1, 2, 3, 100]), 0.2)["w"][0] == 26.5  # floor(0.8) = 0: the mean
    # masked: a coordinate covered by 4 of 5 trims floor(0.25 x 4) = 1 of those 4
    s = stack([[1, 1], [2, 2], [3, 3], [4, 100], [5, 7]], cover=[[1, 1], [1, 1], [1, 1], [1, 1], [1, 0]])
    np.testing.assert_allclose(robust.trimmed_mean(s, 0.25)["w"], [3.0, 2.5])
    with pytest.raises(ValueError, match="beta"):
        robust.trimmed_mean(s, 0.5)


def test_krum_and_multi_krum_hand_values():
    s = stack([0, 1, 2, 10, 11])  # n = 5, f = 1: the 2 nearest
    np.testing.assert_allclose(robust.krum_scores(s, 1), [5, 2, 5, 65, 82])
    assert robust.multi_krum(s, 1, 1).tolist() == [1]
    assert robust.multi_krum(s, 1, 3).tolist() == [0, 1, 2]
    assert robust.multi_krum(s, 1).tolist() == [0, 1, 2, 3]  # m = n - f


def test_krum_needs_more_than_2f_plus_2_updates():
    with pytest.raises(ValueError, match=r"more than 2f\+2 = 6"):
        robust.krum_scores(stack([0, 1, 2, 3, 4, 5]), 2)


def test_geometric_median_hand_values():
    assert robust.geometric_median(stack([0, 1, 10]))["w"][0] == pytest.approx(1.0, abs=1e-4)  # 1-D: the median
    tri = stack([[0, 0], [2, 0], [1, math.sqrt(3)]])  # equilateral: the centroid
    np.testing.assert_allclose(robust.geometric_median(tri, iters=200, tol=1e-12)["w"], [1, 1 / math.sqrt(3)], atol=1e-5)


def test_centered_clipping_hand_values():
    # one iteration from 0 with tau = 1: clip(0), clip(0), clip(10) = 0, 0, 1 -> mean 1/3
    assert robust.centered_clipping(stack([0, 0, 10]), 1.0, iters=1)["w"][0] == pytest.approx(1 / 3)
    # from the previous aggregate 0.5: diffs -0.5, -0.5, 9.5 -> -0.5, -0.5, 1 -> 0.5 + 0
    assert robust.centered_clipping(stack([0, 0, 10]), 1.0, 1, {"w": np.array([0.5])})["w"][0] == pytest.approx(0.5)


def test_clip_factors_and_the_adaptive_bound():
    np.testing.assert_allclose(robust.clip_factors([0.5, 2.0, 0.0], 1.0), [1.0, 0.5, 1.0])
    assert robust.norm_quantile([1, 2, 3, 4], 0.5) == 2.5
    s = stack([[3.0, 4.0]]).scaled(robust.clip_factors([5.0], 1.0))
    np.testing.assert_allclose(s.norms(), [1.0])


def test_low_coverage_keeps_the_value_or_falls_back_to_the_mean():
    s = stack([[1, 4], [2, 0], [3, 0]], cover=[[1, 1], [1, 0], [1, 0]])
    med = robust.coordinate_median(s)
    np.testing.assert_allclose(robust.low_coverage(s, med, 2, "keep")["w"], [2, 0])  # 1 covering < 2: no move
    np.testing.assert_allclose(robust.low_coverage(s, med, 2, "mean")["w"], [2, 4])


def test_an_uncovered_coordinate_does_not_move():
    s = stack([[1, 5], [2, 6]], cover=[[1, 0], [1, 0]])
    for r in (robust.coordinate_median(s), robust.trimmed_mean(s, 0.1), robust.geometric_median(s),
              robust.centered_clipping(s, 1.0)):
        assert r["w"][1] == 0


# ------------------------------------------------------------------ properties

RULES = {
    "median": lambda s: robust.coordinate_median(s),
    "trimmed_mean": lambda s: robust.trimmed_mean(s, 0.2),
    "geometric_median": lambda s: robust.geometric_median(s, iters=50, tol=1e-10),
    "centered_clipping": lambda s: robust.centered_clipping(s, 1.0, 3),
}

rows = st.lists(st.lists(st.floats(-100, 100, allow_nan=False), min_size=3, max_size=3), min_size=5, max_size=9)


@settings(max_examples=40, deadline=None)
@given(rows, st.randoms(use_true_random=False))
def test_every_rule_is_permutation_invariant(data, rnd):
    perm = list(range(len(data)))
    rnd.shuffle(perm)
    a, b = stack(data), stack([data[i] for i in perm])
    for name, rule in RULES.items():
        np.testing.assert_allclose(rule(a)["w"], rule(b)["w"], atol=1e-6, err_msg=name)
    f = (len(data) - 3) // 2
    sel_a = {tuple(data[i]) for i in robust.multi_krum(a, f)}
    sel_b = {tuple(data[perm[i]]) for i in robust.multi_krum(b, f)}
    if len(set(map(tuple, data))) == len(data) and len(set(robust.krum_scores(a, f).round(9))) == len(data):
        assert sel_a == sel_b


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=3, max_size=3), st.floats(0.1, 5))
def test_a_symmetric_honest_set_gives_its_mean(center, spread):
    c = np.asarray(center)
    pts = [c + spread * e for e in np.eye(3)] + [c - spread * e for e in np.eye(3)]
    s = stack(pts)
    for name, rule in RULES.items():
        if name == "centered_clipping":
            continue  # it starts from the previous aggregate and moves at most tau per round
        np.testing.assert_allclose(rule(s)["w"], c, atol=1e-4, err_msg=name)
    kept = robust.weighted_mean(s.take(robust.multi_krum(s, 1)))["w"]  # 5 of the 6: within spread / 5
    assert np.linalg.norm(kept - c) <= spread / 5 + 1e-9


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=2), min_size=6, max_size=10),
       st.lists(st.floats(-1e9, 1e9, allow_nan=False), min_size=2, max_size=2))
def test_median_and_trimmed_mean_stay_in_the_honest_hull(honest, attack):
    h = np.asarray(honest)
    f = 1 if len(h) < 8 else 2
    f = min(f, int(np.floor(0.25 * (len(h) + f))))  # trimmed mean with beta 0.25 promises f <= floor(beta n)
    s = stack(np.vstack([h, np.tile(attack, (f, 1))]))
    lo, hi = h.min(axis=0) - 1e-9, h.max(axis=0) + 1e-9
    for r in (robust.coordinate_median(s)["w"], robust.trimmed_mean(s, 0.25)["w"]):
        assert np.all(r >= lo) and np.all(r <= hi)
