"""What happens after every aggregation: the event rows and TensorBoard scalars of the
aggregation and its evaluation, the planner's view of the evaluation, the per-client spread,
time to target, the progress bar, the periodic flush to disk, and the guard that stops a run
whose every update keeps being rejected (``server.max_rejected_rounds``).

:class:`Progress` keeps its own state (best and last score, time to target, the streak of
all-rejected aggregations...), checkpointed with the run.
"""
from __future__ import annotations

import collections
import math
import os
import sys
import time

import numpy as np

from fedray.aggregation.validate import REASONS
from fedray.errors import RunStopped

__all__ = ["Progress", "eta", "make_bar", "spread"]


def spread(values) -> dict[str, float]:
    """Mean, standard deviation, minimum and 10th / 90th percentiles of per-client values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}


FALLBACK_SIZE = (80, 24)
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {eta}{postfix}]"


def bar_size(stream) -> dict:
    """tqdm's size arguments: follow the terminal's size, except where it reports 0 columns or rows
    (a pseudo-terminal nobody sized; tqdm would hide the bar there): 80 x 24 then."""
    try:
        cols, rows = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return {"dynamic_ncols": True}
    if cols > 0 and rows > 0:
        return {"dynamic_ncols": True}
    return {"ncols": cols or FALLBACK_SIZE[0], "nrows": rows or FALLBACK_SIZE[1], "dynamic_ncols": False}


def eta(mark, n: int, total: int | None, now: float) -> str:
    """Time left from the aggregations measured since ``mark`` = (time, count) at the end of the
    first window (setup, the first dispatches): ``--`` until one more has been measured."""
    if mark is None or not total or n <= mark[1] or now <= mark[0]:
        return "--"
    from tqdm import tqdm

    return tqdm.format_interval(max(total - n, 0) * (now - mark[0]) / (n - mark[1]))


def make_bar(total: int, desc: str, unit: str, **kw):
    """A tqdm bar (tqdm.auto: a widget in notebooks) with the ETA of :func:`eta` and the width of
    :func:`bar_size`."""
    from tqdm.auto import tqdm

    class Bar(tqdm):
        mark = None

        def update(self, n=1):
            if self.mark is None and n and not self.disable:
                self.mark = (self._time(), self.n + n)
            return super().update(n)

        @property
        def format_dict(self):
            d = super().format_dict
            d["eta"] = eta(self.mark, d["n"], d["total"], self._time())
            return d

    stream = kw.pop("file", sys.stderr)
    return Bar(total=total, desc=desc, unit=unit, file=stream, bar_format=BAR_FORMAT, **bar_size(stream), **kw)


class Progress:
    def __init__(self, run, bar=None):
        self.run, self.bar = run, bar
        self.primary = run.setup.task.primary
        self.state = {"best": -math.inf, "score": float("nan"), "loss": float("nan"), "t": 0.0, "last_agg_t": 0.0,
                      "target_s": None, "clients": {}, "rejected_streak": 0, "streak_reasons": {}, "version": 0}
        self._flushed = time.time()

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state) -> None:
        self.state = dict(state)

    def __call__(self, res, t, rnd) -> None:
        run, state, primary = self.run, self.state, self.primary
        rec, tot, cfg = run.recorder, run.accounting.totals, run.cfg
        target = cfg.server.target_accuracy
        wall = run.accounting.wall(res)
        v = res["version"]  # the version this result closed (a pipelined loop is already past it)
        state["t"], state["version"] = t, v
        rec.event(event="aggregate", round=rnd, version=v, virtual_s=t, wall_s=wall,
                  buffer=res.get("buffer", 0), fill_s=t - state["last_agg_t"])
        rejected = res.get("rejected", {})
        rec.scalars(v, {"agg/buffer": res.get("buffer", 0), "agg/fill_s": t - state["last_agg_t"],
                        **{f"agg/rejected/{k}": rejected.get(k, 0) for k in REASONS}})
        rec.histogram("agg/staleness", [x for x in res.get("staleness", []) if x is not None], v)
        state["last_agg_t"] = t
        metrics = res.get("metrics")
        clients = res.get("clients")
        if clients is None and run.method.schedule != "sync":
            due = run.client_eval_due(v)
            clients = run.aggregator_get(run.aggregator.client_metrics.remote(due)) if due else None
        extra = {}
        if clients:
            sp = spread(m[primary] for m in clients.values())
            state["clients"] = sp
            extra = {f"client_{primary}_{k}": x for k, x in sp.items()}
        if metrics:
            score, loss = metrics[primary], metrics["loss"]
            state["score"], state["loss"], state["best"] = score, loss, max(state["best"], score)
            run.planner.on_eval(score, loss)
            if target is not None and state["target_s"] is None and score >= target:
                state["target_s"] = t
            rec.event(event="eval", round=rnd, version=v, **metrics, wall_s=wall, virtual_s=t, **extra)
            rec.scalars(v, {
                **{f"eval/{k}": x for k, x in metrics.items()}, "cost/bytes_up": tot.bytes_up,
                "cost/bytes_down": tot.bytes_down, "cost/train_flops": tot.train_flops,
                "cost/energy_j": tot.energy_j, "time/wall_s": wall, "time/virtual_s": t,
                **{f"clients/{primary}_{k}": x for k, x in state["clients"].items() if extra}}, virtual_s=t)
            if run.report is not None:
                run.report({**metrics, "version": v, "virtual_s": t, "wall_s": wall})
        elif extra:
            rec.event(event="client_eval", round=rnd, version=v, wall_s=wall, virtual_s=t, **extra)
        post = {primary[:3]: f"{state['score']:.3f}", "vt": f"{t:.0f}s"}
        if run.ledger is not None:
            state["epsilon"] = run.ledger.epsilon(v, run.accounting.totals.sent)
            rec.scalars(v, {"privacy/epsilon": state["epsilon"]}, virtual_s=t)
            post["eps"] = f"{state['epsilon']:.2f}"
        if self.bar is not None:
            self.bar.set_postfix(post)
            self.bar.update(v - self.bar.n)
        if time.time() - self._flushed >= cfg.runtime.flush_s:
            self.flush()
        self._guard(res)

    def flush(self) -> None:
        self.run.recorder.flush()
        self._flushed = time.time()

    def _guard(self, res) -> None:
        """Stop a run whose every update of ``max_rejected_rounds`` aggregations in a row was rejected."""
        limit = self.run.cfg.server.max_rejected_rounds
        results = res.get("results") or []
        if not limit or not results:
            return
        reasons = [r for _, r in results]
        state = self.state
        if all(r is not None for r in reasons):
            state["rejected_streak"] += 1
            counts = collections.Counter(state["streak_reasons"])
            counts.update(reasons)
            state["streak_reasons"] = dict(counts)
        else:
            state["rejected_streak"], state["streak_reasons"] = 0, {}
        if state["rejected_streak"] >= limit:
            why = ", ".join(f"{k}: {n}" for k, n in sorted(state["streak_reasons"].items(), key=lambda x: -x[1]))
            hint = " (diverging training? check train.lr)" if "nonfinite" in state["streak_reasons"] else ""
            raise RunStopped(f"server.max_rejected_rounds: every update of the last {limit} aggregations was "
                             f"rejected ({why}){hint}")
