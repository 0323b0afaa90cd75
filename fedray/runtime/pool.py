"""The client actors of a run: slots, which of them are ready, replacements, routing.

Every slot holds one client actor (its options come from ``cluster.client_actor`` or, with
``devices.actor_per_tier``, from its tier). A slot is *ready* once its actor runs. Tasks are
routed to the ready slots of the client's pool, by dispatch id; since training is a pure
function of its inputs, which actor trains a client never changes a number.

- Fixed pool (``cluster.num_client_actors``): the run starts when every actor runs. With 0,
  the pool has one slot and no actor (``None``): the aggregator trains its clients itself.
- Elastic pool (``cluster.client_actors: {min: m, max: M}``): the run starts as soon as ``m``
  actors run; the others wait for room (a node that joins -- the Ray autoscaler or ``ray
  start`` -- places them) and join the routing when they run.

A slot whose actor is gone for good (its restarts exhausted, its node lost) gets a new actor
at once (:meth:`ActorPool.lose`); until it runs, the slot's tasks go to the other ready slots,
and the trainings lost with the old actor are run again (by the scheduler). Each replacement
bumps the slot's generation, so several trainings lost with one actor replace it once.
"""
from __future__ import annotations

import time

import ray

from fedray.runtime import cluster

__all__ = ["ActorPool", "NoActors"]


class NoActors(RuntimeError):
    """No client actor of a pool could run within ``cluster.actor_wait_s``."""


class ActorPool:
    def __init__(self, cfg, profiles, make):
        self.cfg, self.make = cfg, make
        groups, self.placement_group = cluster.create_client_actors(cfg, profiles, make)
        specs = cluster.actor_specs(cfg, profiles)
        self.actors = [a for actors in groups.values() for a in actors]
        self.keys = [key for key, _ in specs]
        self.options = [dict(o, **cluster.restart_options(cfg)) for _, o in specs]
        elastic = cfg.cluster.client_actors is not None
        if not self.actors and not elastic:  # cluster.num_client_actors: 0: one slot, the aggregator trains
            self.actors, self.keys, self.options = [None], [None], [{}]
        self.minimum = cfg.cluster.client_actors.min if elastic else len(self.actors)
        self.gen = [0] * len(self.actors)
        self.ready = [a is None for a in self.actors]
        self._probes = {i: a.pid.remote() for i, a in enumerate(self.actors) if a is not None}
        self.replaced = 0

    # ------------------------------------------------------------ readiness
    def refresh(self, wait: float = 0.0, num: int = 1) -> bool:
        """Mark the actors that run now ready (waiting up to ``wait`` seconds for ``num`` of them)."""
        if not self._probes:
            return False
        by_ref = {ref: i for i, ref in self._probes.items()}
        done, _ = ray.wait(list(by_ref), num_returns=min(num, len(by_ref)), timeout=wait)
        for ref in done:
            i = by_ref[ref]
            del self._probes[i]
            try:
                ray.get(ref)
                self.ready[i] = True
            except Exception:  # died before it ran: a new one takes the slot
                self.lose(i)
        return bool(done)

    def start(self) -> None:
        """Wait until ``minimum`` actors run (all of a fixed pool)."""
        deadline = time.time() + self.cfg.cluster.actor_wait_s
        while sum(self.ready) < self.minimum:
            left = deadline - time.time()
            if left <= 0:
                raise NoActors(f"{sum(self.ready)} of the {self.minimum} client actors needed to start run after "
                               f"{self.cfg.cluster.actor_wait_s:g} s (cluster.actor_wait_s)")
            self.refresh(wait=min(left, 5.0), num=self.minimum - sum(self.ready))

    def lose(self, i: int) -> None:
        """Slot ``i``'s actor is gone: a new actor in its place (ready once it runs)."""
        try:
            ray.kill(self.actors[i])
        except Exception:
            pass
        self.actors[i] = self.make(self.options[i])
        self.gen[i] += 1
        self.ready[i] = False
        self._probes[i] = self.actors[i].pid.remote()
        self.replaced += 1

    # ------------------------------------------------------------ routing
    def running(self) -> dict:
        """``{pool: [actors]}`` of the ready slots (a replacement that waits for room is not)."""
        out: dict = {}
        for key, a, ready in zip(self.keys, self.actors, self.ready):
            if ready and a is not None:
                out.setdefault(key, []).append(a)
        return out

    def key_of(self, tier: str):
        return tier if tier in self.keys else None

    def route(self, key, dispatch_id: int) -> int:
        """The slot a dispatch goes to: the ready slots of its pool, by dispatch id (waiting for
        one to run if none does)."""
        deadline = time.time() + self.cfg.cluster.actor_wait_s
        while not (ready := [i for i, k in enumerate(self.keys) if k == key and self.ready[i]]):
            if time.time() > deadline:
                raise NoActors(f"no client actor of pool {key or 'default'} runs after "
                               f"{self.cfg.cluster.actor_wait_s:g} s (cluster.actor_wait_s)")
            self.refresh(wait=5.0)
        return ready[dispatch_id % len(ready)]
