"""CA-HFP: curvature-aware structured pruning and reconstruction.

Only the abstract of CA-HFP is public; this module is our interpretation
(the steps below; :mod:`fedray.methods.cahfp` composes them):

1. :func:`fisher_and_grad`: on a few mini-batches, ``g`` = mean of the
   per-batch gradients and ``h`` = mean of the squared per-batch gradients
   (diagonal empirical Fisher). The model runs in eval mode (BatchNorm uses
   its running statistics and they are not updated; training flags are
   restored) and gradients are taken with ``torch.autograd.grad``, so neither
   ``.grad`` nor any buffer of the model changes.
2. :func:`group_scores`: for each prunable group ``G`` (a conv filter or a
   Linear output row, :attr:`ModelSpec.groups`) the second-order estimate of
   the loss change when the group is zeroed,
   ``S_G = | sum_{j in G} (-g_j w_j + 0.5 h_j w_j^2) |``, summed over the
   group's ``out_slices`` that are trainable parameters: the weight row, the
   bias entry and -- our choice -- the BatchNorm weight and bias entries of the
   channel. BatchNorm running statistics are buffers without gradient and do
   not contribute. Consumer input columns are not summed (they vanish with
   the channel but their removal is a consequence, not the group itself).
3. :func:`keep_top`: the top ``ceil(r * C)`` channels of every prunable layer
   (at least 1; ties: lower index first). Residual-stream channels are never
   in a group, so only block-internal channels are pruned.
4. :func:`compact_submodel`: the physically smaller model (consumers' inputs
   are sliced too) loaded with the kept weights.
5. :func:`reconstruct`: scatter the trained compact tensors back to full
   shape at their original indices, with the mask.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from fedray.models.factory import build_compact
from fedray.models.spec import Index, ModelSpec, extract, scatter
from fedray.submodel.masks import Mask

__all__ = ["fisher_and_grad", "group_terms", "group_scores", "keep_top", "compact_submodel", "reconstruct"]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def fisher_and_grad(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(g, h)`` per trainable parameter (float64 numpy, keyed like the state dict).

    ``g = mean_b grad_b``, ``h = mean_b grad_b**2`` over the batches ``(x, y)``;
    ``loss_fn(model(x), y)`` must be a scalar (typically the batch-mean loss).
    Parameters the loss does not reach get zeros.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # float64 sums where the gradients are, one IEEE operation at a time as numpy's would be (the same
    # bits); each starts as the first batch's term (0 + t is t)
    g: dict[str, torch.Tensor] = {}
    h: dict[str, torch.Tensor] = {}
    flags = {n: m.training for n, m in model.named_modules()}
    count = 0
    try:
        model.eval()
        for x, y in batches:
            loss = loss_fn(model(x), y)
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            with torch.no_grad():
                for (n, _), gr in zip(named, grads):
                    if gr is None:
                        continue
                    a = gr.detach().to(torch.float64)
                    if n in g:
                        g[n].add_(a)
                        h[n].addcmul_(a, a)
                    else:
                        g[n], h[n] = a, a * a
            count += 1
    finally:
        for n, m in model.named_modules():
            m.training = flags[n]
    if count == 0:
        raise ValueError("fisher_and_grad needs at least one mini-batch")
    zeros = {n: np.zeros(tuple(p.shape), dtype=np.float64) for n, p in named if n not in g}  # not reached
    return ({n: g[n].div_(count).cpu().numpy() if n in g else zeros[n] for n, _ in named},
            {n: h[n].div_(count).cpu().numpy() if n in h else zeros[n].copy() for n, _ in named})


def group_terms(spec: ModelSpec, params: Mapping[str, Any], grad: Mapping[str, np.ndarray],
                fisher: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{layer: (2, C) float64}`` per prunable group: row 0 ``sum_{j in G} -g_j w_j``, row 1
    ``sum_{j in G} 0.5 h_j w_j^2`` (the two terms of :func:`group_scores`, before the absolute
    value). Both are linear in ``g`` and ``h`` at fixed ``w``, so the example-weighted mean of
    clients' terms at one global model is the terms of their aggregated gradient and Fisher
    (CA-HFP's server scoring)."""
    trainable = set(spec.param_keys)
    out = {}
    for grp in spec.groups:
        total = np.zeros((2, grp.size), dtype=np.float64)
        for key, axis in grp.out_slices:
            if key not in trainable:
                continue  # BatchNorm running statistics: no gradient
            for name, src in (("params", params), ("grad", grad), ("fisher", fisher)):
                if key not in src:
                    raise ValueError(f"{name} lack key {key!r}")
            w = _np(params[key]).astype(np.float64)
            gj = np.asarray(grad[key], dtype=np.float64)
            hj = np.asarray(fisher[key], dtype=np.float64)
            if not (w.shape == gj.shape == hj.shape):
                raise ValueError(f"shapes of {key!r} differ: params {w.shape}, grad {gj.shape}, fisher {hj.shape}")
            t = np.multiply(gj, w)
            np.negative(t, out=t)  # -(g w) = (-g) w exactly
            total[0] += np.moveaxis(t, axis, 0).reshape(grp.size, -1).sum(axis=1)
            np.multiply(hj, 0.5, out=t)  # ((0.5 h) w) w, in place
            t *= w
            t *= w
            total[1] += np.moveaxis(t, axis, 0).reshape(grp.size, -1).sum(axis=1)
        out[grp.layer] = total
    return out


def group_scores(spec: ModelSpec, params: Mapping[str, Any], grad: Mapping[str, np.ndarray],
                 fisher: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{layer: S_G per output channel}`` for every prunable group of ``spec`` (float64)."""
    return {layer: np.abs(t.sum(axis=0)) for layer, t in group_terms(spec, params, grad, fisher).items()}


def keep_top(spec: ModelSpec, scores: Mapping[str, np.ndarray], ratio: float) -> dict[str, np.ndarray]:
    """``keep``: the ``ceil(ratio * C)`` (at least 1) best channels of every
    prunable layer, sorted ascending; ties go to the lower index."""
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    keep = {}
    for grp in spec.groups:
        if grp.layer not in scores:
            raise ValueError(f"scores lack prunable layer '{grp.layer}'")
        s = np.asarray(scores[grp.layer], dtype=np.float64)
        if s.shape != (grp.size,):
            raise ValueError(f"scores of '{grp.layer}' have shape {s.shape}, expected ({grp.size},)")
        k = max(1, math.ceil(round(ratio * grp.size, 9)))
        best = np.lexsort((np.arange(grp.size), -s))[:k]
        keep[grp.layer] = np.sort(best).astype(np.int64)
    return keep


def compact_submodel(spec: ModelSpec, model_name: str, input_shape: tuple[int, ...], num_classes: int,
                     options: Mapping[str, Any] | None, params: Mapping[str, Any],
                     keep: Mapping[str, Any]) -> tuple[nn.Module, dict[str, np.ndarray], Index]:
    """``(compact_module, compact_state, index)``.

    ``compact_state = extract(params, spec.slice_index(keep))`` (numpy copies)
    is loaded into the module built by :func:`fedray.models.factory.build_compact`
    with the full model's ``model_name`` / ``options``.
    """
    index = spec.slice_index(keep)
    state = extract(params, index)
    module = build_compact(model_name, tuple(input_shape), num_classes, options, spec, keep)
    module.load_state_dict({k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in state.items()})
    return module, state, index


def reconstruct(spec: ModelSpec, compact_state: Mapping[str, Any], index: Index,
                like: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], Mask]:
    """Full-shape ``(values, mask)``: compact tensors written at their original
    indices over a copy of ``like`` (values outside the mask are ``like``'s)."""
    unknown = set(compact_state) - set(spec.shapes)
    if unknown:
        raise ValueError(f"compact state has keys outside the model: {sorted(unknown)}")
    return scatter(compact_state, index, like)
