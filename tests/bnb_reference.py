"""Make bitsandbytes compute 4-bit ops with its own reference kernels on this CPU, so tests compare against the
format's definition rather than a machine-dependent fast path.

On CPUs with AVX512-BF16, bitsandbytes 0.50 routes ``dequantize_4bit`` and ``gemv_4bit`` to native kernels that
compute in bfloat16 (``gemv_4bit`` casts its input and scales to bf16; ``Linear4bit`` repacks its weight for
it at inference) and, for some shapes, dequantize blocks with the wrong scale (a 64x64 weight in blocks of
256: every block after the first). On other CPUs, on GPUs'
fallback and in bitsandbytes' own tests the reference is its pure-PyTorch "default" implementation, which is
what grafting matches byte for byte. Importing this module points the CPU dispatch of those two ops at that
reference implementation (quantization itself is unaffected: its bytes already match on every machine).
"""

from __future__ import annotations

import torch


def _use_reference_kernels() -> None:
    try:
        import bitsandbytes  # noqa: F401  (defines the ops and registers the CPU kernels replaced here)
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return
    if has_avx512bf16() or torch.backends.cpu.get_cpu_capability() == "AVX512":
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu")(_dequantize_4bit)
        torch.library.register_kernel("bitsandbytes::gemv_4bit", "cpu")(_gemv_4bit)
        # Linear4bit layers built from now on skip the bf16 repacking of their weights at inference
        import bitsandbytes.nn.modules as modules
        modules.has_avx512bf16 = lambda: False


def _dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    # bitsandbytes' "default" kernel for this op
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    if A.dtype != torch.uint8:
        A = A.view(torch.uint8)
    return _dequantize_4bit_compute(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize, shape,
                                    dtype)


def _gemv_4bit(A, B, shapeB, absmax, code, blocksize):
    # bitsandbytes' "default" kernel: dequantize, then a matmul in the input's precision
    quant_type = "fp4" if code[1] > 0 else "nf4"
    return torch.nn.functional.linear(A, _dequantize_4bit(B, absmax, blocksize, quant_type, shapeB, A.dtype))


_use_reference_kernels()
