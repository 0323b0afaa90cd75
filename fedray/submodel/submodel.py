"""The one submodel type: what one client trains, downloads and sends this time.

A :class:`Submodel` is built by a method's planner and travels with the dispatch. Its
fields describe the work, never a method:

- ``trainable``: parameter keys that train (None: all); the others are frozen;
- ``mask``: coordinates trained and sent (the one mask type of :mod:`fedray.submodel.masks`;
  None: everything, dense);
- ``download``: what the client receives (None: the whole model); uncovered coordinates
  arrive as zeros; with ``widths``, a mask of the same sizes: the client receives only the
  channels it keeps (it holds which: a stored channel set), costed by those sizes;
- ``keep`` / ``widths``: a *physically smaller* model. ``keep = {layer: channels}`` fixes the
  kept channels of each prunable layer (HeteroFL's first ``ceil(beta C)``); ``widths =
  {layer: n}`` fixes only their number and lets the client pick which (CA-HFP's curvature
  scores). Either way the compact model's FLOPs and bytes depend only on the sizes; with
  ``keep``, ``mask`` may also be given: the coordinates trained and sent inside the kept
  channels (it must lie within them), an unstructured mask on the compact model;
- ``extras``: the extra arrays the client sends beside the trained values (PR-FL's squared
  gradients, CA-HFP's kept-channel indices, SCAFFOLD's control-variate delta), declared
  here so their bytes are known when the dispatch is costed;
- ``receives``: extra arrays the client receives beside the model (SCAFFOLD's server
  control variate), counted in the download;
- ``extra_flops``: work on the device besides training (CA-HFP's scoring pass);
- ``pieces``: the download as shared pieces ``((key, nbytes), ...)`` sent once per model
  version to every client that needs them (PR-FL's residual split): the client receives
  their sum, the server sends each piece once (server egress, :mod:`fedray.channel`).

:meth:`Submodel.cost` answers what it costs (:class:`SubmodelCost`): executed training FLOPs
per example, the sparse-kernel share of them, bytes down and up (extras included), through
the run's :class:`~fedray.models.info.ModelInfo` and :class:`~fedray.channel.Channel`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np

from fedray.submodel.masks import Mask

if TYPE_CHECKING:
    from fedray.channel import Channel
    from fedray.models.info import ModelInfo

__all__ = ["Extra", "Submodel", "SubmodelCost", "FULL"]


@dataclass(frozen=True)
class Extra:
    """One extra array sent with an update.

    ``shape``: a fixed shape; or ``over``: a state-dict key, one value per coordinate of it
    that the update's mask covers (C order; the server receives it expanded to full shape,
    zeros elsewhere); ``bound``: an integer array of strictly increasing indices in
    ``[0, bound)`` (checked at the server). Anything else a client sends is rejected.
    """

    name: str
    dtype: str = "float32"
    shape: tuple[int, ...] | None = None
    over: str | None = None
    bound: int | None = None

    def __post_init__(self):
        if (self.shape is None) == (self.over is None):
            raise ValueError(f"extra {self.name!r} needs exactly one of shape= or over=")

    def count(self, covered: Callable[[str], int]) -> int:
        """Number of values, given ``covered(key)``: the coordinates the mask covers of a key."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape is not None else int(covered(self.over))

    def nbytes(self, covered: Callable[[str], int]) -> int:
        return self.count(covered) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class SubmodelCost:
    """What a submodel costs, before anything runs (see :meth:`Submodel.cost`)."""

    flops_per_example: int  # executed training FLOPs per example (forward + backward)
    extra_flops: int  # device work besides training, per dispatch
    sparse_factor: float  # FLOPs a sparse kernel would execute / the executed ones
    bytes_down: int  # bytes the client receives
    bytes_up: int  # bytes it sends (payload + extras)
    pieces: tuple | None  # the download as shared pieces (key, nbytes), or None (sent to this client alone)
    layers: int  # layers trained (layer-level inclusion, ``sdir_layers``)


@dataclass(frozen=True, eq=False)
class Submodel:
    trainable: frozenset[str] | None = None
    mask: Mask | None = None
    download: Mask | None = None
    keep: Mapping[str, np.ndarray] | None = None
    widths: Mapping[str, int] | None = None
    extras: tuple[Extra, ...] = ()
    receives: tuple[Extra, ...] = ()
    extra_flops: int = 0
    pieces: tuple | None = None

    def __post_init__(self):
        if any(e.over is not None for e in self.receives):
            raise ValueError("arrays a client receives need a fixed shape")
        if self.keep is not None and self.widths is not None:
            raise ValueError("a submodel has either keep (fixed channels) or widths (client-chosen), not both")

    @property
    def compact(self) -> bool:
        """Trained as a physically smaller model."""
        return self.keep is not None or self.widths is not None

    def sizes(self) -> dict[str, int] | None:
        """Kept channels per prunable layer of a compact submodel (None: full size)."""
        if self.keep is not None:
            return {k: int(np.unique(np.asarray(v)).size) for k, v in self.keep.items()}
        return dict(self.widths) if self.widths is not None else None

    def cost(self, model: "ModelInfo", channel: "Channel") -> SubmodelCost:
        """Executed FLOPs per example, sparse-kernel share, bytes down and up (extras included).

        - compact (``keep`` / ``widths``): the compact model's own training FLOPs (its kernels
          are dense); the sparse share is 1, or with a ``mask`` inside the kept channels
          (AutoFLIP's unstructured part) the compact layers scaled by their weights' density;
        - otherwise the layers that train (``trainable``, else those the mask covers, else
          all) with the model's FLOPs convention, and the sparse share scales every layer's
          forward FLOPs by its weight's density under the mask (frozen layers count whole);
        - bytes through the channel (the only place bytes are counted).
        """
        sizes = self.sizes()
        if sizes is not None:
            flops, layers = model.compact_train_flops(sizes), model.num_layers()
            factor = model.sparse_factor(self.mask, sizes)
        else:
            trained = model.trained_layers(self.trainable, self.mask)
            flops = model.train_flops_per_example(trained)
            factor = model.sparse_factor(self.mask)
            layers = model.num_layers() if trained is None else len(trained)
        return SubmodelCost(flops_per_example=int(flops), extra_flops=int(self.extra_flops), sparse_factor=factor,
                            bytes_down=channel.downlink_nbytes(self), bytes_up=channel.uplink_nbytes(self, model),
                            pieces=self.pieces, layers=int(layers))


FULL = Submodel()
"""The whole model, trained and sent densely."""
