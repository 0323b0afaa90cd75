"""Aggregator merge throughput vs a plain numpy copy (issue 4 benchmark).

Builds the VGG-11 CIFAR state dict (``build_model('vgg11', (3, 32, 32), 10)``,
about 9.2 M float32 parameters), K client updates with independent random
50% unstructured masks on every floating tensor, encoded with
:func:`fedray.submodel.encode.encode` as clients send them (at 50% density:
bitmask entries, one bit per coordinate + the covered float32 values), and measures in the same process, interleaved, ``--reps``
times (medians reported):

- ``copy``: ``np.copyto`` of every array of the K payloads into preallocated
  buffers -- the same bytes, the memory-bound floor;
- ``merge``: what the aggregator does with K buffered payloads: wrap each in
  :func:`fedray.aggregation.merge.lazy_decode` (the buffering in
  ``AggregatorCore.admit``) and apply :func:`fedray.aggregation.rules.masked_mean`
  (the rule of CA-HFP / HeteroFL / MaskFedAvg), on 1 thread and on all numba
  threads;
- ``merge_delta``: the same with :func:`rules.apply_delta_mean` (FedBuff);
- ``core_fedbuff``: the whole ``AggregatorCore`` path: ``receive`` (validation +
  buffering) of K updates, then the aggregation with the real FedBuff method
  (trigger at K; includes the non-finite check of the new model), the K updates in one
  ``receive`` call (``batch``: a sync round, a FedFix tick, K arrivals at once: the
  finiteness check is fused into the merge) or one call each (``1by1``: each update's
  verdict is final when its call returns, so the K-1 that wait in the buffer are scanned
  at admission); ``scan``: the batch with the fusion turned off (every update scanned);
- ``validate_only``: :func:`fedray.aggregation.validate.check` of the K
  payloads (the admission scan that the fusion saves);
- ``old``: the previous path: ``encode.decode`` to full shape + the numpy
  :class:`~fedray.aggregation.rules.MaskedAccumulator` (``--no-old`` skips it).

Throughput = bytes of the K payloads / seconds; the ratio of a path is its
throughput over the copy's, both from the same run (target: ``merge`` >= 0.5).

    python tools/bench_merge.py [--k 10] [--density 0.5] [--reps 7] [--no-old]
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np


def build(k: int, density: float, seed: int):
    import torch

    from fedray.models import build_model
    from fedray.submodel.encode import encode

    torch.manual_seed(seed)
    model = build_model("vgg11", (3, 32, 32), 10)
    params = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    payloads = []
    for _ in range(k):
        vals, mask = {}, {}
        for n, v in params.items():
            if np.issubdtype(v.dtype, np.floating):
                vals[n] = (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
                mask[n] = rng.random(v.shape) < density
        payloads.append(encode(vals, mask))
    return params, payloads


def fedbuff(k: int):
    from fedray.config import from_dict
    from fedray.methods import registry

    from fedray.methods.base import ServerContext

    cfg = from_dict({"method": {"name": "fedbuff", "buffer_size": k, "staleness": "constant"},
                     "data": {"name": "digits", "num_clients": max(k, 10)}})
    return registry.get("fedbuff").Server(ServerContext(cfg, "fedbuff", cfg.method.params, None, cfg.data.num_clients))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=10, help="updates per aggregation")
    ap.add_argument("--density", type=float, default=0.5, help="mask density")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions (medians)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile", type=int, default=None, help="coordinates per tile (default kernels.TILE)")
    ap.add_argument("--no-old", action="store_true", help="skip the old decode + numpy path")
    a = ap.parse_args(argv)

    from fedray.aggregation import kernels, rules, validate
    from fedray.aggregation.core import AggregatorCore
    from fedray.aggregation.merge import lazy_decode
    from fedray.submodel.encode import decode
    from fedray.update import Update

    if a.tile:
        kernels.TILE = a.tile
    params, payloads = build(a.k, a.density, a.seed)
    n_float = sum(v.size for v in params.values() if np.issubdtype(v.dtype, np.floating))
    shapes = {n: v.shape for n, v in params.items()}
    nbytes = sum(p.nbytes for p in payloads)
    kinds = sorted({e.kind for p in payloads for e in p.entries.values()})
    arrays = [a_ for p in payloads for e in p.entries.values() for a_ in (e.values, *e.index)]
    dst = [np.empty_like(x) for x in arrays]
    ns = [100 + 37 * i for i in range(a.k)]
    all_threads = numba.get_num_threads()

    def copy():
        for s, d in zip(arrays, dst):
            np.copyto(d, s)

    def merge(threads, delta=False):
        def run():
            numba.set_num_threads(threads)
            contribs = [rules.Contribution(*lazy_decode(p, shapes), float(n)) for p, n in zip(payloads, ns)]
            if delta:
                return rules.apply_delta_mean(params, contribs, 1.0)
            return rules.masked_mean(params, contribs)
        return run

    def core(threads, batch=True, fuse=True):
        state = {}

        def setup():
            state["core"] = AggregatorCore(params, fedbuff(a.k), fuse_checks=fuse)

        def run():
            numba.set_num_threads(threads)
            c = state["core"]
            items = [(Update(dispatch_id=i, client_id=i, base_version=0, num_examples=n, kind="delta"), p, None)
                     for i, (p, n) in enumerate(zip(payloads, ns))]
            for call in ([items] if batch else [[x] for x in items]):
                c.receive(call, evaluate=False)
            assert c.version == 1 and not c.rejected
        return setup, run

    def old():  # decoded (plain) contributions take the numpy MaskedAccumulator path
        return rules.masked_mean(params, [rules.Contribution(*decode(p, shapes), float(n))
                                          for p, n in zip(payloads, ns)])

    def check():  # AggregatorCore.admit's validation of the K payloads (part of core_fedbuff)
        for i, (p, n) in enumerate(zip(payloads, ns)):
            assert validate.check(Update(dispatch_id=i, client_id=i, base_version=0, num_examples=n), p, params) is None

    cases: dict[str, tuple] = {"copy": (None, copy), "validate_only": (None, check)}
    for t in sorted({1, all_threads}):
        cases[f"merge[{t}t]"] = (None, merge(t))
        cases[f"merge_delta[{t}t]"] = (None, merge(t, delta=True))
        cases[f"core_fedbuff[{t}t]"] = core(t)
        cases[f"core_1by1[{t}t]"] = core(t, batch=False)
        cases[f"core_scan[{t}t]"] = core(t, fuse=False)
    if not a.no_old:
        cases["old_decode+numpy"] = (None, old)

    # warm-up (numba compile / cache load) and a correctness check against the numpy path
    for setup, run in cases.values():
        if setup:
            setup()
        run()
    ref = old()
    fast = merge(all_threads)()
    assert all(np.array_equal(fast[k], ref[k]) for k in params), "fast merge differs from the numpy rules"

    times = {name: [] for name in cases}
    cpu = {name: [] for name in cases}
    for _ in range(a.reps):
        for name, (setup, run) in cases.items():
            if setup:
                setup()
            t0, c0 = time.perf_counter(), time.thread_time()
            run()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.thread_time() - c0)
    numba.set_num_threads(all_threads)

    med = {k: float(np.median(v)) for k, v in times.items()}
    cmed = {k: float(np.median(v)) for k, v in cpu.items()}
    print(f"VGG-11: {n_float / 1e6:.2f} M float params, K={a.k} updates, density {a.density}, "
          f"payload {nbytes / a.k / 1e6:.1f} MB each ({', '.join(kinds)}), {nbytes / 1e6:.0f} MB merged; "
          f"numba threads {all_threads}, tile {kernels.TILE}; "
          f"median of {a.reps}")
    print("wall: elapsed time; cpu: this thread's CPU time, shown for single-threaded paths only (it "
          "excludes time the OS gave to other jobs on a shared machine)")
    print(f"{'path':<22} {'wall ms':>9} {'GB/s':>7} {'ratio':>6} {'cpu ms':>8} {'cpu ratio':>10}")
    for name, t in med.items():
        single = "[" not in name or name.endswith("[1t]")
        c = f"{cmed[name] * 1e3:>8.1f} {cmed['copy'] / cmed[name]:>10.2f}" if single else f"{'-':>8} {'-':>10}"
        print(f"{name:<22} {t * 1e3:>9.1f} {nbytes / t / 1e9:>7.2f} {med['copy'] / t:>6.2f} {c}")
    for what, prefix, target in (("merge", "merge[", 0.5), ("admit + validate + merge", "core_fedbuff[", 0.8)):
        best = max(med['copy'] / med[k] for k in med if k.startswith(prefix))
        print(f"{what} throughput / copy throughput (wall, best thread count): {best:.2f} (target >= {target}) -> "
              f"{'PASS' if best >= target else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
