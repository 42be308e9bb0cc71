"""Quantization-aware LoRA initialisation: LoftQ and LQ-LoRA, exported as an NF4 base plus an ordinary adapter.

QLoRA starts the adapter at zero on top of Q = q(W), so training first has to undo the quantization error
W - Q. Both methods below instead pick Q and a rank-r product s·B·A together so that Q + s·B·A ≈ W:

- **LoftQ** (Li et al., arXiv 2310.08659, Algorithm 1): starting from B·A = 0, for t = 1..T
  ``Q_t = q_N(W - s·B_{t-1}A_{t-1})`` then ``s·B_t A_t = SVD_r(W - Q_t)`` (eq. 6-7; the factors take the square
  root of the singular values on each side). The paper's default is T = 5 for 4-bit, rank as the adapter's.
- **LQ-LoRA** (Guo et al., arXiv 2311.12023, Algorithm 1): the same alternation started from the other side,
  ``L = SVD_r(W)`` first (Q = 0), then ``Q = q(W - L)``, ``L = SVD_r(W - Q)``, ..., stopping as soon as the error
  ``||W - (Q + L)||_F`` rises and keeping the best iterate. Its optional memory budget (Sec. 3.2, eq. 5) picks
  a quantization configuration per matrix: NormalFloat at 2, 3, 4 or 8 bits (:mod:`grafting.quant.nfk`) and
  a block size, double-quantized; the choice is the multiple-choice knapsack the paper solves as an ILP, solved
  here by Lagrangian relaxation (bisection on the multiplier), which hits the budget to within one matrix's
  step. A base whose matrices are all NF4 stays a bitsandbytes checkpoint; NF2 / NF3 / NF8 layers make it a
  grafting one.

q_N is :func:`grafting.quant.quantize_nf4` with the block size and double quantization the base will be stored
with, so the adapter absorbs the error of exactly the quantized base that is saved (peft's LoftQ quantizes
without double quantization and ignores LoRA's scaling s; here the factors are divided by sqrt(s) so that
s·B·A is the fitted product for any lora_alpha).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import GraftingError
from .linear import NF4Linear
from .model import linear_modules, quantizable, quantize
from .nf4 import NF4Weight, quantize_nf4
from .nfk import NFkLinear, quantize_nfk

INITS = ("qlora", "loftq", "lq_lora")
# LQ-LoRA's search space (Sec. 3.2): NormalFloat at 2, 3, 4 and 8 bits, each with a few block sizes
CONFIGS = tuple((bits, bs) for bits in (2, 3, 4, 8) for bs in (32, 64, 128, 256))


def _quantize(w: torch.Tensor, block_size: int, double_quant: bool, bits: int) -> NF4Weight:
    """NF4 as bitsandbytes stores it, or k-bit NormalFloat (LQ-LoRA's other configurations)."""
    return quantize_nf4(w, block_size, double_quant) if bits == 4 else quantize_nfk(w, bits, block_size, double_quant)


@dataclasses.dataclass
class Decomposition:
    """W ≈ dequant(q) + scaling·B·A, and the Frobenius errors along the way."""

    q: NF4Weight
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    qlora_error: float  # ||W - q(W)||: the error QLoRA starts with
    errors: list[float]  # ||W - (Q_t + s·B_t A_t)|| per iteration


def _svd_r(m: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    root = (S[:r] / scaling).sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root  # A (r, in), B (out, r): scaling·B·A = SVD_r(m)


def loftq_decompose(w: torch.Tensor, r: int, scaling: float = 1.0, num_iter: int = 5, block_size: int = 64,
                    double_quant: bool = True, bits: int = 4) -> Decomposition:
    """LoftQ Algorithm 1 on one (out, in) weight."""
    if num_iter < 1:
        raise GraftingError(f"LoftQ: num_iter must be at least 1, got {num_iter}")
    W = w.detach().float()
    q = _quantize(W, block_size, double_quant, bits)
    Q = q.dequantize(torch.float32)
    qlora = float((W - Q).norm())
    errors, low = [], None
    for t in range(num_iter):
        if t:
            q = _quantize(W - low, block_size, double_quant, bits)
            Q = q.dequantize(torch.float32)
        A, B = _svd_r(W - Q, r, scaling)
        low = scaling * (B @ A)
        errors.append(float((W - Q - low).norm()))
    return Decomposition(q, A, B, qlora, errors)


def lq_decompose(w: torch.Tensor, r: int, scaling: float = 1.0, num_iter: int = 20, block_size: int = 64,
                 double_quant: bool = True, bits: int = 4) -> Decomposition:
    """LQ-LoRA Algorithm 1 on one (out, in) weight: low-rank first, stop when the error rises, keep the best."""
    if num_iter < 1:
        raise GraftingError(f"LQ-LoRA: num_iter must be at least 1, got {num_iter}")
    W = w.detach().float()
    qlora = float((W - _quantize(W, block_size, double_quant, bits).dequantize(torch.float32)).norm())
    A, B = _svd_r(W, r, scaling)
    best, errors = None, []
    for _ in range(num_iter):
        q = _quantize(W - scaling * (B @ A), block_size, double_quant, bits)
        Q = q.dequantize(torch.float32)
        A, B = _svd_r(W - Q, r, scaling)
        err = float((W - Q - scaling * (B @ A)).norm())
        if errors and err >= errors[-1]:
            errors.append(err)
            break
        errors.append(err)
        best = (q, A, B)
    q, A, B = best
    return Decomposition(q, A, B, qlora, errors)


def allocate_configs(weights: dict[str, torch.Tensor], bits_per_parameter: float, choices=CONFIGS,
                     r: dict | None = None, scaling: dict | None = None, num_iter: int = 3) -> dict[str, tuple]:
    """LQ-LoRA Sec. 3.2 (eq. 5): a (bits, block size) per matrix minimising the summed squared error of the LQ
    decomposition (of plain quantization when ``r`` is None) under a budget of ``bits_per_parameter``
    (averaged over all parameters; codes and every scale count, the constant codebooks do not)."""
    choices = [tuple(c) for c in choices]
    sizes = {n: w.numel() for n, w in weights.items()}
    table: dict[str, dict[tuple, tuple[float, float]]] = {}
    for n, w in weights.items():
        table[n] = {}
        for bits, bs in choices:
            if r is None:
                q = _quantize(w.float(), bs, True, bits)
                err = float((w.float() - q.dequantize(torch.float32)).norm()) ** 2
            else:
                d = lq_decompose(w, r[n], scaling[n], num_iter, bs, True, bits)
                q, err = d.q, min(d.errors) ** 2
            table[n][(bits, bs)] = (err, 8.0 * q.payload_nbytes)
    total = sum(sizes.values())
    budget = bits_per_parameter * total
    cheapest = sum(min(b for _, b in t.values()) for t in table.values())
    if cheapest > budget:
        low = min(choices, key=lambda c: (c[0], -c[1]))
        raise GraftingError(f"bit budget {bits_per_parameter} per parameter is below the smallest configuration "
                            f"({cheapest / total:.4f} bits: NF{low[0]} in blocks of {low[1]})")

    def pick(lam):
        return {n: min(t, key=lambda c: t[c][0] + lam * t[c][1]) for n, t in table.items()}

    lo, hi = 0.0, 1.0
    while sum(table[n][c][1] for n, c in pick(hi).items()) > budget:
        hi *= 4
    for _ in range(60):  # the smallest multiplier whose choice fits the budget
        mid = (lo + hi) / 2
        if sum(table[n][c][1] for n, c in pick(mid).items()) > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)


def allocate_block_sizes(weights: dict[str, torch.Tensor], bits_per_parameter: float,
                         choices=(32, 64, 128, 256, 512), r: dict | None = None, scaling: dict | None = None,
                         num_iter: int = 3) -> dict[str, int]:
    """:func:`allocate_configs` over NF4 block sizes only: the base stays a bitsandbytes checkpoint."""
    picked = allocate_configs(weights, bits_per_parameter, [(4, bs) for bs in choices], r, scaling, num_iter)
    return {n: bs for n, (_, bs) in picked.items()}


def quantize_with_adapter(model: nn.Module, config, init: str = "loftq", num_iter: int | None = None,
                          block_size: int = 64, double_quant: bool = True, quantize_others: bool = True,
                          bits_per_parameter: float | None = None, adapter_name: str = "default",
                          embeddings: bool = False, nf4_only: bool = False):
    """Quantize ``model`` to NF4 and add a LoRA adapter initialised for that quantized base.

    ``init``: "qlora" (plain quantization, adapter as the config says), "loftq" or "lq_lora". The adapter's
    target layers are decomposed; with ``quantize_others`` every other linear layer but the output head is
    quantized plainly. ``bits_per_parameter`` (LQ-LoRA only): a memory budget over the target layers, met by a
    (bits, block size) per matrix from :data:`CONFIGS` (NormalFloat at 2, 3, 4, 8 bits); ``nf4_only`` restricts
    the choice to NF4 block sizes, so the base stays a bitsandbytes checkpoint. ``embeddings``: the input embedding and output head in NF4 too (see
    ``quantize``). Returns ``(adapted_model, report)``; report maps each target module to its
    ``qlora_error``, the ``errors`` per iteration and the ``block_size`` chosen. Save with
    :func:`grafting.quant.save_pretrained` (the base) and ``save_adapter`` (the adapter): the adapter records
    a fingerprint of this base and refuses to load onto another.
    """
    from ..inject import find_targets
    from ..io.peft_format import BASE_FINGERPRINT, base_fingerprint
    from ..model import adapt

    if init not in INITS:
        raise GraftingError(f"quantize init must be one of {INITS}, got {init!r}")
    if getattr(config, "method", None) != "lora" or getattr(config, "use_dora", False):
        raise GraftingError(f"{init}: needs a plain LoRA config (LoraConfig, no DoRA); got "
                            f"{type(config).__name__}")
    if bits_per_parameter is not None and init != "lq_lora":
        raise GraftingError("bits_per_parameter is LQ-LoRA's memory budget: use it with init='lq_lora'")
    full = _trained_in_full(config)
    if init == "qlora":
        quantize(model, block_size=block_size, double_quant=double_quant, skip=full or None,
                 targets=None if quantize_others else _names(find_targets(model, config)), embeddings=embeddings)
        return adapt(model, config, adapter_name), {}
    if config.init_lora_weights not in (True, "kaiming", "gaussian"):
        raise GraftingError(f"{init}: sets the factors itself; init_lora_weights={config.init_lora_weights!r} "
                            "would conflict")
    targets = find_targets(model, config)
    linear = {n for n, _ in linear_modules(model)}
    bad = [n for n, _ in targets if n not in linear]
    if bad:
        raise GraftingError(f"{init}: target '{bad[0]}' is not a Linear / Conv1D layer; LoftQ and LQ-LoRA "
                            "decompose linear weights")
    num_iter = num_iter or (5 if init == "loftq" else 20)
    weights, rank, scale = {}, {}, {}
    for name, module in targets:
        weights[name] = module.weight.detach().float() if isinstance(module, nn.Linear) \
            else module.weight.detach().float().t().contiguous()
        r, alpha = config.rank_and_alpha(name)
        rank[name], scale[name] = r, config.scaling(r, alpha)
    configs = {n: (4, block_size) for n in weights}
    if bits_per_parameter is not None:
        choices = [(4, bs) for bs in (32, 64, 128, 256, 512)] if nf4_only else CONFIGS
        configs = allocate_configs(weights, bits_per_parameter, choices, r=rank, scaling=scale, num_iter=3)
    decompose = loftq_decompose if init == "loftq" else lq_decompose
    factors, report = {}, {}
    for name, module in targets:
        bits, bs = configs[name]
        d = decompose(weights[name], rank[name], scale[name], num_iter, bs, double_quant, bits)
        layer = NF4Linear(d.q, module.bias) if bits == 4 else NFkLinear(d.q, module.bias)
        layer.compute_dtype = module.weight.dtype
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.to(module.weight.device))
        factors[name] = (d.A, d.B)
        report[name] = {"qlora_error": d.qlora_error, "errors": d.errors, "bits": bits, "block_size": bs}
        del weights[name]
    if quantize_others and quantizable(model, skip=full or None):  # the output head stays in full precision
        quantize(model, block_size=block_size, double_quant=double_quant, skip=full or None)
    if embeddings:
        from .model import _quantize_embeddings
        _quantize_embeddings(model, block_size, double_quant)
    adapted = adapt(model, config, adapter_name)
    hosts = dict(adapted.hosts())
    with torch.no_grad():
        for name, (A, B) in factors.items():
            adapter = hosts[name].adapters[adapter_name]
            adapter.lora_A.copy_(A.reshape(adapter.lora_A.shape))
            adapter.lora_B.copy_(B.reshape(adapter.lora_B.shape))
    adapted.adapter_metadata[adapter_name] = {BASE_FINGERPRINT: base_fingerprint(adapted, adapter_name)}
    return adapted, report


def _trained_in_full(config) -> list[str]:
    """Modules the adapter trains in full (modules_to_save, a classifier head): they stay in full precision."""
    from ..inject import TASK_HEADS
    return list(config.modules_to_save or []) + list(TASK_HEADS.get(config.task_type or "", ()))


def _names(targets) -> list[str]:
    return [n for n, _ in targets]
