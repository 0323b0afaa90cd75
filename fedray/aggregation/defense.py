"""The defence stage around the buffer, for every method.

Before the buffer (:meth:`Defense.screen`, each call's validated updates together):

1. **Example weights**: an update's weight is capped by the server's own count of the
   client's examples (a client cannot claim more data than it was given) and by
   ``server.max_examples_weight``.
2. **Attack simulation** (``attack:``): sign flip, scaling and noise are crafted here
   (:mod:`fedray.aggregation.attacks`).
3. **Norm guard** (on by default): an update whose move (L2 norm) exceeds
   ``defense.norm_guard`` (50) x the median move of the recent updates (the last
   ``defense.norm_window`` and this call's) is rejected with reason ``norm``. While fewer than
   3 moves are known (an asynchronous run's first two updates) the reference is the norm of the
   model itself. The multiple is generous on purpose: honest moves differ by 10x and more
   (HeteroFL's 1/16-width clients move ten times as far as full-width ones).
4. **Clipping** (``defense.clip``): to a fixed ``C``, or to the ``clip_quantile`` of the
   recent accepted norms (these included).

In place of the mean (:meth:`Defense.combine`, the buffer at aggregation time):

5. ALIE and IPM are crafted from the honest updates of the same aggregation.
6. **DP** (``privacy:``, central): every update is replaced by the DP mean
   (:func:`fedray.privacy.mechanism.dp_mean`); or
7. **the robust rule** (``defense.rule``): every update is replaced by the rule's estimate, so
   the method's own mean -- weighted, masked, staleness-weighted, mixed -- yields the rule's
   value in place of the mean; Krum / multi-Krum pass on only the selected updates (the
   others are left out, ``layers_included`` 0). With too few updates for Krum's ``f``
   (``n <= 2f + 2``, after drop-outs) nothing is aggregated and the model keeps its value.

Moves: an update that sent a delta is its own move; one that sent trained values is measured
against the current model. The rules weigh updates as the method does
(:meth:`~fedray.methods.base.Server.update_weight`). With only the guard and nothing rejected
the updates reach the method untouched (bit for bit).
"""
from __future__ import annotations

import math

import numpy as np

from fedray import seeding, security
from fedray.aggregation import attacks, robust
from fedray.aggregation.accumulate import Contribution
from fedray.methods.base import Entry
from fedray.privacy import mechanism

__all__ = ["Defense"]


def _float(a) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def _keys(params, entries) -> list[str]:
    """The floating keys some of ``entries`` cover, sorted."""
    return sorted({k for e in entries for k in e.contribution.mask.keys() if _float(params[k])})


class Defense:
    def __init__(self, cfg, server, examples: np.ndarray | None = None):
        self.cfg, self.server = cfg, server
        self.d, self.a, self.p = cfg.defense, cfg.attack, cfg.privacy
        self.examples = None if examples is None else np.asarray(examples, dtype=np.float64)
        self.malicious = security.malicious_set(cfg)
        self.poison = self.a.kind in attacks.MODEL_POISONING and bool(self.malicious)
        self.expected = security.expected_updates(cfg)
        self.transform = self.poison or self.d.clip != "none" or self.d.rule != "mean" or self.p.central
        self.state = {"seen": [], "norms": [], "center": None, "dp_clip": float(self.p.clip), "excluded": 0}

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.state.items()}

    def load_state_dict(self, state) -> None:
        self.state = dict(state)

    # ------------------------------------------------------------ before the buffer
    def screen(self, params, entries: list[Entry], version: int) -> list[tuple[Entry | None, str | None, float]]:
        """The validated updates of one call, in order: ``(entry to buffer or None, rejection
        reason, L2 move)`` after the example weights, the self-contained attacks, the norm
        guard and clipping."""
        entries = [self._weighted(e) for e in entries]
        if not entries or (self.d.norm_guard is None and not self.transform):
            return [(e, None, math.nan) for e in entries]
        if not self.transform:  # the guard alone: norms only, the updates untouched
            norms = self._norms(params, entries)
            rejected = self._guard(norms, params, _keys(params, entries))
            self._remember("norms", norms[~rejected])
            return [(None if bad else e, "norm" if bad else None, float(x)) for e, x, bad in zip(entries, norms, rejected)]
        s = self._stack(params, entries, version)
        if self.poison and self.a.kind in attacks.SELF_CONTAINED:
            s = self._craft(s, entries)
        norms = s.norms()
        rejected = self._guard(norms, params, list(s.u))
        ok = np.flatnonzero(~rejected)
        self._remember("norms", norms[ok])
        if self.d.clip != "none" and len(ok):
            s = s.scaled(robust.clip_factors(norms, self._clip_bound()))
        changed = self.d.clip != "none" or (self.poison and self.a.kind in attacks.SELF_CONTAINED)
        kept = self._write(params, [entries[i] for i in ok], s.take(ok), None) if changed else [entries[i] for i in ok]
        out: list = [(None, "norm", float(x)) for x in norms]
        for i, e in zip(ok, kept):
            out[i] = (e, None, float(norms[i]))
        return out

    # ------------------------------------------------------------ in place of the mean
    def combine(self, params, entries: list[Entry], version: int) -> tuple[list[Entry], list[int]]:
        """The buffer as the method aggregates it, and the dispatch ids left out of it (Krum's
        unselected; all of them when too few for Krum's ``f``)."""
        if not entries or not self.transform:
            return entries, []
        s = self._stack(params, entries, version)
        if self.poison and self.a.kind not in attacks.SELF_CONTAINED:
            s = self._craft(s, entries)
            if self.d.rule == "mean" and not self.p.enabled:
                return self._write(params, entries, s, None), []
        if self.p.central:
            return self._write(params, entries, s, self._dp(s, s.norms(), version)), []
        rule = self.d.rule
        if rule == "mean":
            return entries, []
        if rule in ("krum", "multi_krum"):
            if s.n <= 2 * self.d.f + 2:
                self.state["excluded"] += s.n
                return [], [e.dispatch_id for e in entries]
            chosen = robust.multi_krum(s, self.d.f, 1 if rule == "krum" else self.d.m)
            left = sorted(set(range(s.n)) - set(chosen.tolist()))
            self.state["excluded"] += len(left)
            return [entries[i] for i in chosen], [entries[i].dispatch_id for i in left]
        r = robust.low_coverage(s, self._rule(s), self.d.min_coverage, self.d.low_coverage)
        return self._write(params, entries, s, r), []

    # ------------------------------------------------------------ steps
    def _weighted(self, e: Entry) -> Entry:
        w = e.contribution.weight
        cap = self.cfg.server.max_examples_weight
        if self.examples is not None and e.client_id < len(self.examples):
            w = min(w, float(self.examples[e.client_id]))
        if cap is not None:
            w = min(w, float(cap))
        if w == e.contribution.weight:
            return e
        c = e.contribution
        return Entry(e.update, Contribution(c.values, c.mask, w), e.extras, e.state)

    def _craft(self, s: robust.Stack, entries) -> robust.Stack:
        bad = np.array([e.client_id in self.malicious for e in entries])
        rngs = {i: seeding.rng(self.cfg.seed, "attack_noise", e.dispatch_id) for i, e in enumerate(entries)}
        return attacks.craft(self.a.kind, s, bad, scale=self.a.scale, sigma=self.a.sigma, z=self.a.z,
                             epsilon=self.a.epsilon, rngs=rngs)

    @staticmethod
    def _norms(params, entries) -> np.ndarray:
        """Each update's L2 move over what it covers (no stacking: the guard alone)."""
        out = np.zeros(len(entries))
        with np.errstate(over="ignore"):  # past the dtype's range a move is inf: still above any bound
            for i, e in enumerate(entries):
                c = e.contribution
                for k in c.mask.keys():
                    if not _float(params[k]):
                        continue
                    m = np.asarray(c.mask[k])
                    v = np.asarray(c.values[k])
                    d = v if e.update.kind == "delta" else v - params[k]
                    d = d.reshape(-1) if m.all() else d[m]
                    out[i] += float(np.dot(d, d))  # BLAS, in the model's dtype: a threshold, not a sum
        return np.sqrt(out)

    def _stack(self, params, entries, version) -> robust.Stack:
        u, cover = {}, {}
        for k in _keys(params, entries):
            size = params[k].size
            rows, covs = np.zeros((len(entries), size)), np.zeros((len(entries), size), bool)
            for i, e in enumerate(entries):
                m = e.contribution.mask
                if k not in m:
                    continue
                c = np.asarray(m[k]).reshape(-1)
                v = np.asarray(e.contribution.values[k], dtype=np.float64).reshape(-1)
                if e.update.kind != "delta":
                    v = v - params[k].reshape(-1)
                rows[i], covs[i] = np.where(c, v, 0.0), c
            u[k], cover[k] = rows, (None if covs.all() else covs)
        w = np.array([self.server.update_weight(e, version) for e in entries], dtype=np.float64)
        return robust.Stack(u, cover, w)

    def _guard(self, norms, params, keys) -> np.ndarray:
        """Which updates the norm guard rejects: their L2 move against the median of the recent
        ones and these -- or, while fewer than 3 are known, against the norm of the model itself
        (over the keys they carry); every move is remembered."""
        mult = self.d.norm_guard
        known = np.concatenate([np.asarray(self.state["seen"], dtype=np.float64), norms])
        self._remember("seen", norms)
        if mult is None:
            return np.zeros(len(norms), bool)
        if len(known) >= 3:
            ref = float(np.median(known))
        else:
            ref = math.sqrt(sum(float(np.square(params[k], dtype=np.float64).sum()) for k in keys))
        return norms > mult * ref if ref > 0 else np.zeros(len(norms), bool)  # a zero model: no scale yet

    def _remember(self, key: str, norms) -> None:
        """Append to one of the bounded windows of recent norms (``defense.norm_window``)."""
        self.state[key] = (list(self.state[key]) + [float(x) for x in norms])[-self.d.norm_window:]

    def _clip_bound(self) -> float:
        """Fixed C, or the quantile of the recent accepted norms (these included)."""
        if self.d.clip == "fixed":
            return float(self.d.clip_bound)
        return robust.norm_quantile(self.state["norms"], self.d.clip_quantile)

    def _rule(self, s: robust.Stack) -> dict[str, np.ndarray]:
        d = self.d
        if d.rule == "median":
            return robust.coordinate_median(s)
        if d.rule == "trimmed_mean":
            return robust.trimmed_mean(s, d.beta)
        if d.rule == "geometric_median":
            return robust.geometric_median(s, d.nu, d.iters)
        tau = d.tau if d.tau is not None or not self.state["norms"] else float(np.median(self.state["norms"]))
        r = robust.centered_clipping(s, tau, d.iters, self.state["center"])
        self.state["center"] = {k: v.copy() for k, v in r.items()}
        return r

    def _dp(self, s: robust.Stack, norms, version: int) -> dict[str, np.ndarray]:
        p, m = self.p, self.expected
        rng = seeding.rng(self.cfg.seed, "dp", version)
        clip = self.state["dp_clip"]
        z = p.noise_multiplier
        if p.adaptive:
            sigma_b = p.count_noise if p.count_noise is not None else m / 20
            z = mechanism.model_noise(z, sigma_b)
            self.state["dp_clip"] = mechanism.adaptive_clip(clip, norms, p.target_quantile, p.clip_lr, sigma_b, m,
                                                            rng)
        return mechanism.dp_mean(s, clip, z, m, rng)

    def _write(self, params, entries, s: robust.Stack, moves) -> list[Entry]:
        """The entries with their values replaced: by ``moves`` (one estimate for all), or by
        their own (clipped, crafted) rows of ``s`` when ``moves`` is None."""
        out = []
        for i, e in enumerate(entries):
            c = e.contribution
            mask = {k: np.asarray(c.mask[k]) for k in c.mask.keys()}
            values = {}
            for k in mask:
                if k not in s.u:
                    values[k] = np.asarray(c.values[k])
                    continue
                mv = (s.u[k][i] if moves is None else moves[k]).reshape(params[k].shape)
                v = mv if e.update.kind == "delta" else params[k] + mv
                values[k] = np.asarray(v).astype(params[k].dtype, copy=False)
            out.append(Entry(e.update, Contribution(values, mask, c.weight), e.extras, e.state))
        return out

