"""fedray.tune_space: a grid/choice space never repeats a configuration until it is exhausted
(resolved by Tune's own variant generator; no Ray instance)."""
from __future__ import annotations

from pathlib import Path

import pytest
from ray.tune.search.variant_generator import generate_variants

from fedray import tune as T
from fedray import tune_space as TS

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tune" / "tiny_asha.yaml")


def trials(spec) -> list[dict]:
    """The trial configs Tune makes from the search space (num_samples passes of its variants)."""
    space, samples = T.param_space(spec)
    return [TS.field_values(cfg) for _ in range(samples) for _, cfg in generate_variants(space)]


def test_four_trial_choice_search_draws_four_distinct_configs():
    spec = T.load_spec(TINY)  # train.lr: grid of 2, server.clients_per_round: choice of 2, num_samples 2
    got = [tuple(t[k] for k in spec.space) for t in trials(spec)]
    assert len(got) == 4 and len(set(got)) == 4
    assert set(got) == {(lr, c) for lr in (0.02, 0.2) for c in (2, 4)}


def test_samples_stay_distinct_until_the_space_is_exhausted():
    space = {"a": ("grid", (1, 2)), "b": ("choice", (10, 20, 30)), "c": ("choice", ("x", "y"))}
    for n in (1, 3, 6, 9):
        pts = TS.points(space, n, seed=7)
        assert len(pts) == 2 * min(n, 6)
        assert len({tuple(p.values()) for p in pts}) == len(pts)
        assert all(list(p) == ["a", "b", "c"] for p in pts)
    assert TS.points(space, 3, seed=7) == TS.points(space, 3, seed=7)  # seeded
    assert TS.trial_count(space, 9) == 12
    assert TS.trial_count({"a": ("grid", (1, 2)), "lr": ("uniform", (0.1, 1.0))}, 3) == 6


def test_a_continuous_domain_keeps_tunes_sampling():
    spec = T.load_spec(TINY, ["tune.space={train.lr: {loguniform: [0.01, 0.1]}, "
                              "server.clients_per_round: {choice: [2, 4]}}"])
    space, samples = T.param_space(spec)
    assert samples == 2 and TS.POINT not in space


@pytest.mark.parametrize("name", ["prfl_density", "autoflip_quantile", "cahfp_keep"])
def test_density_schedule_searches_validate_with_held_out_seeds(name):
    """Every candidate of the space builds a valid config; the final seeds are not the tuning seed."""
    spec = T.load_spec(Path(__file__).resolve().parents[2] / "configs" / "tune" / f"{name}.yaml")
    assert spec.final_seeds and spec.cfg.seed not in spec.final_seeds
    assert spec.scheduler is not None and spec.scheduler.time_attr == "virtual_s"
    assert spec.scheduler.max_t == spec.cfg.server.max_virtual_s
    assert all(k.startswith("method.") for k in spec.space)
