"""Accounting: every resolved dispatch becomes one metrics row, and the totals are the sums
of those rows -- the same bytes and FLOPs the dispatch was costed with (virtual time).

``Accounting.record`` reads the update headers of a batch of records, feeds the planner the
telemetry the devices reported (measured in ``devices.mode: real``), and writes the rows in
virtual-time order. Rows carry the dispatch's cost (``train_flops``, ``sparse_train_flops``,
``bytes_down``, ``bytes_up``, ``energy_j``, ``egress_bytes``), its timing, its outcome
(``update``, ``reject`` with a ``reason``, ``drop``, ``late``), and the layers it trained
and got aggregated (``layers``, ``layers_included``: layer-level inclusion, ``sdir_layers``).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from fedray import security
from fedray.devices import cost as costs
from fedray.runtime.dispatch import Dispatcher, Inflight, slot

__all__ = ["Totals", "Accounting"]


@dataclass
class Totals:
    bytes_up: int = 0
    bytes_down: int = 0
    egress_bytes: int = 0
    train_flops: int = 0
    sparse_train_flops: int = 0
    energy_j: float = 0.0
    updates: int = 0
    dropped: int = 0
    late: int = 0
    rejected: int = 0
    sent: dict = dataclasses.field(default_factory=dict)  # client -> updates accepted (local DP only)


class Accounting:
    def __init__(self, cfg, dispatcher: Dispatcher, planner, recorder, t0: float):
        self.cfg, self.dispatcher, self.planner, self.recorder = cfg, dispatcher, planner, recorder
        self.t0 = t0
        self.totals = Totals()
        self.malicious = security.malicious_set(cfg)
        self.count_sent = cfg.privacy.local

    def wall(self, res: dict | None = None) -> float:
        """Wall seconds since the first dispatch: when the aggregator finished ``res`` (it stamps
        its results; rounds are read in windows), else now."""
        now = res["done_at"] if res is not None and "done_at" in res else time.time()
        return max(0.0, now - self.t0)  # another node's clock may be a little behind

    def row(self, r: Inflight, event: str, **extra) -> dict:
        a = r.task.assignment
        p = self.dispatcher.profiles[a.client_id]
        sent = event in ("update", "reject", "late")
        row = {"event": event, "round": r.round, "version": r.task.version, "dispatch_id": r.dispatch_id,
               "client_id": a.client_id, "tier": p.tier, "slow": bool(self.dispatcher.slow[a.client_id]),
               "t_start": r.t_start, "virtual_s": r.t_end, "round_s": r.t_end - r.t_start,
               "compute_s": r.cost.compute_s, "comm_s": r.cost.download_s + r.cost.upload_s,
               "bytes_down": r.bytes_down, "bytes_up": r.bytes_up if sent else 0,
               "egress_bytes": r.egress, "train_flops": r.flops, "energy_j": r.energy_j,
               "sparse_train_flops": int(r.flops * r.sub.sparse_factor), "layers": r.sub.layers,
               "layers_included": 0.0, "malicious": a.client_id in self.malicious}
        row.update(dict(a.info))
        row.update(extra)
        return row

    def record(self, recs: list[Inflight], res: dict | None, window: int) -> None:
        """Read the headers of ``recs``, feed the planner its telemetry, write every event row.
        ``window``: the server's version when they arrived (a synchronous round's is the
        version it trained on, the loop being rounds ahead)."""
        ups = [r for r in recs if r.outcome == "update"]
        if res is not None and "headers" in res:  # a round the aggregator dispatched brings them
            headers = {r.dispatch_id: slot(res["headers"][r.call], r.slot) for r in ups}
        else:
            headers = Dispatcher.headers(ups)
        reasons = dict(res["results"]) if res else {}
        staleness = dict(zip([d for d, _ in res["results"]], res["staleness"])) if res else {}
        included = res.get("included", {}) if res else {}
        moves = res.get("moves", {}) if res else {}
        real = self.cfg.devices.mode == "real"
        rows = []
        for r in recs:
            self.dispatcher.release(r.client_id)
            if r.outcome != "update":
                rows.append(self.row(r, r.outcome, window=window))
                continue
            h = headers[r.dispatch_id]
            if isinstance(h, Exception):  # the actor or its node is gone (after Ray's retries)
                rows.append(self.row(r, "drop", window=window, reason=type(h).__name__))
                continue
            if real:  # the device measured its compute: the round and what it reports use it
                m = costs.measured(self.dispatcher.profiles[r.client_id], r.cost, h.wall_s)
                r.t_end, r.energy_j = r.t_start + m.total_s, m.energy_j
                h = dataclasses.replace(h, telemetry={**h.telemetry, "round_s": m.total_s, "compute_s": m.compute_s})
            self.planner.observe(h)
            reason = reasons.get(r.dispatch_id)
            if h.error is not None:
                r.bytes_up = 0  # the device reported an error, not an update
            extra = {"layers_included": 0.0 if reason else r.sub.layers * float(included.get(r.dispatch_id, 1.0))}
            rows.append(self.row(r, "reject" if reason else "update", window=window, reason=reason,
                                 staleness=staleness.get(r.dispatch_id), examples=h.num_examples,
                                 train_loss=h.train_loss, client_wall_s=h.wall_s,
                                 update_norm=moves.get(r.dispatch_id), **extra))
            if self.count_sent and h.error is None:  # every update sent spends privacy, accepted or not
                self.totals.sent[r.client_id] = self.totals.sent.get(r.client_id, 0) + 1
        if res is not None:
            for message in res.get("messages", ()):
                self.planner.receive(message)
        rows.sort(key=lambda x: (x["virtual_s"], x["dispatch_id"]))
        wall = self.wall(res)
        for row in rows:
            self.account(row, wall)

    def account(self, row: dict, wall: float) -> None:
        tot = self.totals
        row["wall_s"] = wall
        self.recorder.event(**row)
        tot.bytes_down += row["bytes_down"]
        tot.bytes_up += row["bytes_up"]
        tot.egress_bytes += row["egress_bytes"]
        tot.train_flops += row["train_flops"]
        tot.sparse_train_flops += row["sparse_train_flops"]
        tot.energy_j += row["energy_j"]
        ev = row["event"]
        tot.updates += ev == "update"
        tot.dropped += ev == "drop"
        tot.late += ev == "late"
        tot.rejected += ev == "reject"
