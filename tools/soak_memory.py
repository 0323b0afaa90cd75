"""Driver memory soak: the driver's resident memory (RSS) while a long run goes on must stay flat,
since the event rows are on disk, not in memory.

    python tools/soak_memory.py [CONFIG] [--rounds 20000] [--from-round 500] [--set a.b=v ...] [--json]

Runs CONFIG (default: the quickstart) for ``--rounds`` aggregations and samples the driver's RSS
after each one; prints the RSS at ``--from-round`` and at the end and the growth between them
(the issue's bound: within 5 % from round 500 to round 20,000 of the quickstart).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default=os.path.join(HERE, "..", "configs", "quickstart.yaml"))
    ap.add_argument("--rounds", type=int, default=20000)
    ap.add_argument("--from-round", type=int, default=500, help="the round whose RSS is the baseline")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=v")
    ap.add_argument("--out", default=None, help="runs folder (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = ap.parse_args(argv)
    if a.from_round >= a.rounds:
        ap.error("--from-round must be below --rounds")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import psutil

    from fedray import config as C
    from fedray.runtime import progress
    from fedray.runtime.runner import Runner

    out = a.out or tempfile.mkdtemp(prefix="fedray-soak-")
    cfg = C.load(a.config, [*a.overrides, f"server.rounds={a.rounds}", f"runtime.out_dir={out}",
                            "runtime.progress=false", "server.target_accuracy=null"])
    me = psutil.Process()
    rss: dict[int, int] = {}
    call = progress.Progress.__call__

    def sampled(self, res, t, rnd):
        call(self, res, t, rnd)
        rss[int(res["version"])] = me.memory_info().rss

    progress.Progress.__call__ = sampled
    summary = Runner(cfg).run()
    base, end = rss[min(v for v in rss if v >= a.from_round)], rss[max(rss)]
    mib = 2 ** 20
    result = {"rounds": summary["version"], "rss_from_mib": round(base / mib, 1), "rss_end_mib": round(end / mib, 1),
              "growth_mib": round((end - base) / mib, 2), "growth": round(end / base - 1, 4),
              "peak_mib": round(max(v for k, v in rss.items() if k >= a.from_round) / mib, 1),
              "wall_s": round(summary["wall_s"], 1), "run_dir": summary["run_dir"]}
    if a.json:
        print(json.dumps(result))
    else:
        print(f"driver RSS: {result['rss_from_mib']} MiB at round {a.from_round}, {result['rss_end_mib']} MiB at "
              f"round {result['rounds']} ({100 * result['growth']:+.2f} %, {result['growth_mib']:+.2f} MiB; "
              f"peak {result['peak_mib']} MiB) in {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
