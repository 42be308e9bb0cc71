"""``NF4Linear``: a frozen linear layer stored in NF4 that computes its own output a bounded slice at a time.

The forward never holds the whole fp32 weight: rows of the weight are dequantized ``chunk_elements`` at a time
and multiplied straight away, and the input gradient in backward is built the same way (dL/dx = g · W, slice by
slice), so the extra memory is one slice, not the layer (the weight gets no gradient: QLoRA trains adapters on a
frozen base). Both directions are autograd functions of each other, so higher derivatives (the bi-level
engine's Hessian-vector products) flow through as well.

It speaks the host protocol (grafting.layers): ``in_features``, ``out_features``, ``dequantize()`` and
``quantize_(weight)``, so every registered low-rank method trains, merges (dequantize, add ΔW, re-quantize) and
serves on it without knowing it is quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GraftingError
from .nf4 import NF4Weight, dequantize_range, quantize_nf4
from .storage import NF4Storage

CHUNK_ELEMENTS = 1 << 21  # 8 MB of fp32 per slice: most layers of a small model are one slice
BACKENDS = ("torch", "bitsandbytes")
_backend = "torch"


def set_backend(name: str) -> None:
    """Which kernel NF4 layers use for calls that build no input gradient (inference, a frozen prefix).

    "torch" (default, the reference): grafting's own slice-by-slice path. "bitsandbytes": its ``matmul_4bit``
    on the same bytes (the same results up to float rounding); on this project's CPU benchmark it is faster at
    larger token counts (docs/benchmarks.md). Calls that need an input gradient always use grafting's path,
    whose backward never materialises the whole weight (bitsandbytes' does)."""
    global _backend
    if name not in BACKENDS:
        raise GraftingError(f"set_backend: expected one of {BACKENDS}, got {name!r}")
    if name == "bitsandbytes":
        import importlib.util
        if importlib.util.find_spec("bitsandbytes") is None:
            raise GraftingError("set_backend('bitsandbytes'): bitsandbytes is not installed "
                                "(pip install bitsandbytes)")
    _backend = name


def get_backend() -> str:
    return _backend


class NF4Linear(NF4Storage):
    """y = x · dequant(W)ᵀ + b with W in NF4 (QLoRA, arXiv 2305.14314); weight frozen, bias as stored."""

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None = None, chunk_elements: int = CHUNK_ELEMENTS):
        if len(q.shape) != 2:
            raise GraftingError(f"NF4Linear needs a 2-d (out, in) weight, got shape {tuple(q.shape)}")
        super().__init__(q)
        self.out_features, self.in_features = int(q.shape[0]), int(q.shape[1])
        self.chunk_elements = chunk_elements
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.requantize_error: float | None = None  # set by quantize_ (a merge): relative error it introduced

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int = 64, double_quant: bool = True,
                    transpose: bool = False) -> "NF4Linear":
        """Quantize a Linear (or, with ``transpose``, a GPT-2 Conv1D, whose weight is stored (in, out))."""
        w = linear.weight.detach()
        if transpose:
            w = w.t().contiguous()
        return cls(quantize_nf4(w, block_size, double_quant), linear.bias)

    # ---- host protocol: in_features, out_features, dequantize() (NF4Storage), quantize_ ----------------------
    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Re-quantize a dense (out, in) weight into this module's storage (a merge writes through here)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise GraftingError(f"quantize_: expected a weight of shape {(self.out_features, self.in_features)}, "
                                f"got {tuple(weight.shape)}")
        target = weight.to(self.weight_dtype).float()
        q = self._quantize(target)
        # what re-quantizing cost, for the merge report: ||dequant(Q(W')) - W'|| / ||W'||
        self.requantize_error = float((q.dequantize(torch.float32) - target).norm() / target.norm().clamp_min(1e-30))
        for name in ("packed", "absmax", "nested_absmax", "nested_code", "offset", "code"):
            buf = getattr(self, name)
            if buf is not None:
                buf.copy_(getattr(q, name))

    def _quantize(self, weight: torch.Tensor) -> NF4Weight:
        return quantize_nf4(weight, self.block_size, self.double_quant)

    def _dequantize_rows(self, q: NF4Weight, start: int, end: int, scales: torch.Tensor) -> torch.Tensor:
        """Flat elements [start, end) of the weight in fp32, in this thread's reused scratch buffer."""
        return dequantize_range(q, start, end, scales, reuse=True)

    # ---- compute ----------------------------------------------------------------------------------------------
    def row_slices(self):
        """(first row, last row + 1) of each slice dequantized at once; slices start on block boundaries."""
        key = (self.chunk_elements, self.out_features, self.in_features, self.block_size)
        cached = self.__dict__.get("_slices")
        if cached is not None and cached[0] == key:  # every forward asks; the answer changes with these only
            return cached[1]
        n_in, bs = self.in_features, self.block_size
        step = bs // _gcd(n_in, bs)  # rows per block-aligned unit
        rows = max(step, (self.chunk_elements // max(n_in, 1)) // step * step)
        slices = [(r, min(r + rows, self.out_features)) for r in range(0, self.out_features, rows)]
        self.__dict__["_slices"] = (key, slices)
        return slices

    def weight_slices(self, dtype: torch.dtype):
        """(row range, dense rows in ``dtype``) for each slice, dequantized one at a time."""
        q = self.weight_nf4
        scales = q.block_scales()
        n_in = self.in_features
        for r0, r1 in self.row_slices():
            # into a reused buffer: each slice is consumed before the next is written
            w = self._dequantize_rows(q, r0 * n_in, r1 * n_in, scales).view(r1 - r0, n_in)
            yield (r0, r1), (w if dtype == torch.float32 else w.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise GraftingError(f"NF4Linear: input has {x.shape[-1]} features, layer expects {self.in_features}")
        bias = self.bias
        frozen_bias = bias is None or not bias.requires_grad
        if not (torch.is_grad_enabled() and x.requires_grad):
            if _backend == "bitsandbytes":
                return self._bitsandbytes_forward(x)
            if frozen_bias:  # no graph to build: skip the autograd Function (decode steps are overhead-bound)
                return nf4_matmul(x, self, bias)
        if frozen_bias:  # the usual case: added inside the matmul
            return _NF4Matmul.apply(x, self, bias)
        y = _NF4Matmul.apply(x, self, None)
        return y + bias.to(y.dtype)

    def _bitsandbytes_forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        nested = None
        if self.double_quant:
            nested = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=256, dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                           code=self.code, blocksize=self.block_size, quant_type="nf4", dtype=torch.float32,
                           offset=self.offset, state2=nested)
        bias = None if self.bias is None else self.bias.float()
        y = bnb.matmul_4bit(x.float(), self.packed.view(-1, 1).t(), quant_state=state, bias=bias)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def nf4_matmul(x: torch.Tensor, layer: NF4Linear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · Wᵀ (+ bias), slice by slice (no autograd)."""
    dtype = x.dtype if x.is_floating_point() else torch.float32
    if bias is not None:
        bias = bias.to(dtype)
    outs = [F.linear(x, w, None if bias is None else bias[r0:r1]) for (r0, r1), w in layer.weight_slices(dtype)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


def nf4_matmul_t(g: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
    """g · W, slice by slice: the input gradient of x · Wᵀ (no autograd)."""
    out = None
    for (r0, r1), w in layer.weight_slices(g.dtype):
        part = g[..., r0:r1] @ w
        out = part if out is None else out.add_(part)
    return out


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return nf4_matmul(x, layer, bias)

    @staticmethod
    def backward(ctx, g):
        return _NF4MatmulT.apply(g, ctx.layer), None, None


class _NF4MatmulT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, layer):
        ctx.layer = layer
        return nf4_matmul_t(g, layer)

    @staticmethod
    def backward(ctx, h):
        return _NF4Matmul.apply(h, ctx.layer, None), None
