"""Start or connect to Ray; create client actors with their resource requests."""
from __future__ import annotations

import logging
import os

import ray

from fedray.errors import ConfigError


def connect(cluster_cfg) -> bool:
    """Make sure Ray is up. Returns True when this call started it (and so owns it).

    An already-initialised Ray (tests, Tune trials, ``ray job submit``) is reused.
    With ``cluster.address`` set we connect to that cluster; otherwise Ray starts
    embedded in this process tree (``RAY_ADDRESS`` from the environment is
    honoured by ``ray.init`` itself, as in a submitted job).
    """
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                  configure_logging=True)
    if cluster_cfg.address:
        try:
            ray.init(address=cluster_cfg.address, **kwargs)
        except Exception as e:  # unreachable address, wrong protocol, auth...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError("cluster.address", f"cannot connect to Ray at {cluster_cfg.address!r}: {first}") from None
        return True
    if "RAY_ADDRESS" in os.environ:
        ray.init(**kwargs)
        return True
    ray.init(num_cpus=cluster_cfg.num_cpus, **kwargs)
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
