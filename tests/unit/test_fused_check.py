"""The finiteness check fused into the merge (:mod:`fedray.aggregation.core`): the same
verdicts, counters, buffers and bits as scanning every update at admission, for sync rounds
(one call, forced) and buffered asynchronous aggregation (calls of any size)."""
from __future__ import annotations

import numpy as np
import pytest

from fedray.aggregation import validate
from fedray.aggregation.core import AggregatorCore
from fedray.config import from_dict
from fedray.methods import registry
from fedray.methods.base import ServerContext
from fedray.submodel.encode import encode
from fedray.update import Update

SHAPES = {"w": (6, 5), "b": (5,)}


def server(method, **opts):
    c = from_dict({"method": {"name": method, **opts}, "data": {"num_clients": 20},
                   "server": {"clients_per_round": 5}})
    return registry.get(method).Server(ServerContext(c, method, c.method.params, None, 20))


def items(n, poisoned, seed=0, kind="model"):
    """``n`` updates with 50% masks; those in ``poisoned`` carry a NaN or an Inf."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        vals = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        mask = {k: rng.random(s) < 0.5 for k, s in SHAPES.items()}
        mask["b"][0] = True
        if i in poisoned:
            vals["b"][0] = np.nan if i % 2 else np.inf
        h = Update(dispatch_id=i, client_id=i, base_version=0, num_examples=10 + i, kind=kind)
        out.append((h, encode(vals, mask), None))
    return out


def run(make, batches, fuse, **kw):
    core = AggregatorCore({k: np.zeros(s, np.float32) for k, s in SHAPES.items()}, make(), fuse_checks=fuse)
    outs = [core.receive(b, evaluate=False, **kw) for b in batches]
    return core, outs


def same(a, b):
    (ca, oa), (cb, ob) = a, b
    assert oa == ob  # results, buffer counts, rejections, versions
    assert ca.version == cb.version and ca.rejected == cb.rejected and ca.applied == cb.applied
    for k in SHAPES:
        assert np.array_equal(ca.params[k], cb.params[k])
    assert not ca._unscanned and not ca._late


@pytest.mark.parametrize("poisoned", [(), (1,), (0, 3), (0, 1, 2, 3, 4, 5)])
def test_sync_rounds_match_the_admission_scan(poisoned):
    its = items(6, poisoned)
    ref = run(lambda: server("fedavg"), [its], False, force=True)
    same(run(lambda: server("fedavg"), [its], True, force=True), ref)
    rejected = [d for d, r in ref[1][0]["results"] if r]
    assert rejected == sorted(poisoned) and ref[0].rejected.get("nonfinite", 0) == len(poisoned)


@pytest.mark.parametrize("split", [1, 2, 3, 10])
@pytest.mark.parametrize("poisoned", [(), (2,), (1, 4, 5), (0, 1, 2)])
def test_buffered_aggregation_matches_the_admission_scan(split, poisoned):
    its = items(10, poisoned, seed=1, kind="delta")
    batches = [its[i:i + split] for i in range(0, len(its), split)]
    make = lambda: server("fedbuff", buffer_size=3, staleness="constant")  # noqa: E731
    same(run(make, batches, True), run(make, batches, False))


def test_the_merge_is_the_first_read_only_where_it_is_exact(monkeypatch):
    scanned = []
    real = validate.all_finite
    monkeypatch.setattr(validate, "all_finite", lambda a: scanned.append(a.size) or real(a))
    run(lambda: server("fedavg"), [items(4, ())], True, force=True)
    assert scanned == []  # a sync round: its updates' first read is the merge's
    run(lambda: server("fedavg"), [items(4, ())], False, force=True)
    assert len(scanned) == 8
    scanned.clear()
    run(lambda: server("fedbuff", buffer_size=3, server_momentum=0.9), [items(3, (), kind="delta")], True)
    assert len(scanned) == 6  # momentum keeps state: scanned at admission
    assert server("fedfix").fused_check() and not server("fedasync").fused_check()


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_the_merge_kernel_knows_whether_what_it_wrote_is_finite(parallel, mode):
    from fedray.aggregation import kernels
    from fedray.aggregation.kernels import Piece

    rng = np.random.default_rng(3)
    olds = [rng.standard_normal(40_000).astype(np.float32) for _ in range(3)]
    vals = [rng.standard_normal(40_000).astype(np.float32) for _ in range(3)]
    vals[1][33_333] = np.inf if mode == 1 else np.nan  # tensor 1 ends non-finite, far into a later tile
    pieces = [[Piece("dense", v, ())] for v in vals[:2]] + [[]]  # tensor 2: no piece, the kernel writes nothing
    with kernels.finite_outputs() as seen:
        outs = kernels.merge_many(olds, pieces, [[0.5], [0.5], []], mode, tile=4096, parallel=parallel)
    assert {k: f for k, (a, f) in seen.items()} == {id(outs[0]): True, id(outs[1]): False}
    assert [seen[id(o)][1] for o in outs[:2]] == [bool(np.isfinite(o).all()) for o in outs[:2]]
    kernels.merge_many(olds, pieces, [[0.5], [0.5], []], mode)
    assert len(seen) == 2  # outside the block nothing is recorded


def test_the_new_model_check_reads_nothing_the_merge_wrote(monkeypatch):
    """Regression (issue 14): the aggregation read the whole merged model once more for NaN/Inf."""
    from fedray.aggregation import core as core_mod

    scanned = []
    real = core_mod.all_finite
    monkeypatch.setattr(core_mod, "all_finite", lambda a: scanned.append(a.size) or real(a))
    c, _ = run(lambda: server("fedbuff", buffer_size=3, staleness="constant"), [items(3, (), kind="delta")], True)
    assert c.version == 1 and scanned == []
    c, _ = run(lambda: server("fedbuff", buffer_size=3, staleness="constant"), [items(3, (1,), kind="delta")], True)
    assert c.rejected["nonfinite"] == 1 and c.version == 0  # found by the kernel's flag, then the scan of updates
    c, _ = run(lambda: server("fedbuff", buffer_size=3, server_momentum=0.9), [items(3, (), kind="delta")], True)
    assert c.version == 1 and len(scanned) == 2  # momentum may change the merge's arrays: the model is read
