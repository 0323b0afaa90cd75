"""Check the published claims against finished ``fedray compare`` runs (no retraining).

    python tools/claims.py runs            # every experiment folder of configs/experiments it finds

For each claim it prints a per-seed table of the metric the claim is about (read from the
runs' ``summary.json``) and whether the *direction* of the published effect reproduced here.
A run that never reached the target accuracy counts with time to target = its whole virtual
time (a lower bound, marked with >).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load(exp: Path) -> dict[str, dict[int, dict]]:
    """``{label: {seed: summary}}`` of the run folders (``<label>-s<seed>-<hash>[-r<n>]``,
    :func:`fedray.runs.parse`); of several folders of one label and seed, the newest summary."""
    from fedray import runs as RUNS

    out: dict[str, dict[int, dict]] = {}
    for f in sorted(exp.glob("*-s*/summary.json"), key=lambda f: f.stat().st_mtime):
        name = RUNS.parse(f.parent.name)
        if name is not None:
            out.setdefault(name["label"], {})[name["seed"]] = json.loads(f.read_text())
    return out


def ttt(s: dict) -> tuple[float, bool]:
    t = s.get("time_to_target_s")
    return (float(t), True) if t is not None else (float(s["virtual_s"]), False)


def fmt_t(s: dict) -> str:
    t, hit = ttt(s)
    return f"{t:.1f}" if hit else f">{t:.1f}"


def table(runs: dict, labels: list[str], cols: list[tuple[str, callable]]) -> list[str]:
    seeds = sorted({sd for lab in labels for sd in runs.get(lab, {})})
    lines = ["| method | " + " | ".join(f"{name} s{sd}" for name, _ in cols for sd in seeds) + " |",
             "|---|" + "---|" * (len(cols) * len(seeds))]
    for lab in labels:
        cells = []
        for _, f in cols:
            for sd in seeds:
                s = runs.get(lab, {}).get(sd)
                cells.append(f(s) if s else "—")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines


def mean(runs, lab, key):
    return float(np.mean([key(s) for s in runs[lab].values()]))


def verdict(ok: bool) -> str:
    return "**reproduced (direction)**" if ok else "**not reproduced**"


def fedbuff(runs) -> list[str]:
    r = [ttt(runs["fedbuff"][sd])[0] / ttt(runs["fedavg"][sd])[0] for sd in sorted(runs["fedavg"])]
    out = table(runs, ["fedavg", "fedbuff"], [("time to target (s)", fmt_t),
                                              ("final acc", lambda s: f"{s['final_accuracy']:.3f}")])
    tb, ta = mean(runs, "fedbuff", lambda s: ttt(s)[0]), mean(runs, "fedavg", lambda s: ttt(s)[0])
    out.append(f"\nFedBuff / FedAvg mean time to target {tb:.1f} / {ta:.1f} s = {tb / ta:.2f} (claim: <= 0.7) -> "
               f"{verdict(tb / ta <= 0.7)}; per seed: {', '.join(f'{x:.2f}' for x in r)}")
    return out


def clamp(runs) -> list[str]:
    labs = [x for x in ("ma_clamp", "clamp", "fedavg", "fedavg_deadline", "fedpmt") if x in runs]
    out = table(runs, labs, [("time to target (s)", fmt_t), ("SDIR", lambda s: f"{s['sdir']:.3f}"),
                             ("layer SDIR", lambda s: f"{s.get('sdir_layers', float('nan')):.3f}"),
                             ("FLOPs/acc pt", lambda s: f"{s['flops_per_accuracy_point'] / 1e6:.1f}M")])
    tm, tc = mean(runs, "ma_clamp", lambda s: ttt(s)[0]), mean(runs, "clamp", lambda s: ttt(s)[0])
    sm, sc = mean(runs, "ma_clamp", lambda s: s["sdir"]), mean(runs, "clamp", lambda s: s["sdir"])
    lm = mean(runs, "ma_clamp", lambda s: s.get("sdir_layers", float("nan")))
    lc = mean(runs, "clamp", lambda s: s.get("sdir_layers", float("nan")))
    fm = mean(runs, "ma_clamp", lambda s: s["flops_per_accuracy_point"])
    fc = mean(runs, "clamp", lambda s: s["flops_per_accuracy_point"])
    reached = any(ttt(s)[1] for lab in ("ma_clamp", "clamp") for s in runs[lab].values())
    out.append(f"\nMA-CLAMP vs CLAMP, mean time to target {tm:.1f} vs {tc:.1f} s (claim ~15% less) -> "
               + (verdict(tm < tc) if reached else "**not measured** (neither reached the target in the budget)"))
    am, ac = mean(runs, "ma_clamp", lambda s: s["final_accuracy"]), mean(runs, "clamp", lambda s: s["final_accuracy"])
    out.append(f"MA-CLAMP vs CLAMP, mean final accuracy at the same virtual-time budget {am:.3f} vs {ac:.3f} "
               f"(faster convergence shows as higher accuracy at equal time) -> {verdict(am > ac)}")
    out.append(f"MA-CLAMP vs CLAMP, mean SDIR {sm:.3f} vs {sc:.3f} (update level: both keep every slow device) "
               f"and layer-level SDIR {lm:.3f} vs {lc:.3f} (claim ~10% higher) -> {verdict(lm > lc)}")
    out.append(f"MA-CLAMP vs CLAMP, training FLOPs per accuracy point {fm / 1e6:.1f}M vs {fc / 1e6:.1f}M "
               f"(claim: more FLOP-efficient) -> {verdict(fm < fc)}")
    return out


def prfl(runs) -> list[str]:
    labs = [x for x in ("prfl", "fedasync", "fedfix", "fedavg", "heterofl") if x in runs]
    out = table(runs, labs, [("time to target (s)", fmt_t), ("final acc", lambda s: f"{s['final_accuracy']:.3f}"),
                             ("egress / down", lambda s: f"{s.get('server_egress', s['bytes_down']) / s['bytes_down']:.2f}")])
    tp = mean(runs, "prfl", lambda s: ttt(s)[0])
    for other in labs[1:]:
        to = mean(runs, other, lambda s: ttt(s)[0])
        claim = "2.5-3.3x less" if other == "fedasync" else "less"
        out.append(f"{'' if other != labs[1] else chr(10)}PR-FL vs {other}: mean time to target {tp:.1f} vs {to:.1f} s "
                   f"(speed-up {to / tp:.2f}x; claim {claim}) -> {verdict(tp < to)}")
    return out


def cahfp(runs) -> list[str]:
    labs = [x for x in ("cahfp", "fedavg", "heterofl") if x in runs]
    out = table(runs, labs, [("final acc", lambda s: f"{s['final_accuracy']:.3f}"),
                             ("train FLOPs", lambda s: f"{s['train_flops'] / 1e9:.2f}G"),
                             ("bytes up", lambda s: f"{s['bytes_up'] / 1e6:.1f}MB")])
    ac, ah = mean(runs, "cahfp", lambda s: s["final_accuracy"]), mean(runs, "heterofl", lambda s: s["final_accuracy"])
    fc, ff = mean(runs, "cahfp", lambda s: s["train_flops"]), mean(runs, "fedavg", lambda s: s["train_flops"])
    out.append(f"\nCA-HFP vs HeteroFL at the same keep ratios: mean final accuracy {ac:.3f} vs {ah:.3f} "
               f"(claim: better, from curvature-chosen channels) -> {verdict(ac > ah)}")
    out.append(f"CA-HFP vs FedAvg: training FLOPs {fc / 1e9:.2f}G vs {ff / 1e9:.2f}G ({(1 - fc / ff) * 100:.0f}% fewer)")
    return out


def autoflip(runs) -> list[str]:
    labs = [x for x in ("autoflip", "fedavg", "random_prune") if x in runs]
    out = table(runs, labs, [("final acc", lambda s: f"{s['final_accuracy']:.3f}"),
                             ("train FLOPs", lambda s: f"{s['train_flops'] / 1e9:.2f}G"),
                             ("sparse FLOPs", lambda s: f"{s.get('sparse_train_flops', s['train_flops']) / 1e9:.2f}G"),
                             ("bytes up+down", lambda s: f"{(s['bytes_up'] + s['bytes_down']) / 1e6:.1f}MB")])
    fa = mean(runs, "autoflip", lambda s: s.get("sparse_train_flops", s["train_flops"]))
    ff = mean(runs, "fedavg", lambda s: s["train_flops"])
    ba = mean(runs, "autoflip", lambda s: s["bytes_up"] + s["bytes_down"])
    bf = mean(runs, "fedavg", lambda s: s["bytes_up"] + s["bytes_down"])
    aa, af = mean(runs, "autoflip", lambda s: s["final_accuracy"]), mean(runs, "fedavg", lambda s: s["final_accuracy"])
    ar = mean(runs, "random_prune", lambda s: s["final_accuracy"])
    out.append(f"\nAutoFLIP vs FedAvg: FLOPs {(1 - fa / ff) * 100:.0f}% fewer (claim ~49%) -> {verdict(fa < ff)}; "
               f"communication {(1 - ba / bf) * 100:.0f}% less (claim ~35%) -> {verdict(ba < bf)}; "
               f"accuracy {aa:.3f} vs {af:.3f} (claim: equal or better) -> {verdict(aa >= af - 0.01)}")
    out.append(f"AutoFLIP vs random pruning at equal density: accuracy {aa:.3f} vs {ar:.3f} -> {verdict(aa > ar)}")
    return out


CLAIMS = {"fedbuff_vs_fedavg": fedbuff, "clamp_family": clamp, "prfl_iid": prfl, "prfl_dirichlet": prfl, "prfl_paper": prfl,
          "cahfp": cahfp, "autoflip": autoflip}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs_dir", nargs="?", default="runs")
    a = ap.parse_args()
    for name, fn in CLAIMS.items():
        exp = Path(a.runs_dir) / name
        runs = load(exp)
        if not runs:
            continue
        print(f"### {name}\n")
        try:
            print("\n".join(fn(runs)) + "\n")
        except KeyError as e:
            print(f"(incomplete: no runs of {e})\n")


if __name__ == "__main__":
    main()
