"""Model zoo, the model description (layers, groups, FLOPs) used by pruning and the cost model,
and the factory that builds zoo, user and compact models."""
from fedray.models.factory import build_compact, build_model
from fedray.models.spec import Group, Layer, ModelSpec, extract, model_spec, scatter, width_keep
from fedray.models.zoo import MODELS

__all__ = ["MODELS", "build_model", "Group", "Layer", "ModelSpec", "model_spec", "extract", "scatter",
           "width_keep", "build_compact"]
