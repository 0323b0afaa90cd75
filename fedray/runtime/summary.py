"""The end of a run: its model, its summary (status, totals, the papers' metrics) and its last rows."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import ray

from fedray import config as C
from fedray import runs
from fedray.metrics import definitions, hparams

__all__ = ["write", "model_digest", "SUMMARY_TAGS"]

GLOSSARY = "docs/metrics.md (SDIR, time to target, sparse FLOPs, bytes, energy, staleness...)"
SUMMARY_TAGS = ("sdir", "sdir_layers", "slow_coverage", "time_to_target_s", "train_flops", "sparse_train_flops",
                "flops_per_accuracy_point", "bytes_up", "bytes_down", "server_egress", "energy_j", "virtual_s")


def model_digest(params: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(params):
        v = np.ascontiguousarray(params[k])
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.tobytes())
    return h.hexdigest()


def _placement(pool) -> dict:
    """``{pool: [node ids]}`` of the actors that answer (one whose node was just lost is left out)."""
    out: dict = {}
    for key, actors in pool.running().items():
        for a in actors:
            try:
                out.setdefault(str(key), []).append(ray.get(a.node_id.remote(), timeout=60))
            except Exception:
                continue
    return out


def write(run, status: str, error: str | None) -> dict:
    """Write what run ``run`` has: model, summary (with its status), the last rows."""
    cfg, primary = run.cfg, run.setup.task.primary
    state, tot = run.tracker.state, run.accounting.totals
    summary = {"experiment": cfg.experiment, "method": cfg.method.name, "seed": cfg.seed, "status": status,
               "metric": primary, "run_dir": str(run.run_dir), "config_hash": runs.config_hash(C.to_dict(cfg))}
    if error is not None:
        summary["error"] = error
    try:
        params, stats = run.final or (ray.get(run.aggregator.params.remote(), timeout=60),
                                      ray.get(run.aggregator.stats.remote(), timeout=60))
    except Exception:  # the aggregator is gone: the rows and the last checkpoint are what is left
        params, stats = None, None
    placement = _placement(run.pool)
    wall = run.accounting.wall()
    if params is not None:
        np.savez(run.run_dir / "model.npz", **{k: params[k] for k in sorted(params)})
    table = run.recorder.table()
    derived = definitions.summarize(table, slow_total=int(run.dispatcher.slow.sum()), metric=primary)
    best = state["best"] if math.isfinite(state["best"]) else -1.0
    summary.update({
        f"final_{primary}": state["score"], f"best_{primary}": best, "final_loss": state["loss"],
        "rounds": state["version"], "version": state["version"], "wall_s": wall,
        "setup_s": run.setup_s, "virtual_s": state["t"], "bytes_up": tot.bytes_up, "bytes_down": tot.bytes_down,
        "server_egress": tot.egress_bytes, "train_flops": tot.train_flops,
        "sparse_train_flops": tot.sparse_train_flops, "energy_j": tot.energy_j, "updates": tot.updates,
        "dropped": tot.dropped, "late": tot.late, "rejected": tot.rejected, "checkpoints": run.checkpoints,
        "aggregator_recoveries": run.recoveries, "actor_replacements": run.pool.replaced,
        **derived, **{f"client_{primary}_{k}": x for k, x in state["clients"].items()},
    })
    if stats is not None:
        summary.update({"rejected_by_reason": stats["rejected"], "model_puts": stats["puts"],
                        "model_inline": stats["inlined"], "client_state_bytes": stats["client_state_bytes"],
                        "model_sha256": model_digest(params), "placement": placement})
    if run.ledger is not None:
        summary.update({"epsilon": run.ledger.epsilon(state["version"], tot.sent), "delta": cfg.privacy.delta,
                        "noise_multiplier": cfg.privacy.noise_multiplier, "privacy_mode": cfg.privacy.mode})
        if stats is not None and cfg.privacy.adaptive:
            summary["dp_clip"] = stats["dp_clip"]
    if cfg.attack.kind != "none":
        summary.update({"attack": cfg.attack.kind, "malicious_clients": len(run.accounting.malicious)})
    if stats is not None and stats.get("client_error"):
        summary["client_error"] = stats["client_error"]  # the first one (rejected_by_reason: how many)
    if stats is not None and stats.get("excluded"):
        summary["defense_excluded"] = stats["excluded"]
    if cfg.server.target_accuracy is not None:
        summary["target_accuracy"] = cfg.server.target_accuracy
        summary["time_to_target_s"] = state["target_s"]
    # the papers' seed metrics, under the same tags for every method
    tags = (f"final_{primary}", f"best_{primary}") + SUMMARY_TAGS
    run.recorder.scalars(state["version"], {  # NaN where a run has no value (target never reached)
        f"summary/{k}": summary[k] if isinstance(summary.get(k), (int, float)) else math.nan
        for k in tags}, virtual_s=state["t"])
    rows = [f"| {k} | {summary[k]:.6g} |" for k in tags if isinstance(summary.get(k), (int, float))]
    run.recorder.text("summary", "\n".join([f"{cfg.method.name} seed {cfg.seed}: {status}", "", "| metric | value |",
                                            "|---|---|", *rows, "", f"Every metric is explained in {GLOSSARY}."]),
                      state["version"])
    name = runs.parse(run.run_dir.name)  # a compare entry's label is its folder's
    label = name["label"] if name and name["label"] != cfg.method.name.replace(":", ".") else None
    if status == "completed":  # once: an interrupted run writes them when it completes
        run.recorder.hparams(hparams.hparams_of(cfg, label), hparams.metrics_of(summary))
    run.recorder.close(summary)
    return summary

