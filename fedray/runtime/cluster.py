"""Start or connect to Ray; create client actors with their resource requests."""
from __future__ import annotations

import logging
import math
import os

import ray

from fedray.devices.profile import DeviceProfile
from fedray.errors import ConfigError


LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.ActorUnavailableError)
"""Errors of a result lost with its actor or node (after Ray's restarts and retries)."""


def fetch_lists(refs: list) -> dict:
    """``{ref: value}`` for distinct object refs; a ref lost with its actor or node maps to its exception."""
    unique = list(dict.fromkeys(refs))
    try:
        return dict(zip(unique, ray.get(unique)))
    except LOST:
        out = {}
        for ref in unique:
            try:
                out[ref] = ray.get(ref)
            except LOST as e:
                out[ref] = e
        return out



AUTH_NOTICE = "Token authentication is enabled for this Ray cluster."
"""Ray's warning, on every ``ray.init`` with ``RAY_AUTH_MODE`` unset, that it turned token
authentication on: what fedray's cluster guide asks for, so it is noise. Ray's warning that
authentication is *disabled* is kept."""


class _DropAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(AUTH_NOTICE)


def quiet_auth_notice() -> None:
    """Drop :data:`AUTH_NOTICE` from Ray's log (idempotent; for ``ray.init`` and the job client)."""
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropAuthNotice) for f in log.filters):
        log.addFilter(_DropAuthNotice())


def probe(address: str, field: str, timeout_s: float = 5.0) -> None:
    """One clear line (a ConfigError on ``field``) when nothing listens at a Ray address.

    ``ray.init(address=...)`` retries an unreachable GCS for more than ten minutes; a TCP
    connect to the address Ray would dial (``127.0.0.1`` is dialled as this node's IP, as
    Ray does) answers in seconds. ``auto`` and ``local`` are Ray's to resolve."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address, parse_address

    address = address.strip()
    if address in ("auto", "local"):
        return
    where = address[len("ray://"):] if address.startswith("ray://") else address
    parsed = parse_address(where)
    if parsed is None or not str(parsed[1]).isdigit():
        raise ConfigError(field, f"{address!r} is not HOST:PORT (the head's GCS port, e.g. 10.0.0.10:6379)")
    candidates = [(parsed[0], int(parsed[1]))]
    if not address.startswith("ray://"):
        try:
            host, port = parse_address(canonicalize_bootstrap_address(where))
            candidates.insert(0, (host, int(port)))
        except Exception:  # resolving this node's IP failed: dial the address as given
            pass
    reason = ""
    for host, port in dict.fromkeys(candidates):
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return
        except OSError as e:
            reason = reason or ("no answer in %g s" % timeout_s if isinstance(e, TimeoutError)
                                else (e.strerror or type(e).__name__).lower())
    raise ConfigError(field, f"nothing listens at {address} ({reason}): start the head there with "
                             f"`ray start --head --port={parsed[1]}` or correct the address")


def connect(cluster_cfg) -> bool:
    """Make sure Ray is up. Returns True when this call started it (and so owns it).

    An already-initialised Ray (tests, Tune trials, ``ray job submit``) is reused.
    With ``cluster.address`` set we connect to that cluster; otherwise Ray starts
    embedded in this process tree (``RAY_ADDRESS`` from the environment is
    honoured by ``ray.init`` itself, as in a submitted job): ``address="local"``, since a bare
    ``ray.init()`` attaches to the latest ``ray start`` head of the machine
    (``/tmp/ray/ray_current_cluster``), someone else's Ray instance.
    """
    if ray.is_initialized():
        return False
    quiet_auth_notice()
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                  configure_logging=True)
    if cluster_cfg.address:
        probe(cluster_cfg.address, "cluster.address")
        try:
            ray.init(address=cluster_cfg.address, **kwargs)
        except Exception as e:  # unreachable address, wrong protocol, auth...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError("cluster.address", f"cannot connect to Ray at {cluster_cfg.address!r}: {first}") from None
        return True
    if "RAY_ADDRESS" in os.environ:
        probe(os.environ["RAY_ADDRESS"], "RAY_ADDRESS")
        ray.init(**kwargs)
        return True
    ray.init(address="local", num_cpus=cluster_cfg.num_cpus, **kwargs)
    return True


def actor_options(actor_cfg, *, name: str | None = None) -> dict:
    """Ray ``.options(...)`` for one client actor from its configured resources."""
    opts = {"num_cpus": actor_cfg.num_cpus, "num_gpus": actor_cfg.num_gpus}
    if actor_cfg.memory_mb:
        opts["memory"] = int(actor_cfg.memory_mb * 2**20)
    if actor_cfg.resources:
        opts["resources"] = dict(actor_cfg.resources)
    if name:
        opts["name"] = name
    return opts


def gpu_share(cfg, aggregator: bool = False) -> float:
    """GPUs each client actor (or the aggregator, which evaluates) asks for.
    ``cluster.client_actor.num_gpus`` when set (or with ``devices.actor_per_tier``: the tiers say),
    the aggregator then none; else, with ``runtime.device`` ``auto`` or ``cuda``, the cluster's GPUs
    split over the run's actors (at most one each, a multiple of 1e-4: Ray's unit), so that ``auto``
    finds the GPU where there is one (Ray hides the GPUs from an actor that asks for none; a Tune
    trial reserves the same shares, :func:`fedray.tune.bundles`). ``cuda`` on a cluster without a
    GPU is a config error."""
    own = float(cfg.cluster.client_actor.num_gpus)
    chosen = own > 0 or cfg.devices.actor_per_tier or cfg.runtime.device not in ("auto", "cuda")
    if chosen or not ray.is_initialized():  # (tools and tests that plan without a cluster: as configured)
        return 0.0 if aggregator else own
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus <= 0:
        if cfg.runtime.device == "cuda":
            raise ConfigError("runtime.device", "cuda, but the Ray cluster has no GPU "
                                                "(auto: the GPU where there is one)")
        return 0.0
    ca = cfg.cluster.client_actors
    n = (ca.max if ca is not None else cfg.cluster.num_client_actors) + 1
    return min(1.0, math.floor(gpus / n * 1e4) / 1e4)


def actor_specs(cfg, profiles) -> list[tuple[object, dict]]:
    """``[(pool, Ray options)]`` of the client actors a run creates (see :func:`create_client_actors`)."""
    ca = cfg.cluster.client_actors
    n = ca.max if ca is not None else cfg.cluster.num_client_actors
    if not cfg.devices.actor_per_tier:
        return [(None, {**actor_options(cfg.cluster.client_actor), "num_gpus": gpu_share(cfg)})] * n
    tiers: dict[str, DeviceProfile] = profiles.first_of_tier()
    per = max(1, n // len(tiers))
    specs = []
    for name, p in tiers.items():
        opts = {"num_cpus": p.num_cpus, "num_gpus": p.num_gpus}
        if p.resources:
            opts["resources"] = dict(p.resources)
        specs += [(name, opts)] * per
    return specs


def requested(cfg, profiles) -> dict[str, float]:
    """Resources the run's actors ask for, summed: ``{"CPU": ..., "GPU": ..., custom...}``."""
    out: dict[str, float] = {"CPU": float(cfg.cluster.aggregator_cpus), "GPU": gpu_share(cfg, aggregator=True)}
    specs = actor_specs(cfg, profiles)
    if cfg.cluster.client_actors is not None:  # an elastic pool needs room for its minimum only
        specs = specs[:cfg.cluster.client_actors.min]
    for _, o in specs:
        out["CPU"] += float(o.get("num_cpus", 1.0))
        out["GPU"] = out.get("GPU", 0.0) + float(o.get("num_gpus", 0.0) or 0.0)
        for k, v in (o.get("resources") or {}).items():
            out[k] = out.get(k, 0.0) + float(v)
    return {k: v for k, v in out.items() if v}


def check_resources(cfg, profiles, wait_s: float | None = None) -> None:
    """One clear line when the cluster cannot hold the run's actors (instead of waiting forever):
    the resources requested against the cluster's. An embedded Ray cannot grow, so it is checked
    at once; a cluster is given ``wait_s`` (default 60 s) for nodes to join (an autoscaler)."""
    import time

    need = requested(cfg, profiles)
    if wait_s is None:
        wait_s = 60.0 if cfg.cluster.address or "RAY_ADDRESS" in os.environ else 0.0
    deadline = time.time() + wait_s
    while True:
        have = ray.cluster_resources()
        short = {k: (v, float(have.get(k, 0.0))) for k, v in need.items() if v > float(have.get(k, 0.0)) + 1e-9}
        if not short or time.time() >= deadline:
            break
        time.sleep(1.0)
    if short:
        k, (want, got) = next(iter(short.items()))
        ca = cfg.cluster.client_actors
        n = ca.min if ca is not None else cfg.cluster.num_client_actors
        field = "cluster.client_actor.num_gpus" if k == "GPU" else (
            "cluster.num_client_actors" if k == "CPU" else "cluster.client_actor.resources")
        raise ConfigError(field, f"the run's actors request {want:g} {k} ({n} client actors + the aggregator), "
                                 f"the cluster has {got:g}")


def restart_options(cfg) -> dict:
    """Ray restart options of a client actor. In a fixed pool a crashed actor (or one on a lost
    node) is restarted and its training call retried: training is a pure function of its inputs
    and the aggregator applies each dispatch_id at most once. An elastic pool does not wait for a
    restart where there may be no room: the pool replaces the actor (see :mod:`fedray.runtime.pool`)."""
    if cfg.cluster.client_actors is not None or cfg.cluster.max_restarts == 0:
        return {"max_restarts": 0, "max_task_retries": 0}
    return {"max_restarts": cfg.cluster.max_restarts, "max_task_retries": cfg.cluster.max_task_retries}


def trains_in_aggregator(cfg, method_name: str, schedule: str) -> bool:
    """``cluster.num_client_actors: 0``: no client actors, the aggregator trains the clients itself
    (one clear error, before Ray starts, for what needs client actors)."""
    if cfg.cluster.num_client_actors or cfg.cluster.client_actors is not None:
        return False
    if schedule != "sync":
        raise ConfigError("cluster.num_client_actors", f"0 (the aggregator trains the clients) runs synchronous "
                                                      f"methods; {method_name} is {schedule}")
    for field, needs in (("devices.actor_per_tier", cfg.devices.actor_per_tier),
                         ("devices.placement", cfg.devices.placement != "none"), ("devices.mode", cfg.devices.mode == "real")):
        if needs:
            raise ConfigError(field, "places or throttles client actors: set cluster.num_client_actors >= 1")
    return True


def create_client_actors(cfg, profiles, make):
    """Create the client actors; returns ``({pool: [actors]}, placement_group | None)``.

    Pools: with ``devices.actor_per_tier`` every tier that has clients gets its
    own actors, requesting the tier's resources (fractional CPUs, GPUs, memory,
    custom resources such as ``{"device:edge": 1}``) so Ray places them only on
    nodes that offer them; clients are served by their tier's pool. Otherwise
    one pool (key ``None``) with ``cluster.client_actor`` resources. With
    ``devices.placement`` other than ``none`` the actors are reserved together
    in one placement group (PACK / SPREAD / STRICT_*).
    ``make(options) -> actor handle``.
    """
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    specs = actor_specs(cfg, profiles)
    pg = None
    if cfg.devices.placement != "none":
        bundles = []
        for _, o in specs:
            b = {"CPU": o.get("num_cpus", 1.0)}
            if o.get("num_gpus"):
                b["GPU"] = o["num_gpus"]
            b.update(o.get("resources", {}))
            bundles.append({k: v for k, v in b.items() if v})
        pg = placement_group([b or {"CPU": 0.01} for b in bundles], strategy=cfg.devices.placement.upper())
        try:
            ray.get(pg.ready(), timeout=120)
        except Exception:
            ray.util.remove_placement_group(pg)
            raise ConfigError("devices.placement", "the cluster cannot reserve the client actors' resources "
                              f"({bundles}) with strategy {cfg.devices.placement.upper()}") from None
    pools: dict = {}
    for i, (pool, opts) in enumerate(specs):
        o = dict(opts, **restart_options(cfg))
        if pg is not None:
            o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
        pools.setdefault(pool, []).append(make(o))
    return pools, pg
