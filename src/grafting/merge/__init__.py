"""Merging models and adapters, and compressing adapters (mergekit's merges, streamed tensor by tensor).

    from grafting.merge import merge
    merge("ties.yaml", "out/merged")            # what `graft merge ties.yaml out/merged` does

See docs/merging.md. The YAML layer needs pydantic (``pip install 'grafting[merge]'``); the methods, the
adapter merges and extraction need only torch and safetensors.
"""

from .adapters import AdapterInput, AdapterMergeResult, merge_adapters
from .base import (DENSITY, INT8_MASK, LAMBDA, NORMALIZE, RESCALE, REQUIRED, WEIGHT, MergeMethod, ModelTensor,
                   Param, TensorGroup, get_merge_method, merge_method, merge_methods, tensor_generator)
from .extract import ExtractResult, extract_adapter
from .io import open_input
from .run import MergeResult, merge
from .soup import greedy_soup, uniform_soup

__all__ = ["merge", "MergeResult", "merge_adapters", "AdapterMergeResult", "AdapterInput", "extract_adapter",
           "ExtractResult", "open_input", "uniform_soup", "greedy_soup", "MergeMethod", "ModelTensor", "Param",
           "TensorGroup", "get_merge_method", "merge_method", "merge_methods", "tensor_generator", "REQUIRED",
           "WEIGHT", "DENSITY", "LAMBDA", "NORMALIZE", "RESCALE", "INT8_MASK"]
