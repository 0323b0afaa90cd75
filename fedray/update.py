"""The one update type: what a client sends back after local training.

An :class:`Update` travels as two Ray objects: its header (``payload=None``,
small: ids, counts, loss, telemetry) and its :class:`~fedray.submodel.encode.Payload`
(the trained coordinates). The driver loop reads headers only; payload
references go straight to the aggregator, so big arrays are never copied
through the driver.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fedray.submodel.encode import Payload


@dataclass(frozen=True)
class Update:
    dispatch_id: int
    client_id: int
    base_version: int  # the model version the client started from
    num_examples: int  # examples seen per epoch (n_i for weighting)
    kind: str = "model"  # "model": trained values; "delta": trained - base
    train_loss: float = float("nan")
    steps: int = 0
    bytes_up: int = 0  # real payload size sent
    wall_s: float = 0.0  # measured seconds of local training on the actor
    telemetry: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # small diagnostics (the traceback of a failed client)
    error: str | None = None  # application error as a value (the client crashed)
    payload: Payload | None = None

    def header(self) -> "Update":
        return dataclasses.replace(self, payload=None)

    def with_payload(self, payload: Payload | None) -> "Update":
        return dataclasses.replace(self, payload=payload)
