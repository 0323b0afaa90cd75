"""Model zoo and the model description (layers, groups, FLOPs) used by pruning and the cost model."""
from fedray.models.spec import Group, Layer, ModelSpec, build_compact, extract, model_spec, scatter, width_keep
from fedray.models.zoo import MODELS, build_model

__all__ = ["MODELS", "build_model", "Group", "Layer", "ModelSpec", "model_spec", "extract", "scatter",
           "width_keep", "build_compact"]
