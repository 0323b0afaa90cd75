"""Test helpers: a method's planner, server and aggregator core without Ray."""
from __future__ import annotations

import numpy as np
import torch

from fedray.aggregation.core import AggregatorCore
from fedray.channel import Channel
from fedray.methods import registry
from fedray.methods.base import ClientContext, PlanContext, ServerContext
from fedray.models import build_model
from fedray.models.info import ModelInfo
from fedray.devices import population


def model_info(name="mlp", options=None, input_shape=(64,), outputs=10, seed=0):
    """``(ModelInfo, params)`` of a freshly built model."""
    torch.manual_seed(seed)
    model = build_model(name, input_shape, outputs, options=options or {})
    example = np.zeros((2, *input_shape), np.float32)
    params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return ModelInfo(model, example, name=name, options=options or {}, num_outputs=outputs), params


def plan_context(cfg, info, examples=None):
    n = cfg.data.num_clients
    like = info.like if info is not None else {}
    examples = np.full(n, 10, np.int64) if examples is None else np.asarray(examples)
    return PlanContext(cfg, cfg.method.name, cfg.method.params, info, Channel(like), population.profiles(cfg), examples)


def planner_for(cfg, info=None, examples=None):
    return registry.get(cfg.method.name).Planner(plan_context(cfg, info, examples))


def server_for(cfg, info=None):
    return registry.get(cfg.method.name).Server(
        ServerContext(cfg, cfg.method.name, cfg.method.params, info, cfg.data.num_clients))


def client_for(cfg, info=None):
    return registry.get(cfg.method.name).Client(ClientContext(cfg, cfg.method.name, cfg.method.params, info))


def core_for(cfg, params, info=None):
    return AggregatorCore(params, server_for(cfg, info))
