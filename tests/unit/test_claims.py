"""tools/claims.py reads today's run folders and judges FLOPs on executed FLOPs."""
from __future__ import annotations

import json
import os
import sys

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import claims  # noqa: E402


def write_run(root, experiment, label, seed, summary, method=None, digest="0123abcd", data="digits"):
    d = root / experiment / f"{label}-s{seed}-{digest}"
    d.mkdir(parents=True)
    cfg = {"experiment": experiment, "seed": seed, "method": method or {"name": label}, "data": {"name": data}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "summary.json").write_text(json.dumps({"experiment": experiment, "method": (method or {}).get("name", label),
                                                "status": "completed", **summary}))


def flip_summary(acc, flops, sparse, nbytes):
    return {"final_accuracy": acc, "train_flops": flops, "sparse_train_flops": sparse, "bytes_up": nbytes,
            "bytes_down": nbytes, "virtual_s": 10.0, "time_to_target_s": None}


def test_load_reads_label_and_seed_of_hashed_run_folders(tmp_path):
    """Regression: ``load`` split ``autoflip-s0-1a2b3c4d`` at "-s" into label "autoflip" and seed
    "0-1a2b3c4d" (a ValueError); label, seed and experiment now come from the runs themselves."""
    for seed in (0, 1):
        write_run(tmp_path, "autoflip", "autoflip", seed, flip_summary(0.8, 10, 5, 100), method={"name": "autoflip"})
        write_run(tmp_path, "autoflip", "fedavg_momentum", seed, flip_summary(0.8, 20, 20, 200),
                  method={"name": "fedavg", "server_momentum": 0.9})
    write_run(tmp_path, "autoflip_mnist", "autoflip", 0, flip_summary(0.9, 10, 5, 100), data="mnist_5k")
    runs = claims.load(tmp_path)
    assert sorted(runs) == ["autoflip", "autoflip_mnist"]
    assert sorted(runs["autoflip"]) == ["autoflip", "fedavg_momentum"]
    assert sorted(runs["autoflip"]["fedavg_momentum"]) == [0, 1]
    assert runs["autoflip_mnist"]["autoflip"][0]["final_accuracy"] == 0.9


def test_claims_are_found_by_experiment_name():
    assert claims.claim_for("prfl_paper") is claims.prfl and claims.claim_for("prfl_paper_iid_mnist5k") is claims.prfl
    assert claims.claim_for("autoflip_mnist") is claims.autoflip
    assert claims.claim_for("clamp_family") is claims.clamp and claims.claim_for("fedbuff_vs_fedavg") is claims.fedbuff
    assert claims.claim_for("adaptive_dir10") is claims.composed and claims.claim_for("cahfp_mnist5k") is claims.cahfp
    assert claims.claim_for("privacy") is None


def test_autoflip_verdict_uses_executed_flops_with_sparse_beside(tmp_path):
    """Regression: the FLOPs verdict compared AutoFLIP's sparse-kernel FLOPs with FedAvg's executed
    ones, so fewer sparse FLOPs "reproduced" the claim while more FLOPs ran."""
    write_run(tmp_path, "autoflip", "autoflip", 0, flip_summary(0.8, 120, 50, 100))
    write_run(tmp_path, "autoflip", "fedavg", 0, flip_summary(0.8, 100, 100, 200))
    write_run(tmp_path, "autoflip", "fedavg_momentum", 0, flip_summary(0.8, 100, 100, 200),
              method={"name": "fedavg", "server_momentum": 0.9}, digest="89abcdef")
    text = "\n".join(claims.check(tmp_path))
    assert "AutoFLIP vs fedavg: executed FLOPs 20% more (claim ~49% fewer) -> **not reproduced** " \
           "(sparse-kernel FLOPs 50% fewer); communication 50% less (claim ~35% less) -> **reproduced" in text
    assert "AutoFLIP vs fedavg_momentum: executed FLOPs 20% more (claim ~49% fewer) -> **not reproduced**" in text
    assert "| autoflip | 0.800 | 0.00G | 0.00G |" in text  # sparse FLOPs printed beside the executed ones
    assert claims.main([str(tmp_path / "nothing")]) == 2


def test_composed_method_is_judged_per_setting_and_over_its_settings(tmp_path):
    """The composed method's claim: fastest to target (mean over seeds; a missed target counts as
    the whole budget, a lower bound) against every other method, on at least 2 of 3 settings."""
    def tt(t):
        return {"final_accuracy": 0.9, "virtual_s": 600.0, "time_to_target_s": t}
    times = {"adaptive": {"adaptive_masked_buff": (100, 120), "fedbuff": (150, 140), "prfl": (None, None)},
             "adaptive_dir10": {"adaptive_masked_buff": (100, 100), "fedbuff": (90, 100), "prfl": (300, 300)},
             "adaptive_classes2": {"adaptive_masked_buff": (200, None), "fedbuff": (None, None), "prfl": (None, None)}}
    for exp, methods in times.items():
        for label, ts in methods.items():
            for seed, t in enumerate(ts):
                write_run(tmp_path, exp, label, seed, tt(t))
    text = "\n".join(claims.check(tmp_path))
    assert "adaptive_masked_buff: mean time to target by method (s): adaptive_masked_buff 110.0, fedbuff 145.0, " \
           "prfl >600.0 -> claim 'faster than every seed method and baseline' **reproduced (direction)**" in text
    assert "(fedbuff as fast or faster)" in text  # adaptive_dir10: 95 vs 100
    assert "(missed the target on a seed)" in text  # adaptive_classes2
    assert "fastest to target on 1 of 3 settings (adaptive; claim: at least 2 of 3) -> **not reproduced**" in text


def test_cahfp_variants_are_each_judged_against_heterofl(tmp_path):
    def acc(a, flops):
        return {"final_accuracy": a, "train_flops": flops, "bytes_up": 1e6, "bytes_down": 1e6, "virtual_s": 10.0,
                "time_to_target_s": None}
    write_run(tmp_path, "cahfp", "cahfp", 0, acc(0.70, 110e9))
    write_run(tmp_path, "cahfp", "cahfp_every5", 0, acc(0.85, 70e9), method={"name": "cahfp", "score_every": 5})
    write_run(tmp_path, "cahfp", "heterofl", 0, acc(0.80, 65e9))
    write_run(tmp_path, "cahfp", "fedavg", 0, acc(0.78, 100e9))
    text = "\n".join(claims.check(tmp_path))
    assert "cahfp vs HeteroFL at the same keep ratios: mean final accuracy 0.700 vs 0.800 (claim: better, from " \
           "curvature-chosen channels) -> **not reproduced**; executed training FLOPs vs FedAvg 110.00G vs 100.00G " \
           "(10% more)" in text
    assert "cahfp_every5 vs HeteroFL at the same keep ratios: mean final accuracy 0.850 vs 0.800" in text
    assert "-> **reproduced (direction)**; executed training FLOPs vs FedAvg 70.00G vs 100.00G (30% fewer)" in text


def test_a_mean_over_a_missed_target_is_a_lower_bound_in_every_time_claim(tmp_path):
    """Regression: PR-FL's and FedBuff's lines printed the mean of a baseline that missed the target
    on a seed (its whole budget) as a measured time and speed-up, and a PR-FL that missed the
    target itself could still be "reproduced"."""
    def tt(t):
        return {"final_accuracy": 0.9, "virtual_s": 3000.0, "time_to_target_s": t, "bytes_down": 1.0}
    for seed in (0, 1):
        write_run(tmp_path, "prfl_paper", "prfl", seed, tt(1000.0))
        write_run(tmp_path, "prfl_paper", "fedfix", seed, tt(None))  # never reached: > 3000
        write_run(tmp_path, "prfl_paper", "fedavg", seed, tt(2000.0 if seed else None))
        write_run(tmp_path, "prfl_paper_x", "prfl", seed, tt(1000.0 if seed else None))  # PR-FL missed a seed
        write_run(tmp_path, "prfl_paper_x", "fedasync", seed, tt(2500.0))
        write_run(tmp_path, "prfl_paper_x", "fedfix", seed, tt(1500.0))
    text = "\n".join(claims.check(tmp_path))
    assert "PR-FL vs fedfix: mean time to target 1000.0 vs >3000.0 s (speed-up >3.00x; claim less) -> " \
           "**reproduced (direction)**" in text
    assert "PR-FL vs fedavg: mean time to target 1000.0 vs >2500.0 s (speed-up >2.50x" in text
    assert "PR-FL vs fedasync: mean time to target >2000.0 vs 2500.0 s (speed-up <1.25x; claim 2.5-3.3x less) -> " \
           "**not measured**" in text  # PR-FL's true mean may be above 2500
    assert "PR-FL vs fedfix: mean time to target >2000.0 vs 1500.0 s (speed-up <0.75x; claim less) -> " \
           "**not reproduced**" in text  # already slower at its lower bound
    assert [claims.less(*x) for x in [(1, True, 2, False), (1, False, 2, True), (2, False, 1, True),
                                      (2, True, 1, False), (1, False, 2, False)]] == [True, None, False, None, None]


def test_a_variant_of_the_composed_method_is_judged_by_the_method_it_ran(tmp_path):
    """Regression: the composed method's claim looked for the label ``adaptive_masked_buff`` only,
    so a labelled variant (``adaptive_every20``) against FedBuff was "incomplete"; an experiment of
    variants alone has nothing to beat and counts for no setting."""
    def tt(t):
        return {"final_accuracy": 0.9, "virtual_s": 600.0, "time_to_target_s": t}
    every20 = {"name": "adaptive_masked_buff", "score_every": 20}
    for seed in (3, 4):
        write_run(tmp_path, "adaptive_heldout", "adaptive_every20", seed, tt(100.0 + seed), method=every20)
        write_run(tmp_path, "adaptive_heldout", "adaptive_masked_buff", seed, tt(300.0))
        write_run(tmp_path, "adaptive_heldout", "fedbuff", seed, tt(200.0))
        write_run(tmp_path, "adaptive_every20", "adaptive_every20", seed, tt(100.0), method=every20)
    text = "\n".join(claims.check(tmp_path))
    assert "adaptive_every20: mean time to target by method (s): adaptive_every20 103.5, fedbuff 200.0 -> claim " \
           "'faster than every seed method and baseline' **reproduced (direction)**" in text
    assert "adaptive_masked_buff: mean time to target by method (s): fedbuff 200.0, adaptive_masked_buff 300.0 -> " \
           "claim 'faster than every seed method and baseline' **not reproduced** (fedbuff as fast or faster)" in text
    assert "### adaptive_every20\n\n(incomplete: no runs of 'another method than the composed one')" in text
    assert "over its settings" not in text  # one judged setting: adaptive_heldout (its default lost)
