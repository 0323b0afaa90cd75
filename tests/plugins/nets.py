"""A user model with nn.Embedding and nn.LayerNorm (no layer structure fedray can describe).

For scikit-learn's digits (``data.name: digits``: ``x`` is float32 ``(N, 1, 8, 8)``, pixel
values 0..16 divided by 16): every pixel value becomes a token (``round(16 x)``), embedded,
plus a position embedding, layer-normalised, flattened and classified::

    model: {name: "nets:TokenNet", options: {dim: 16}}
"""
from __future__ import annotations

import math

import torch
from torch import nn


class TokenNet(nn.Module):
    def __init__(self, input_shape, num_outputs, dim: int = 16, levels: int = 17, scale: float = 16.0):
        super().__init__()
        self.positions = math.prod(input_shape)
        self.levels, self.scale = int(levels), float(scale)
        self.value = nn.Embedding(self.levels, dim)
        self.position = nn.Embedding(self.positions, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(self.positions * dim, num_outputs)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], -1)
        if tokens.is_floating_point():  # digits' x is float32 in [0, 1]
            tokens = torch.round(tokens * self.scale)
        tokens = tokens.long().clamp_(0, self.levels - 1)
        pos = torch.arange(self.positions, device=x.device)
        h = self.norm(self.value(tokens) + self.position(pos))
        return self.head(h.flatten(1))
