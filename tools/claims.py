"""Check the published claims against finished ``fedray compare`` runs (no retraining).

    python tools/claims.py runs                  # every experiment under runs/ that has a claim
    python tools/claims.py runs --experiment autoflip_mnist

Runs are read through :func:`fedray.report.find_runs` (folders ``<label>-s<seed>-<hash>``; the
experiment, label and seed come from each run's ``summary.json`` / ``config.yaml`` and its folder
name, never from splitting the name by hand). Every experiment found is checked by the claim its
name starts with (``prfl_paper`` and ``prfl_paper_iid_mnist5k`` by PR-FL's, ``adaptive_dir10`` by the
composed method's, which is also judged over all its settings),
so a second setting of a claim is the same compare config run with another ``experiment:``
(``--set experiment=autoflip_mnist --set data.name=mnist_5k``).

For each claim it prints a per-seed table of the metric the claim is about (read from the
runs' ``summary.json``) and whether the *direction* of the published effect reproduced here.
FLOPs are judged on the executed ones (``train_flops``); sparse-kernel FLOPs
(``sparse_train_flops``) are printed beside them, never instead.
A run that never reached the target accuracy counts with time to target = its whole virtual
time (a lower bound, marked with >). A mean over seeds with such a run is a lower bound too (>),
so is a speed-up over it (< or > where only one side is exact, ? where both are), and a verdict
the bounds cannot decide is "not measured".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedray import report  # noqa: E402  (the repository's fedray, also when run as a script)
from fedray.errors import DataError  # noqa: E402


def load(root: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """``{experiment: {label: {seed: summary}}}`` of every run under ``root``. A label run with
    several configs in one experiment keeps its latest config's runs (and says so on stderr):
    give each setting its own ``experiment:`` name."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    digest: dict[tuple[str, str], str | None] = {}
    for r in report.find_runs(root):
        key = (r.experiment, r.label)
        if key in digest and digest[key] != r.config_hash:
            print(f"claims: {r.experiment}/{r.label} has runs of several configs; using {r.path.name} "
                  f"(give each setting its own experiment name)", file=sys.stderr)
            out[r.experiment][r.label] = {}
        digest[key] = r.config_hash
        out.setdefault(r.experiment, {}).setdefault(r.label, {})[int(r.seed)] = r.summary
    return out


def ttt(s: dict) -> tuple[float, bool]:
    t = s.get("time_to_target_s")
    return (float(t), True) if t is not None else (float(s["virtual_s"]), False)


def fmt_t(s: dict) -> str:
    return fmt_mean(*ttt(s))


def mean_t(runs, lab) -> tuple[float, bool]:
    """A method's mean time to target over its seeds, and whether it is exact (every seed reached
    the target; otherwise the mean is a lower bound)."""
    ts = [ttt(s) for s in runs[lab].values()]
    return float(np.mean([t for t, _ in ts])), all(hit for _, hit in ts)


def fmt_mean(t: float, exact: bool) -> str:
    return f"{t:.1f}" if exact else f">{t:.1f}"


def less(a: float, a_exact: bool, b: float, b_exact: bool) -> bool | None:
    """Whether a < b where an inexact value is a lower bound; None where the bounds cannot tell."""
    if a < b and a_exact:
        return True
    if a >= b and b_exact:
        return False
    return None


def fmt_ratio(num: float, num_exact: bool, den: float, den_exact: bool) -> str:
    """num / den, marked > or < where one side is a lower bound (? where both are)."""
    if not num_exact and not den_exact:
        return "?"
    return ("" if num_exact and den_exact else ">" if den_exact else "<") + f"{num / den:.2f}x"


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


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "**not measured** (a lower bound: the target was missed on a seed)"
    return "**reproduced (direction)**" if ok else "**not reproduced**"


def fedbuff(runs) -> list[str]:
    r = [ttt(runs["fedbuff"][sd])[0] / ttt(runs["fedavg"][sd])[0] for sd in sorted(runs["fedavg"])]
    out = table(runs, ["fedavg", "fedbuff"], [("time to target (s)", fmt_t),
                                              ("final acc", lambda s: f"{s['final_accuracy']:.3f}")])
    (tb, eb), (ta, ea) = mean_t(runs, "fedbuff"), mean_t(runs, "fedavg")
    slower = less(0.7 * ta, ea, tb, eb)  # the claim fails where FedBuff's time is above 0.7 of FedAvg's
    out.append(f"\nFedBuff / FedAvg mean time to target {fmt_mean(tb, eb)} / {fmt_mean(ta, ea)} s = "
               f"{fmt_ratio(tb, eb, ta, ea)} (claim: <= 0.7) -> {verdict(None if slower is None else not slower)}; "
               f"per seed: {', '.join(f'{x:.2f}' for x in r)}")
    return out


def clamp(runs) -> list[str]:
    labs = [x for x in ("ma_clamp", "clamp", "fedavg", "fedavg_deadline", "fedpmt") if x in runs]
    out = table(runs, labs, [("time to target (s)", fmt_t), ("SDIR", lambda s: f"{s['sdir']:.3f}"),
                             ("layer SDIR", lambda s: f"{s.get('sdir_layers', float('nan')):.3f}"),
                             ("FLOPs/acc pt", lambda s: f"{s['flops_per_accuracy_point'] / 1e6:.1f}M")])
    (tm, em), (tc, ec) = mean_t(runs, "ma_clamp"), mean_t(runs, "clamp")
    sm, sc = mean(runs, "ma_clamp", lambda s: s["sdir"]), mean(runs, "clamp", lambda s: s["sdir"])
    lm = mean(runs, "ma_clamp", lambda s: s.get("sdir_layers", float("nan")))
    lc = mean(runs, "clamp", lambda s: s.get("sdir_layers", float("nan")))
    fm = mean(runs, "ma_clamp", lambda s: s["flops_per_accuracy_point"])
    fc = mean(runs, "clamp", lambda s: s["flops_per_accuracy_point"])
    out.append(f"\nMA-CLAMP vs CLAMP, mean time to target {fmt_mean(tm, em)} vs {fmt_mean(tc, ec)} s (claim ~15% less) "
               f"-> {verdict(less(tm, em, tc, ec))}")
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
    tp, ep = mean_t(runs, "prfl")
    for other in labs[1:]:
        to, eo = mean_t(runs, other)
        claim = "2.5-3.3x less" if other == "fedasync" else "less"
        out.append(f"{'' if other != labs[1] else chr(10)}PR-FL vs {other}: mean time to target {fmt_mean(tp, ep)} vs "
                   f"{fmt_mean(to, eo)} s (speed-up {fmt_ratio(to, eo, tp, ep)}; claim {claim}) -> {verdict(less(tp, ep, to, eo))}")
    return out


def cahfp(runs) -> list[str]:
    """CA-HFP and its variants (labels ``cahfp*``: how often and where channels are scored)."""
    variants = ["cahfp"] + sorted(x for x in runs if x.startswith("cahfp_"))
    labs = variants + [x for x in ("fedavg", "heterofl") if x in runs]
    out = table(runs, labs, [("final acc", lambda s: f"{s['final_accuracy']:.3f}"),
                             ("train FLOPs", lambda s: f"{s['train_flops'] / 1e9:.2f}G"),
                             ("bytes up", lambda s: f"{s['bytes_up'] / 1e6:.1f}MB")])
    ah = mean(runs, "heterofl", lambda s: s["final_accuracy"])
    ff = mean(runs, "fedavg", lambda s: s["train_flops"])
    first = True
    for v in variants:
        ac, fc = mean(runs, v, lambda s: s["final_accuracy"]), mean(runs, v, lambda s: s["train_flops"])
        out.append(f"{chr(10) if first else ''}{v} vs HeteroFL at the same keep ratios: mean final accuracy {ac:.3f} vs "
                   f"{ah:.3f} (claim: better, from curvature-chosen channels) -> {verdict(ac > ah)}; executed training "
                   f"FLOPs vs FedAvg {fc / 1e9:.2f}G vs {ff / 1e9:.2f}G ({change(fc, ff, 'fewer', 'more')})")
        first = False
    return out


def change(x: float, base: float, down: str, up: str) -> str:
    """``x`` against ``base`` in words: "30% fewer", "13% more"."""
    d = (1 - x / base) * 100
    return f"{d:.0f}% {down}" if d >= 0 else f"{-d:.0f}% {up}"


def autoflip(runs) -> list[str]:
    labs = [x for x in ("autoflip", "fedavg", "fedavg_momentum", "random_prune") if x in runs]
    out = table(runs, labs, [("final acc", lambda s: f"{s['final_accuracy']:.3f}"),
                             ("train FLOPs", lambda s: f"{s['train_flops'] / 1e9:.2f}G"),
                             ("sparse FLOPs", lambda s: f"{s.get('sparse_train_flops', s['train_flops']) / 1e9:.2f}G"),
                             ("bytes up+down", lambda s: f"{(s['bytes_up'] + s['bytes_down']) / 1e6:.1f}MB")])
    fa = mean(runs, "autoflip", lambda s: s["train_flops"])
    sa = mean(runs, "autoflip", lambda s: s.get("sparse_train_flops", s["train_flops"]))
    ba = mean(runs, "autoflip", lambda s: s["bytes_up"] + s["bytes_down"])
    aa = mean(runs, "autoflip", lambda s: s["final_accuracy"])
    first = True
    for base in (x for x in ("fedavg", "fedavg_momentum") if x in runs):
        ff = mean(runs, base, lambda s: s["train_flops"])
        bf = mean(runs, base, lambda s: s["bytes_up"] + s["bytes_down"])
        af = mean(runs, base, lambda s: s["final_accuracy"])
        out.append(f"{chr(10) if first else ''}AutoFLIP vs {base}: executed FLOPs {change(fa, ff, 'fewer', 'more')} "
                   f"(claim ~49% fewer) -> {verdict(fa < ff)} (sparse-kernel FLOPs {change(sa, ff, 'fewer', 'more')}); "
                   f"communication {change(ba, bf, 'less', 'more')} (claim ~35% less) -> {verdict(ba < bf)}; "
                   f"accuracy {aa:.3f} vs {af:.3f} (claim: equal or better) -> {verdict(aa >= af - 0.01)}")
        first = False
    if "random_prune" in runs:
        ar = mean(runs, "random_prune", lambda s: s["final_accuracy"])
        out.append(f"AutoFLIP vs random pruning at equal density: accuracy {aa:.3f} vs {ar:.3f} -> {verdict(aa > ar)}")
    return out


COMPOSED = "adaptive_masked_buff"


def variants(runs) -> list[str]:
    """The composed method's labels (its default first, then variants such as ``adaptive_every20``),
    found by the method each run ran."""
    labs = [lab for lab in runs if any(s.get("method") == COMPOSED for s in runs[lab].values())]
    return sorted(labs, key=lambda lab: (lab != COMPOSED, lab))


def fastest(runs, lab: str) -> tuple[bool, list[str]]:
    """Whether the composed method (label ``lab``) reached the target on every seed in less mean
    virtual time than every other method (a method that missed it counts with its whole budget, a
    lower bound). Its other variants are not competitors."""
    others = [x for x in runs if x not in variants(runs)]
    if not others:
        raise KeyError("another method than the composed one")
    t = {x: mean_t(runs, x) for x in [lab] + others}
    ahead = [x for x in others if less(*t[lab], *t[x]) is not True]
    order = ", ".join(f"{x} {fmt_mean(*t[x])}" for x in sorted(t, key=lambda x: t[x][0]))
    ok = t[lab][1] and not ahead
    why = "" if ok else (" (missed the target on a seed)" if not t[lab][1] else f" ({', '.join(ahead)} as fast or faster)")
    return ok, [f"\n{lab}: mean time to target by method (s): {order} -> claim 'faster than every seed "
                f"method and baseline' {verdict(ok)}{why}"]


def composed(runs) -> list[str]:
    mine = variants(runs)
    labs = mine + sorted(lab for lab in runs if lab not in mine)
    out = table(runs, labs, [("time to target (s)", fmt_t), ("final acc", lambda s: f"{s['final_accuracy']:.3f}")])
    return out + [line for lab in mine for line in fastest(runs, lab)[1]]


# the claim of an experiment is the first whose key its name starts with (longest keys first)
CLAIMS = {"fedbuff": fedbuff, "clamp_family": clamp, "ma_clamp": clamp, "clamp": clamp, "prfl": prfl,
          "cahfp": cahfp, "autoflip": autoflip, "adaptive": composed}


def claim_for(experiment: str):
    """The claim checker of an experiment name (None: no claim)."""
    for key in sorted(CLAIMS, key=len, reverse=True):
        if experiment == key or experiment.startswith(key):
            return CLAIMS[key]
    return None


def check(root: Path, only: str | None = None) -> list[str]:
    """The claims' tables and verdicts of every experiment under ``root`` (or only ``only``)."""
    out, wins = [], {}
    for name, runs in sorted(load(root).items()):
        fn = claim_for(name)
        if fn is None or (only is not None and name != only):
            continue
        out.append(f"### {name}\n")
        try:
            out.append("\n".join(fn(runs)) + "\n")
            if fn is composed:
                wins[name] = fastest(runs, variants(runs)[0])[0]
        except KeyError as e:
            out.append(f"(incomplete: no runs of {e})\n")
    if len(wins) > 1:  # the composed method's claim is over its settings (non-IID splits)
        won = [n for n, ok in wins.items() if ok]
        out.append(f"### {COMPOSED} over its settings\n\nfastest to target on {len(won)} of {len(wins)} settings "
                   f"({', '.join(won) or 'none'}; claim: at least 2 of 3) -> {verdict(len(won) >= 2)}\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs_dir", nargs="?", default="runs")
    ap.add_argument("--experiment", help="check only this experiment (default: every one with a claim)")
    a = ap.parse_args(argv)
    try:
        lines = check(Path(a.runs_dir), a.experiment)
    except DataError as e:
        print(f"claims: {e}", file=sys.stderr)
        return 2
    if not lines:
        print(f"claims: no runs of a claimed experiment under '{a.runs_dir}'", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
