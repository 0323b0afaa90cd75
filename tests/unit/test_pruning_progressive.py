"""PR-FL: FIFO, allocation, recovery, plateau, importance, nested masks, residual split."""
import math

import numpy as np
import pytest
import torch

from fedray.models import build_model, model_spec
from fedray.pruning.magnitude import global_ranking, magnitude_scores, prunable_keys, top_mask
from fedray.pruning.progressive import (Plateau, RoundTimeFifo, allocate_densities, importance_scores,
                                        nested_masks, plateau_update, recovery_step, residual_split)
from fedray.channel import Channel
from fedray.submodel import masks
from fedray.submodel.encode import payload_nbytes


def test_fifo_keeps_last_i_and_is_immutable():
    f0 = RoundTimeFifo(3)
    f = f0
    for t in [1.0, 2.0, 3.0, 4.0]:
        f = f.push(7, t)
    f = f.push(2, 10.0)
    assert f0.entries == ()
    assert f.times(7) == (2.0, 3.0, 4.0) and f.times(1) == ()
    assert f.means() == {2: 10.0, 7: 3.0}
    with pytest.raises(ValueError):
        f.push(1, 0.0)


def test_allocate_densities_by_hand():
    rho = allocate_densities(np.array([2.0, 4.0, 8.0, 40.0]), 0.1)
    assert rho == pytest.approx([1.0, 0.5, 0.25, 0.1])
    d = allocate_densities({3: 2.0, 5: 10.0}, {3: 0.1, 5: 0.3})
    assert d == pytest.approx({3: 1.0, 5: 0.3})
    assert allocate_densities([1.0, 4.0], [0.0, 0.5]) == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError):
        allocate_densities([1.0, -1.0], 0.1)


def test_recovery_step():
    assert recovery_step(0.1) == 0.3
    assert recovery_step(0.9) == 1.0
    assert recovery_step(np.array([0.1, 0.5, 1.0]), 0.2) == pytest.approx([0.3, 0.7, 1.0])


def test_plateau():
    s = Plateau(patience=2, min_delta=0.01)
    fired = []
    for acc in [0.5, 0.6, 0.605, 0.6, 0.7, 0.69, 0.69, 0.69]:
        s, p = plateau_update(s, acc)
        fired.append(p)
    assert fired == [False, False, False, True, False, False, True, False]
    assert s.best == 0.7 and s.bad == 1


def test_importance_scores_by_hand():
    params = {"a": np.array([1.0, -2.0, 0.5]), "b": np.array([[4.0, 0.0]])}
    ups = [{"a": np.array([1.0, 3.0, 0.0])},                    # total 4
           {"a": np.array([0.0, 1.0, 0.0]), "b": np.array([[1.0, 0.0]])}]  # total 2
    s = importance_scores(ups, params)
    # gradient scores: a = [1/4, 3/4 + 1/2, 0], b = [1/2, 0]; s_min = 1/4
    # untouched: a[2] (|w| = .5), b[0,1] (|w| = 0): 0.5 * s_min * |w| / 0.5
    assert s["a"] == pytest.approx([0.25, 1.25, 0.125])
    assert s["b"] == pytest.approx(np.array([[0.5, 0.0]]))
    assert importance_scores([], params)["a"] == pytest.approx([1.0, 2.0, 0.5])
    # scale of an upload does not matter
    s2 = importance_scores([{k: 100 * v for k, v in ups[0].items()}, ups[1]], params)
    assert all(np.allclose(s[k], s2[k]) for k in s)


def test_global_ranking_ties_are_stable():
    r = global_ranking({"x": np.array([1.0, 2.0, 1.0]), "y": np.array([2.0, 1.0])})
    assert r.order.tolist() == [1, 3, 0, 2, 4]
    m = top_mask(r, 3)
    assert m["x"].tolist() == [True, True, False] and m["y"].tolist() == [True, False]


def test_nested_masks_hand_case_floor():
    scores = {"a": np.arange(20, dtype=float), "b": np.zeros(20)}
    m1, m2 = nested_masks(scores, [0.25, 0.5], layer_floor=0.1)
    # floor: 2 best of each tensor (a: 19, 18; b: 0, 1 by index), then a's next best
    assert np.flatnonzero(m1["b"]).tolist() == [0, 1]
    assert np.flatnonzero(m1["a"]).tolist() == list(range(12, 20))
    assert masks.count(m1) == 10 and masks.count(m2) == 20
    assert np.flatnonzero(m2["a"]).tolist() == list(range(2, 20))
    assert masks.is_subset(m1, m2)
    # density below the total floor: the floor wins
    (m0,) = nested_masks(scores, [0.0], layer_floor=0.1)
    assert masks.count(m0) == 4


def model_case():
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, options={"channels": [4], "hidden": [12]})
    spec = model_spec(model, (1, 8, 8))
    params = {k: v.numpy() for k, v in model.state_dict().items()}
    return spec, params


def test_nested_masks_on_model_nest_meet_density_and_floor():
    spec, params = model_case()
    keys = prunable_keys(spec)
    rng = np.random.default_rng(0)
    ups = [{k: rng.random(params[k].shape) ** 4 for k in keys[:-2]} for _ in range(3)]
    scores = importance_scores(ups, params, keys)
    dens = [1.0, 0.3, 0.6, 0.1, 0.1]
    ms = nested_masks(scores, dens, keys=keys)
    n = sum(params[k].size for k in keys)
    for rho, m in zip(dens, ms):
        assert list(m) == list(keys)
        assert masks.count(m) == int(math.floor(rho * n + 0.5))
        for k in keys:
            assert m[k].sum() >= math.ceil(0.05 * params[k].size)
    for i, j in [(3, 1), (1, 2), (2, 0), (3, 4), (4, 3)]:
        assert masks.is_subset(ms[i], ms[j])
    # the classifier got no gradient: only its |w|-ranked floor survives at 10%
    cls = spec.layers[-1].weight_key
    assert ms[3][cls].sum() == math.ceil(0.05 * params[cls].size)
    top = np.argsort(-np.abs(params[cls]).ravel(), kind="stable")[: ms[3][cls].sum()]
    assert set(np.flatnonzero(ms[3][cls])) == set(top)

    order = np.argsort(dens, kind="stable")
    pieces = residual_split([ms[i] for i in order])
    for a in range(len(pieces)):
        for b in range(a + 1, len(pieces)):
            assert not any((pieces[a][k] & pieces[b][k]).any() for k in pieces[a].keys() & pieces[b].keys())
    union = {}
    for p in pieces:
        union = masks.union(union, p)
    assert masks.equal(union, ms[0])
    assert pieces[1] == {}  # equal densities: empty difference
    nb = [Channel(params).mask_nbytes(p) for p in pieces]  # the channel counts every piece
    assert nb == [payload_nbytes(params, p) for p in pieces] and nb[1] == 0
    with pytest.raises(ValueError):
        residual_split([ms[0], ms[3]])


def test_magnitude_scores():
    s = magnitude_scores({"w": np.array([-3.0, 1.0])})
    assert s["w"].tolist() == [3.0, 1.0]
