"""Convert FedScale device files into a fedray trace file (Parquet or CSV).

    python tools/fedscale_traces.py CAPACITY.pkl --behavior BEHAVIOR.pkl --out traces.parquet

CAPACITY: FedScale's ``client_device_capacity`` pickle ({id: {"computation": ms/sample,
"communication": kbps}}); BEHAVIOR: its ``client_behave_trace`` pickle ({id: {"active": [...],
"inactive": [...], "finish_time": s, "duration": s}}). Only convert files you trust: unpickling
runs code. Conventions: see ``fedray.devices.traces.convert_fedscale``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from fedray.devices.traces import convert_fedscale
    from fedray.errors import FedrayError
except ModuleNotFoundError:  # run from a checkout without installing fedray
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedray.devices.traces import convert_fedscale
    from fedray.errors import FedrayError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("capacity", help="FedScale device capacity pickle")
    parser.add_argument("--behavior", default=None, help="FedScale behaviour (availability) pickle; "
                        "omitted = always available")
    parser.add_argument("--out", required=True, help="output trace file (.parquet, .pq or .csv)")
    parser.add_argument("--num-clients", type=int, default=None,
                        help="number of output clients (default: entries in the capacity file)")
    parser.add_argument("--reference-ms", type=float, default=None,
                        help="ms per sample of a 1.0x device (default: median of the capacity file)")
    parser.add_argument("--cpu-load", type=float, default=0.0, help="constant background CPU load, 0..1")
    args = parser.parse_args(argv)
    try:
        traces = convert_fedscale(
            args.capacity, args.behavior, args.out,
            num_clients=args.num_clients, reference_ms_per_sample=args.reference_ms, cpu_load=args.cpu_load,
        )
    except FedrayError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"wrote {len(traces)} client traces to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
