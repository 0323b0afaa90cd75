"""Client actor: a thin Ray shell around :class:`fedray.client.worker.ClientWorker`.

One actor trains for one or several logical clients (pooled simulation). It holds the
shared training arrays (read zero-copy from the object store) and one worker; each call
receives the model version (by object reference, or by value when it is small enough for
Ray to inline), a list of tasks and the arrays the server broadcasts with the model (if
any), and returns the list of update headers plus one object per update payload.
"""
from __future__ import annotations

import os

import ray

from fedray.client.worker import ClientWorker, Task  # noqa: F401 (Task: what a call carries)


@ray.remote
class ClientActor:
    """Ray shell: ``train_many`` returns ``1 + len(tasks)`` objects, the list of update
    headers and each update's payload (a small payload travels inside the call's reply, a
    large one through the object store). Call through :func:`train_call`.
    """

    def __init__(self, cfg, input_shape, num_classes):
        self.args = cfg, input_shape, num_classes
        self.worker = None

    def train_many(self, params: dict, tasks: list[Task], shared: list, broadcast: dict | None = None):
        """``shared`` = [data ref, partitions ref], read once (zero-copy) on the first call; every call
        brings them so a restarted actor (crash, lost node) finds them again (references in the
        constructor's arguments would do that too, but Ray warns against them on every start)."""
        if self.worker is None:
            data, partitions = ray.get(shared)
            cfg, input_shape, num_classes = self.args
            self.worker = ClientWorker(cfg, data, partitions, input_shape, num_classes)
        updates = self.worker.run(params, tasks, broadcast)
        return ([u.header() for u in updates], *[u.payload for u in updates])

    def pid(self) -> int:
        return os.getpid()

    def device(self) -> str:
        """The device this actor trains on (``runtime.device`` resolved where it runs: ``auto``
        is ``cuda`` only when Ray gave the actor a GPU, ``cluster.client_actor.num_gpus`` > 0)."""
        from fedray.client.trainer import resolve_device

        return str(resolve_device(self.args[0].runtime.device))

    def node_id(self) -> str:
        """The Ray node this actor runs on (placement checks)."""
        return ray.get_runtime_context().get_node_id()


def train_call(actor, params, tasks: list[Task], shared: list, broadcast: dict | None = None) -> list:
    """Submit one ``train_many`` call (``tasks`` non-empty): ``[headers ref, payload refs...]``."""
    if broadcast is None:
        return actor.train_many.options(num_returns=len(tasks) + 1).remote(params, tasks, shared)
    return actor.train_many.options(num_returns=len(tasks) + 1).remote(params, tasks, shared, broadcast)
