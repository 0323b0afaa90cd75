"""The per-client state store: what a client keeps between its participations.

Control variates (SCAFFOLD), personal layers (FedPer) or local optimizer state live here,
keyed by the *logical* client id, so they do not depend on which client actor trains the
client: the aggregator owns the store (it is part of its checkpoint), hands each dispatch
its client's state with the task and keeps the state the client returns with a *valid*
update (a rejected or lost update leaves the state as it was, as if the device had rolled
back). A dispatch applied at most once updates the state at most once, so Ray's retries
and restarted actors cannot change it twice.

On a real device the state never leaves it; in simulation it travels between the store and
the actor that plays the client. Those bytes are counted (``bytes_out``: store to actors,
``bytes_in``: actors to store) and reported as ``client_state_bytes``, apart from the
device's communication (a method whose protocol sends state, like SCAFFOLD's control
variate delta, declares those arrays in its submodel and the channel counts them).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["ClientStateStore", "state_nbytes"]


def state_nbytes(state: Mapping | None) -> int:
    if not state:
        return 0
    return int(sum(np.asarray(v).nbytes for v in state.values()))


class ClientStateStore:
    """``{client id: {name: array}}``; created lazily (clients without state cost nothing)."""

    def __init__(self):
        self._states: dict[int, dict] = {}
        self.bytes_out = 0
        self.bytes_in = 0

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, client_id) -> bool:
        return int(client_id) in self._states

    def get(self, client_id: int) -> dict | None:
        """The state a dispatch of ``client_id`` starts from (None: none yet)."""
        s = self._states.get(int(client_id))
        self.bytes_out += state_nbytes(s)
        return s

    def peek(self, client_id: int) -> dict | None:
        """The state without counting a transfer (evaluation on the server side)."""
        return self._states.get(int(client_id))

    def put(self, client_id: int, state: Mapping) -> None:
        state = {str(k): np.array(v) for k, v in state.items()}
        self.bytes_in += state_nbytes(state)
        self._states[int(client_id)] = state

    def state_dict(self) -> dict:
        return {"states": self._states, "bytes_out": self.bytes_out, "bytes_in": self.bytes_in}

    def load_state_dict(self, state: Mapping) -> None:
        self._states = {int(k): dict(v) for k, v in state["states"].items()}
        self.bytes_out, self.bytes_in = int(state["bytes_out"]), int(state["bytes_in"])
