"""NF4: 4-bit NormalFloat with blockwise absmax scaling and double quantization, in pure PyTorch.

QLoRA (Dettmers et al., arXiv 2305.14314), Sec. 3. A weight is flattened and cut into blocks of 64; each block
is scaled by its absolute maximum c2 and every value replaced by the nearest of the 16 NormalFloat levels
(``NF4_CODE``, the paper's Appendix E: quantiles of N(0, 1) with an exact zero, normalised to [-1, 1]):

    W_NF4 = argmin_q |W / c2 - q|,   dequant(W_NF4) = q · c2                          (eq. 1 and 4)

Double quantization (eq. 6) quantizes the fp32 constants c2 again: their mean is subtracted and they are
quantized blockwise to 8 bits in blocks of 256 with the signed dynamic code of Dettmers (arXiv 1511.04561),
leaving one fp32 constant per 256 blocks. Storage is about 4.127 bits per parameter.

The layout and the arithmetic follow bitsandbytes (``quantize_4bit(quant_type="nf4", compress_statistics=True)``)
so the bytes and statistics are identical to what it produces on CPU: two codes per byte with the first in the
high nibble; an odd element count padded with the code for 0.0; a last, partial block scaled by its own absmax;
the 8-bit absmax codes picked through bitsandbytes' 65,536-bin lookup table (its CPU kernel; its CUDA kernel
searches the code exactly, which can differ by one step for a constant that falls within 1.5e-5 of a midpoint
between two codes).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from ..errors import GraftingError

# QLoRA Appendix E, as bitsandbytes hard-codes them (float32).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_ZERO = 7  # the index of 0.0: what pads an odd element count
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256


def dynamic_code(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic tree code (arXiv 1511.04561) that double quantization uses for the absmax constants.

    For each exponent e = 0..6, the midpoints of a linear grid on [0.1, 1] (2^e + 1 points) times 10^(e-6), with
    both signs; then 0 and 1; sorted. Computed in float32 exactly as bitsandbytes' ``create_dynamic_map``.
    """
    values: list[float] = []
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed \
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        grid = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (grid[:-1] + grid[1:]) / 2.0
        values += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            values += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if extra > 0:
        grid = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        means = (grid[:-1] + grid[1:]) / 2.0
        values += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            values += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


_LUT_BINS = 65536
_luts: dict[tuple, torch.Tensor] = {}


def _code_lut(code: torch.Tensor) -> torch.Tensor:
    """For each of 65,536 evenly spaced values in [-1, 1], the index of the nearest code (bitsandbytes' CPU table)."""
    key = tuple(code.tolist())
    lut = _luts.get(key)
    if lut is None:
        mids = 0.5 * (code[:-1] + code[1:])
        grid = -1.0 + (2.0 * torch.arange(_LUT_BINS, dtype=torch.float32)) / (_LUT_BINS - 1)
        lut = torch.searchsorted(mids.float(), grid, side="left").to(torch.uint8)
        _luts[key] = lut
    return lut


def _blockwise_absmax(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat / absmax of its block clamped to [-1, 1], absmax per block); the last block may be partial."""
    n = flat.numel()
    full = n - n % block_size
    head = flat[:full].view(-1, block_size)
    absmax = head.abs().amax(dim=1)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max()
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max.clamp(min=1e-38), -1, 1)])
    return scaled, absmax


def quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor,
                            block_size: int = NESTED_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, fp32 absmax per block) for a 1-d float tensor: the 8-bit step of double quantization."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = torch.nn.functional.pad(flat, (0, blocks * block_size - n)).view(blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax).view(-1, 1)).clamp(-1, 1)
    index = (((scaled + 1.0) * 0.5) * (_LUT_BINS - 1) + 0.5).to(torch.int64).clamp_(0, _LUT_BINS - 1)
    q = _code_lut(code)[index]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n], absmax


@dataclass
class NF4Weight:
    """A weight quantized to NF4: everything needed to rebuild it, nothing else.

    ``packed``: uint8, ceil(n/2) bytes, element 2i in the high nibble of byte i. ``absmax``: one scale per block,
    uint8 codes when double-quantized (then ``nested_absmax``, ``nested_code`` and ``offset`` rebuild them),
    float32 otherwise.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    block_size: int
    code: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_block_size: int = NESTED_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes, every statistic, both codebooks."""
        tensors = [self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def payload_nbytes(self) -> int:
        """Bytes that grow with the weight: codes and scales, without the two constant codebooks."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes / self.numel

    def block_scales(self) -> torch.Tensor:
        """The fp32 absmax of every block (double quantization undone)."""
        if not self.double_quant:
            return self.absmax.float()
        # few, large ops: every forward pays this, and a decode step of a small layer is mostly op overhead
        scales = torch.index_select(self.nested_code.float(), 0, self.absmax.view(-1).to(torch.int32))
        n, nbs = scales.numel(), self.nested_block_size
        full = n - n % nbs
        nested = self.nested_absmax.float()
        if full:
            scales[:full].view(-1, nbs).mul_(nested[:full // nbs].view(-1, 1))
        if full < n:
            scales[full:].mul_(nested[-1])
        return scales.add_(self.offset.float())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight, in ``dtype`` (default: the dtype it was quantized from)."""
        flat = dequantize_range(self, 0, self.numel, self.block_scales())
        return flat.view(self.shape).to(dtype or self.dtype)


_quads: dict = {}


def _quad_table(code: torch.Tensor) -> torch.Tensor:
    """(65536,) complex128: the four float32 values that two packed bytes (read as one uint16) hold, each
    16-byte row as one element.

    One gather per two bytes is about 1.6x faster on CPU than one per byte, and gathering a row as one
    complex128 scalar is ~1.3x faster than copying four floats (measured, 768 x 3072)."""
    last = _quads.get("last")  # every forward asks: skip building the key when it is the same code tensor
    if last is not None and last[0] is code and last[1] == code._version:
        return last[2]
    key = (tuple(code.tolist()), code.dtype)
    quad = _quads.get(key)
    if quad is None:
        b = torch.arange(256)
        pair = torch.stack([code[b >> 4], code[b & 15]], 1)
        word = torch.arange(65536)
        first, second = word & 255, word >> 8  # little-endian: the lower byte comes first in memory
        if torch.tensor([1], dtype=torch.int16).view(torch.uint8)[0] != 1:
            first, second = second, first
        quad = torch.cat([pair[first], pair[second]], 1).contiguous().view(torch.complex128).view(-1)
        _quads[key] = quad
    _quads["last"] = (code, code._version, quad)
    return quad


_scratch = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A flat per-thread buffer of at least ``numel`` elements, reused across calls.

    Dequantizing into fresh memory every call costs more than the dequantization: a new multi-megabyte tensor
    is fresh pages the kernel must fault in (measured: a 768 x 3072 forward at 512 tokens went from 35 ms to
    the ~26 ms of dequantize + matmul once the buffers were reused). Per thread, so concurrent callers never
    share one."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    key = (name, dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
            buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def dequantize_range(q: NF4Weight, start: int, end: int, scales: torch.Tensor, reuse: bool = False) -> torch.Tensor:
    """Flat elements [start, end) of the dense weight in fp32; ``start`` is a multiple of the block size.

    ``scales`` are the fp32 block absmax (``q.block_scales()``), computed once per call by the caller. With
    ``reuse`` the result lives in this thread's scratch buffer: valid until the next reusing call."""
    bs = q.block_size
    byte0, byte1 = start // 2, -(-end // 2)
    raw = q.packed.view(-1)[byte0:byte1]
    code = q.code.float()
    device = raw.device
    if raw.numel() % 2 == 0 and byte0 % 2 == 0:
        words = raw.numel() // 2
        if reuse:
            index = scratch("index", words, torch.int32, device)
            index.copy_(raw.view(torch.uint16))
            values = scratch("values", words * 4, torch.float32, device)
        else:
            index = raw.view(torch.uint16).to(torch.int32)
            values = torch.empty(words * 4, dtype=torch.float32, device=device)
        torch.index_select(_quad_table(code), 0, index, out=values.view(torch.complex128))
    else:  # an odd byte count or offset: one gather per byte
        b = raw.long()
        values = torch.stack([code[b >> 4], code[b & 15]], 1).view(-1)
    return scale_blocks(values[: end - start], scales, start, bs)


def scale_blocks(values: torch.Tensor, scales: torch.Tensor, start: int, block_size: int) -> torch.Tensor:
    """Multiply flat code values that begin at element ``start`` (a block boundary) by their blocks' scales."""
    block0, n = start // block_size, values.numel()
    full = n - n % block_size
    if full:
        values[:full].view(-1, block_size).mul_(scales[block0:block0 + full // block_size].view(-1, 1))
    if full < n:
        values[full:].mul_(scales[block0 + full // block_size])
    return values


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float tensor to NF4 (QLoRA eq. 1), optionally with double quantization (eq. 6)."""
    if not (isinstance(w, torch.Tensor) and w.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)):
        raise GraftingError(f"quantize_nf4: expected a float tensor, got "
                            f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if block_size not in BLOCK_SIZES:
        raise GraftingError(f"quantize_nf4: block_size must be one of {BLOCK_SIZES} (as bitsandbytes), "
                            f"got {block_size}")
    if w.numel() == 0:
        raise GraftingError("quantize_nf4: cannot quantize an empty tensor")
    w = w.detach()
    flat = w.reshape(-1).float()
    scaled, absmax = _blockwise_absmax(flat, block_size)
    code = NF4_CODE.to(w.device)
    mids = (code[:-1] + code[1:]) / 2
    idx = torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_full((1,), NF4_ZERO)])
    packed = (idx[0::2] << 4) | idx[1::2]
    q = NF4Weight(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype, block_size=block_size,
                  code=code.clone())
    return double_quantize(q) if double_quant else q


def double_quantize(q: NF4Weight) -> NF4Weight:
    """QLoRA eq. 6 on ``q``'s fp32 block absmax, in place: mean subtracted, 8-bit blockwise codes."""
    offset = q.absmax.mean()
    nested_code = dynamic_code().to(q.absmax.device)
    q.absmax, q.nested_absmax = quantize_blockwise_8bit(q.absmax - offset, nested_code)
    q.nested_code, q.offset = nested_code, offset
    return q
