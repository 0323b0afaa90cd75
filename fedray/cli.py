"""fedray: federated learning on Ray -- run, tune, compare, submit, report, list, describe.

A user mistake prints one line (``config error: field: ...``) and exits 2;
it never shows a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedray.errors import ConfigError, FedrayError, Interrupted

QUICKSTART = "configs/quickstart.yaml"


def _default_config() -> str:
    here = Path(QUICKSTART)
    if here.is_file():
        return str(here)
    pkg = Path(__file__).resolve().parent.parent / QUICKSTART
    return str(pkg)


def cmd_run(args) -> int:
    from fedray import config
    from fedray.runtime.runner import run
    from fedray.storage import store_run

    storage = _storage(args)
    run_dir = None
    if args.resume:
        if args.config:
            raise ConfigError("--resume", "takes the run folder only (its config.yaml is the run's config)")
        run_dir = _resume_folder(args.resume)
        cfg = config.load(run_dir / "config.yaml", args.set)
    else:
        cfg = config.load(args.config or _default_config(), args.set)
    if args.out:
        from dataclasses import replace

        cfg = replace(cfg, runtime=replace(cfg.runtime, out_dir=args.out))
    resume = bool(args.resume)
    if not resume:
        from fedray import runs

        action, run_dir = runs.place(cfg, args.rerun)
        if action == "completed":
            if storage:
                print(f"stored: {store_run(run_dir, storage)}")
            return 0
        resume = action == "resume"
    try:
        s = run(cfg, progress=not args.quiet and cfg.runtime.progress, run_dir=run_dir, resume=resume)
    except BaseException:  # an interrupted or failed run is stored too: its folder is what resumes it
        folder = run_dir or cfg.run_dir
        if storage and (Path(folder) / "config.yaml").is_file():
            print(f"stored: {store_run(folder, storage)}", file=sys.stderr)
        raise
    m = s["metric"]
    print(f"{cfg.method.name} seed {cfg.seed}: final {m} {s[f'final_{m}']:.4f} "
          f"(best {s[f'best_{m}']:.4f}) after {s['rounds']} rounds, "
          f"wall {s['wall_s']:.1f}s (+{s['setup_s']:.1f}s setup), virtual {s['virtual_s']:.1f}s")
    print(f"logs: {s['run_dir']}  (tensorboard --logdir {Path(s['run_dir']).parent})")
    if storage:
        print(f"stored: {store_run(s['run_dir'], storage)}")
    return 0


def _resume_folder(where: str) -> Path:
    """The local run folder to resume: ``where`` itself, or a stored run (a ``pyarrow.fs`` URI,
    ``<storage>/<experiment>/<run>``) fetched to ``runs/<experiment>/<run>`` here."""
    from fedray import storage as S

    if S.is_uri(where):
        local = Path("runs") / S.tail(where, 2)
        S.fetch_dir(where, local, "--resume")
        where = str(local)
    run_dir = Path(where)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError("--resume", f"'{where}' is not a run folder (no config.yaml)")
    return run_dir


def _storage(args) -> str | None:
    """``--storage`` checked (and a local path made absolute) before any work starts; inside a
    Ray job without ``--storage`` (or ``--out``) the durable :data:`fedray.storage.JOB_STORAGE`,
    said in the log."""
    import os

    from fedray.storage import JOB_ENV, JOB_STORAGE, normalize

    if getattr(args, "storage", None):
        return normalize(args.storage)
    if JOB_ENV in os.environ and not getattr(args, "out", None):
        where = normalize(str(Path(JOB_STORAGE).expanduser()))
        print(f"fedray: inside a Ray job without --storage: results are stored in {where} on this node "
              "(the job's working directory is temporary); give --storage to choose", file=sys.stderr)
        return where
    return None


def cmd_tune(args) -> int:
    from fedray import tune

    spec = tune.load_spec(args.config, args.set)
    res = tune.search(spec, storage=_storage(args), resume=args.resume, quiet=args.quiet)
    print(f"search: {res['path']} ({res['finished']}/{res['trials']} trials finished, {res['errors']} errored)")
    if res["interrupted"]:
        print(f"interrupted; continue with: fedray tune {args.config} --resume", file=sys.stderr)
        return 130
    if res["best_path"] is None:
        print("no trial reported a result; no best config written", file=sys.stderr)
        return 1
    vals = ", ".join(f"{k}={v!r}" for k, v in res["best_values"].items())
    print(f"best {spec.metric} {res['best_metrics'][spec.metric]:.4f} with {vals}")
    print(f"best config: {res['best_path']}  (fedray run {res['best_path']})")
    if spec.final_seeds:
        from fedray import tune_heldout

        for line in tune_heldout.lines(tune_heldout.run(spec, res["best_values"]), spec.metric):
            print(line)
    return 0


def cmd_compare(args) -> int:
    from fedray import comparison as compare

    plan = compare.plan(args.config, args.set, out=args.out)
    res = compare.run(plan, progress=not args.quiet, storage=_storage(args), rerun=args.rerun)
    if res["reused"]:
        print(f"{res['reused']} of {len(plan.runs)} runs were completed already and read back (--rerun: train all)")
    print(res["report"]["table"], end="")
    print(f"report: {res['report']['markdown']}  (tensorboard --logdir {plan.exp_dir})")
    if res["stored"]:
        print(f"stored: {res['stored']}")
    return 0


def cmd_submit(args) -> int:
    from fedray import submit

    res = submit.submit(args.address, args.config, overrides=args.set, storage=args.storage, command=args.command,
                        working_dir=args.working_dir, env_file=args.runtime_env, wait=not args.no_wait,
                        resume=args.resume)
    if res["status"] is None:
        print(f"job {res['job_id']} submitted; follow with: ray job logs --address {args.address} -f {res['job_id']}")
        return 0
    print(f"job {res['job_id']} {res['status']}" + (f"; results in {res['storage']}" if res["storage"] else ""))
    return 0 if res["status"] == "SUCCEEDED" else 1


def cmd_report(args) -> int:
    from fedray import report

    res = report.write_report(args.runs_dir, args.out)
    print(res["table"], end="")
    print(f"report: {res['markdown']}, {res['html']} ({res['runs']} runs)")
    return 0


def cmd_list(args) -> int:
    from fedray import discover

    print(discover.list_text(args.kind, args.imports), end="")
    return 0


def cmd_describe(args) -> int:
    from fedray import discover

    print(discover.describe(args.name), end="")
    return 0


def add_discover(p: argparse.ArgumentParser, sub) -> None:
    """``--version``, ``list`` and ``describe`` (:mod:`fedray.discover`)."""
    from fedray import discover

    p.add_argument("--version", action="version", version=f"fedray {discover.version()}")
    ls = sub.add_parser("list", help="list the methods, models, data sets or robust rules (defenses) there are")
    ls.add_argument("kind", choices=discover.KINDS)
    ls.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import your own module first (its registrations and Method classes are listed)")
    ls.set_defaults(func=cmd_list)
    d = sub.add_parser("describe", help="a method's parameters (types, defaults, meaning) and paper, "
                       "or the fields of a config section (e.g. train, defense)")
    d.add_argument("name", help="a method name, an import path 'package.module:Method', or a config section")
    d.set_defaults(func=cmd_describe)


def build_parser() -> argparse.ArgumentParser:
    from fedray.discover import plain

    p = argparse.ArgumentParser(prog="fedray", description=plain(__doc__.splitlines()[0]))
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one experiment (default: configs/quickstart.yaml)")
    r.add_argument("config", nargs="?", help="YAML config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    r.add_argument("--out", help="output folder (default runtime.out_dir)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--storage", help="also copy the run folder here (path or pyarrow.fs URI, e.g. s3://bucket/runs)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    r.add_argument("--rerun", action="store_true", help="train again although this config has a completed run "
                   "(in a new folder <run>-r2, -r3...)")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("tune", help="Ray Tune search over config fields (tune: section)")
    t.add_argument("config", help="YAML config with a tune: section")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    t.add_argument("--storage", help="where the search lives (path or pyarrow.fs URI; default runtime.out_dir)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted search (Tuner.restore)")
    t.add_argument("--quiet", action="store_true", help="no line per finished trial, only the best")
    t.set_defaults(func=cmd_tune)

    c = sub.add_parser("compare", help="methods x seeds on the same data, devices and seeds (compare: section)")
    c.add_argument("config", help="YAML config with a compare: section")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    c.add_argument("--out", help="output folder (default runtime.out_dir)")
    c.add_argument("--storage", help="also copy the experiment folder here (path or pyarrow.fs URI)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--rerun", action="store_true", help="train every run again (new -r<n> folders), not only "
                   "the ones without a completed run")
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("submit", help="submit run/tune/compare to a Ray cluster as a Ray job")
    s.add_argument("config", help="YAML config inside the working directory")
    s.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    s.add_argument("--storage", help="where results go (path or pyarrow.fs URI); default for a head on this "
                   "machine: this caller's runtime.out_dir")
    s.add_argument("--command", choices=("run", "tune", "compare"), help="default: from the config's sections")
    s.add_argument("--working-dir", default=".", help="folder uploaded as the job's working directory")
    s.add_argument("--runtime-env", help="runtime-env YAML merged in (e.g. cluster/runtime_env.yaml)")
    s.add_argument("--no-wait", action="store_true", help="return after submitting")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run (from its folder in "
                   "--storage) or search (Tuner.restore)")
    s.set_defaults(func=cmd_submit)

    rp = sub.add_parser("report", help="rebuild the table and plots from run folders")
    rp.add_argument("runs_dir", help="folder with <method>-s<seed>-<hash>/ run folders (searched recursively)")
    rp.add_argument("--out", help="report folder (default RUNS_DIR/report)")
    rp.set_defaults(func=cmd_report)
    add_discover(p, sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FedrayError as e:
        print(str(e), file=sys.stderr)
        return 2
    except Interrupted as e:
        hint = f"; resume with: fedray run --resume {e.run_dir}" if e.checkpoint else ""
        print(f"interrupted by {e.signal_name} after aggregation {e.version}{hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
