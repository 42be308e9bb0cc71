"""Merging models and adapters, and compressing adapters (mergekit's merges, streamed tensor by tensor)."""

from .base import (DENSITY, INT8_MASK, LAMBDA, NORMALIZE, RESCALE, REQUIRED, WEIGHT, MergeMethod, ModelTensor,
                   Param, TensorGroup, get_merge_method, merge_method, merge_methods, tensor_generator)

__all__ = ["MergeMethod", "ModelTensor", "Param", "TensorGroup", "get_merge_method", "merge_method",
           "merge_methods", "tensor_generator", "REQUIRED", "WEIGHT", "DENSITY", "LAMBDA", "NORMALIZE", "RESCALE",
           "INT8_MASK"]
