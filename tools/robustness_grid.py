"""Run a slice of a tune config's grid one run after another and print it as a markdown table.

    python tools/robustness_grid.py configs/experiments/robustness.yaml \
        --where method=0 --where attack.fraction=0.2 --where seed=0
    python tools/robustness_grid.py configs/experiments/privacy.yaml

Every ``grid``/``choice`` key of ``tune.space`` is crossed (``fedray tune`` runs the same grid
on Ray Tune). ``--where KEY=V1,V2`` keeps some values: list positions for keys whose values
are mappings (``method``, ``defense``), the values themselves otherwise. A row is one
combination of every key but ``seed``: the mean (and spread) of the final accuracy over the
seeds, the updates rejected by the norm guard and, with DP, epsilon.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import yaml


def label(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items()) or "(defaults)"
    return str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--where", action="append", default=[], help="KEY=V1,V2 (positions for mapping values)")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (every run)")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args(argv)

    import numpy as np
    import ray

    from fedray import config as C
    from fedray import tune
    from fedray.errors import ConfigError
    from fedray.runtime.runner import Runner

    try:
        spec = tune.load_spec(args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    axes = {}
    for key, (kind, values) in spec.space.items():
        if kind not in ("grid", "choice"):
            print(f"tune.space.{key}: only grid/choice keys can be tabled, not {kind}", file=sys.stderr)
            return 2
        axes[key] = list(enumerate(values))
    for w in args.where:
        key, _, raw = w.partition("=")
        if key not in axes:
            print(f"--where {key}: not a key of tune.space ({', '.join(axes)})", file=sys.stderr)
            return 2
        wanted = [yaml.safe_load(x) for x in raw.split(",")]
        by_pos = isinstance(axes[key][0][1], dict)
        axes[key] = [(i, v) for i, v in axes[key] if (i if by_pos else v) in wanted]
    keys = list(axes)
    ray.init(address="local", num_cpus=args.cpus, logging_level="ERROR", include_dashboard=False)
    rows: dict = {}
    t0 = time.time()
    combos = list(itertools.product(*(axes[k] for k in keys)))
    for n, combo in enumerate(combos, 1):
        values = {k: v for k, (_, v) in zip(keys, combo)}
        raw = tune.with_values(spec.base, values)
        raw.setdefault("runtime", {}).update({"progress": False, "tensorboard": False,
                                              "out_dir": f"runs/grid_{spec.cfg.experiment}/{n}"})
        s = Runner(C.from_dict(raw)).run()
        row = tuple(label(values[k]) for k in keys if k != "seed")
        rows.setdefault(row, []).append(s)
        print(f"[{n}/{len(combos)} {time.time() - t0:.0f}s] {row} seed={values.get('seed')}: "
              f"{s['final_accuracy']:.4f}", file=sys.stderr, flush=True)
    ray.shutdown()
    head = [k for k in keys if k != "seed"]
    dp = any("epsilon" in s for ss in rows.values() for s in ss)
    cols = head + ["final accuracy", "seeds", "rejected (norm)"] + (["epsilon"] if dp else [])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row, ss in rows.items():
        acc = np.array([s["final_accuracy"] for s in ss])
        spread = f" ± {acc.std():.3f}" if len(acc) > 1 else ""
        norm = int(np.mean([s.get("rejected_by_reason", {}).get("norm", 0) for s in ss]))
        cells = list(row) + [f"{acc.mean():.3f}{spread}", str(len(ss)), str(norm)]
        if dp:
            eps = [s.get("epsilon", math.inf) for s in ss]
            cells.append("∞ (no DP)" if not all(map(math.isfinite, eps)) else f"{np.mean(eps):.2f}")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
