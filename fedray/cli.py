"""``fedray run | tune | compare | submit | report``.

A user mistake prints one line (``config error: field: ...``) and exits 2;
it never shows a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedray.errors import FedrayError

QUICKSTART = "configs/quickstart.yaml"


def _default_config() -> str:
    here = Path(QUICKSTART)
    if here.is_file():
        return str(here)
    pkg = Path(__file__).resolve().parent.parent / QUICKSTART
    return str(pkg)


def cmd_run(args) -> int:
    from fedray import config
    from fedray.runtime.loop import run

    cfg = config.load(args.config or _default_config(), args.set)
    if args.out:
        from dataclasses import replace

        cfg = replace(cfg, runtime=replace(cfg.runtime, out_dir=args.out))
    s = run(cfg, progress=not args.quiet and cfg.runtime.progress)
    print(f"{cfg.method.name} seed {cfg.seed}: final accuracy {s['final_accuracy']:.4f} "
          f"(best {s['best_accuracy']:.4f}) after {s['rounds']} rounds, "
          f"wall {s['wall_s']:.1f}s (+{s['setup_s']:.1f}s setup), virtual {s['virtual_s']:.1f}s")
    print(f"logs: {s['run_dir']}  (tensorboard --logdir {Path(s['run_dir']).parent})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one experiment (default: configs/quickstart.yaml)")
    r.add_argument("config", nargs="?", help="YAML config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    r.add_argument("--out", help="output folder (default runtime.out_dir)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FedrayError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
