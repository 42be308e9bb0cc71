"""Quantized bases: NF4 (QLoRA) in pure PyTorch, bitsandbytes-compatible checkpoints, LoftQ and LQ-LoRA inits.

See docs/quantization.md."""

from .checkpoint import from_pretrained, save_pretrained
from .embedding import NF4Embedding
from .linear import NF4Linear, get_backend, set_backend
from .model import nf4_layers, quantize, quantized_nbytes, requantize_errors
from .nf4 import NF4_CODE, NF4Weight, dynamic_code, quantize_nf4

__all__ = ["NF4_CODE", "NF4Embedding", "NF4Linear", "NF4Weight", "dynamic_code", "from_pretrained", "nf4_layers", "quantize",
           "quantize_nf4", "quantized_nbytes", "requantize_errors", "save_pretrained", "get_backend", "set_backend"]
