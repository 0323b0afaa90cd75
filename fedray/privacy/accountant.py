"""The privacy loss of a run, from Google's ``dp-accounting`` (no accountant of our own).

Central DP (DP-FedAvg / DP-FedBuff): every aggregation is one Poisson-subsampled Gaussian
mechanism with noise multiplier ``z`` and sampling rate ``q``: ``clients_per_round /
num_clients`` for synchronous rounds. Asynchronous schedules do not sample: the accounting
*assumes* each aggregation of ``K`` buffered updates is a Poisson sample of rate ``K /
num_clients`` (documented in ``docs/robustness.md``; an approximation, as in the DP-FedBuff
literature). Local DP: every update a client sends is a Gaussian mechanism on its own data;
the reported epsilon is that of the client that sent the most (no amplification).
"""
from __future__ import annotations

import functools
import logging

__all__ = ["epsilon", "Ledger"]

# integer orders (the fractional ones below 2 make dp-accounting's series warn for small q)
ORDERS = tuple(range(2, 129)) + (160, 192, 256, 384, 512)


@functools.lru_cache(maxsize=4096)
def epsilon(steps: int, noise_multiplier: float, sampling_rate: float, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``steps`` Poisson-sampled (``sampling_rate`` < 1) or plain
    (``sampling_rate`` = 1) Gaussian mechanisms of ``noise_multiplier``."""
    import dp_accounting as dpa

    if steps <= 0:
        return 0.0
    logging.getLogger("absl").setLevel(logging.ERROR)
    event = dpa.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dpa.PoissonSampledDpEvent(sampling_rate, event)
    if accountant == "pld":
        from dp_accounting.pld import pld_privacy_accountant

        acc = pld_privacy_accountant.PLDAccountant()
    else:
        from dp_accounting.rdp import rdp_privacy_accountant

        acc = rdp_privacy_accountant.RdpAccountant(list(ORDERS))
    acc.compose(dpa.SelfComposedDpEvent(event, int(steps)))
    return float(acc.get_epsilon(delta))


class Ledger:
    """A run's privacy loss so far (driver side)."""

    def __init__(self, cfg, updates_per_aggregation: int | None):
        p = cfg.privacy
        self.p = p
        self.central = p.mode == "central"
        self.q = min(1.0, (updates_per_aggregation or 1) / cfg.data.num_clients)
        self.target = cfg.server.target_epsilon

    def epsilon(self, aggregations: int, sent: dict | None = None) -> float:
        """After ``aggregations`` (central), or with ``sent[client]`` updates sent (local)."""
        p = self.p
        if self.central:
            return epsilon(int(aggregations), p.noise_multiplier, self.q, p.delta, p.accountant)
        return epsilon(max(sent.values()) if sent else 0, p.noise_multiplier, 1.0, p.delta, p.accountant)

    def exhausted(self, aggregations: int, sent: dict | None = None) -> bool:
        """Central: the next aggregation would pass ``server.target_epsilon``; local: it is reached."""
        if self.target is None:
            return False
        if self.central:
            return self.epsilon(aggregations + 1) > self.target
        return self.epsilon(aggregations, sent) >= self.target
