"""k-bit NormalFloat (NF2, NF3, NF4, NF8): the quantization configurations LQ-LoRA's memory budget mixes.

QLoRA (Dettmers et al., arXiv 2305.14314, Sec. 3 and Appendix E) builds its 4-bit levels from quantiles of
N(0, 1): 2^(k-1) positive levels from ``ndtri(linspace(offset, 0.5, 2^(k-1) + 1))``, 2^(k-1) - 1 negative ones
from ``-ndtri(linspace(offset, 0.5, 2^(k-1)))``, an exact zero, all divided by the largest (offset 0.9677083,
the value bitsandbytes' ``create_normal_map`` uses). LQ-LoRA (Guo et al., arXiv 2311.12023, Sec. 3.2) applies
the same construction at k in {2, 3, 4, 8} bits and picks (bits, block size) per matrix under a memory budget
(:func:`grafting.quant.loftq.allocate_configs`). At k = 4 the formula gives QLoRA's published ``NF4_CODE``
(to float32 rounding), which this module then uses exactly.

Scaling and double quantization are NF4's (blockwise absmax; the scales quantized to 8 bits in blocks of 256).
Codes are packed ``k`` bytes per 8 values, the first value in the highest bits (at k = 4 that is NF4's byte
layout). Only NF4 is a bitsandbytes format; a base holding NF2 / NF3 / NF8 layers is saved in grafting's own
variant of the checkpoint (see :mod:`grafting.quant.checkpoint`), which transformers refuses by name.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import GraftingError
from .linear import CHUNK_ELEMENTS, NF4Linear
from .nf4 import NF4_CODE, NF4Weight, _blockwise_absmax, double_quantize, scale_blocks

BITS = (2, 3, 4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
NF_OFFSET = 0.9677083


def normal_float_code(bits: int, exact_nf4: bool = True) -> torch.Tensor:
    """The 2^bits NormalFloat levels in [-1, 1], ascending, float32 (QLoRA's construction at any bit width)."""
    if bits not in BITS:
        raise GraftingError(f"NormalFloat: bits must be one of {BITS}, got {bits!r}")
    if bits == 4 and exact_nf4:
        return NF4_CODE.clone()
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)])
    values = values / values.abs().max()
    return values.sort().values.float()


def zero_index(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # the negative levels come first


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes below 2^bits -> ``bits`` bytes per 8 codes (padded with the zero level)."""
    if bits == 8:
        return codes.to(torch.uint8).reshape(-1)
    pad = (-codes.numel()) % 8
    c = torch.cat([codes.reshape(-1), codes.new_full((pad,), zero_index(bits))]).view(-1, 8).long()
    shifts = bits * torch.arange(7, -1, -1, device=codes.device)
    word = (c << shifts).sum(1)  # at most 8 x 3 = 24 bits here (k = 8 returned above)
    out = (word[:, None] >> (8 * torch.arange(bits - 1, -1, -1, device=codes.device))) & 255
    return out.to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes (int64) of ``packed``: the inverse of :func:`pack_codes`."""
    if bits == 8:
        return packed[:n].long()
    b = packed.view(-1, bits).long()
    word = (b << (8 * torch.arange(bits - 1, -1, -1, device=packed.device))).sum(1)
    codes = (word[:, None] >> (bits * torch.arange(7, -1, -1, device=packed.device))) & (2 ** bits - 1)
    return codes.reshape(-1)[:n]


@dataclasses.dataclass
class NFkWeight(NF4Weight):
    """A weight in k-bit NormalFloat: NF4Weight's fields (the same statistics) plus ``bits``."""

    bits: int = 4

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        flat = dequantize_range(self, 0, self.numel, self.block_scales())
        return flat.view(self.shape).to(dtype or self.dtype)


def dequantize_range(q: NFkWeight, start: int, end: int, scales: torch.Tensor) -> torch.Tensor:
    """Flat elements [start, end) in fp32; ``start`` is a multiple of the block size and of 8."""
    bits, bs = q.bits, q.block_size
    g0, g1 = start // 8, -(-end // 8)
    raw = q.packed.view(-1)[start:end] if bits == 8 else q.packed.view(-1)[g0 * bits: g1 * bits]
    codes = unpack_codes(raw, bits, end - start)
    return scale_blocks(q.code.float()[codes], scales, start, bs)


def quantize_nfk(w: torch.Tensor, bits: int = 4, block_size: int = 64, double_quant: bool = True) -> NFkWeight:
    """Quantize a float tensor to k-bit NormalFloat with blockwise absmax scales (and double quantization)."""
    if not (isinstance(w, torch.Tensor) and w.is_floating_point()):
        raise GraftingError(f"quantize_nfk: expected a float tensor, got "
                            f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if bits not in BITS:
        raise GraftingError(f"quantize_nfk: bits must be one of {BITS}, got {bits!r}")
    if block_size not in BLOCK_SIZES:
        raise GraftingError(f"quantize_nfk: block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    if w.numel() == 0:
        raise GraftingError("quantize_nfk: cannot quantize an empty tensor")
    w = w.detach()
    scaled, absmax = _blockwise_absmax(w.reshape(-1).float(), block_size)
    code = normal_float_code(bits).to(w.device)
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    q = NFkWeight(packed=pack_codes(idx, bits), absmax=absmax, shape=w.shape, dtype=w.dtype,
                  block_size=block_size, code=code, bits=bits)
    return double_quantize(q) if double_quant else q


class NFkLinear(NF4Linear):
    """NF4Linear's bounded slice-by-slice layer over a k-bit NormalFloat weight (LQ-LoRA's mixed configurations).

    Everything but the code width is NF4Linear's: the host protocol, autograd, merges (``quantize_`` re-quantizes
    at the same bits and block size). The bitsandbytes backend does not apply (bitsandbytes has no NF2/3/8)."""

    def __init__(self, q: NFkWeight, bias: torch.Tensor | None = None, chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__(q, bias, chunk_elements)
        self.bits = q.bits

    @classmethod
    def from_linear(cls, linear, bits: int = 4, block_size: int = 64, double_quant: bool = True,
                    transpose: bool = False) -> "NFkLinear":
        w = linear.weight.detach()
        return cls(quantize_nfk(w.t().contiguous() if transpose else w, bits, block_size, double_quant), linear.bias)

    @property
    def weight_nf4(self) -> NFkWeight:  # the host protocol's accessor for "the quantized weight"
        return NFkWeight(packed=self.packed, absmax=self.absmax, shape=self.nf4_shape, dtype=self.weight_dtype,
                         block_size=self.block_size, code=self.code, nested_absmax=self.nested_absmax,
                         nested_code=self.nested_code, offset=self.offset, bits=self.bits)

    def _quantize(self, weight: torch.Tensor) -> NFkWeight:
        return quantize_nfk(weight, self.bits, self.block_size, self.double_quant)

    def _dequantize_rows(self, q, start: int, end: int, scales: torch.Tensor) -> torch.Tensor:
        # slices start on block boundaries, and every block size is a multiple of the 8-code group
        return dequantize_range(q, start, end, scales)

    def _bitsandbytes_forward(self, x: torch.Tensor) -> torch.Tensor:
        from .linear import nf4_matmul
        return nf4_matmul(x, self, self.bias)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, " + super().extra_repr()
