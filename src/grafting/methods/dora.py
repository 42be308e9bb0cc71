"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).

Eq. (5): W' = m · (W0 + s·BA) / ||W0 + s·BA||_c, with the magnitude m initialised to ||W0||_c (per output
feature; for embeddings per embedding dimension, as PEFT) and the direction updated by LoRA. The forward is
    out = g ⊙ (W0 x + s·B A x) + b,     g = m / ||W0 + s·BA||_c.
DoRA composes with LoRA (same factors, same init) and adds the magnitude.

Two norm modes, identical in value, different in derivatives:
- detached (default; Sec. 4.3 of the paper, and peft): the norm is a constant for differentiation. Every mode of
  differentiation (reverse, forward, Hessian-vector products) then sees the same surrogate function, whose
  derivatives differ from finite differences of the forward.
- exact (``DoraConfig(exact_norm=True)``): the norm is differentiated, so reverse, forward and second-order
  derivatives are those of the function itself (what bi-level hypergradients need), at the cost of a backward
  through the norm.

Speed: the norm never materialises the dense W0 + s·BA. Row i of ||W0 + s·BA||² expands to
||W0_i||² + 2s·(W0 Aᵀ)_i·B_i + s²·B_i (A Aᵀ) B_iᵀ; ||W0_i||² is cached per base-weight version, and the
detached norm per parameter version, so inference (and gradient-accumulation micro-steps) recompute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..autodiff import tracking_derivatives
from ..registry import register
from .base import Method
from .lora import (LoraConfig, add_lowrank, create_lora, lora_deterministic, lora_factors, lora_factors_from_tensors,
                   lowrank_out, lowrank_weight_out_in, merged_lowrank_weight, peft_lora_keys)


@dataclass
class DoraConfig(LoraConfig):
    """A LoRA config with ``use_dora=True``; ``exact_norm`` differentiates the norm (grafting only: it changes
    derivatives, not outputs, so it is not written to adapter_config.json)."""

    grafting_only = ("exact_norm",)

    use_dora: bool = True
    exact_norm: bool = False

    def check(self, bad) -> None:
        super().check(bad)
        if not isinstance(self.exact_norm, bool):
            raise bad("exact_norm", "true or false", self.exact_norm)


def _version_key(*tensors: torch.Tensor):
    # inference-mode results must not be reused where autograd may save them, hence the mode in the key
    try:
        return (torch.is_inference_mode_enabled(),) + tuple((id(t), t.data_ptr(), t._version) for t in tensors)
    except (RuntimeError, AttributeError):  # functorch-wrapped tensors have no storage/version
        return None


def _cached(adapter: nn.Module, slot: str, key, compute):
    if key is not None:
        hit = adapter.__dict__.get(slot)
        if hit is not None and hit[0] == key:
            return hit[1]
    value = compute()
    if key is not None:
        adapter.__dict__[slot] = (key, value)
    return value


def _norm_expanded(w_out_in: torch.Tensor, w_sq: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float):
    cross = ((w_out_in @ a.t()) * b).sum(1)
    lr_sq = ((b @ (a @ a.t())) * b).sum(1)
    return (w_sq + 2 * s * cross + s * s * lr_sq).clamp_min(0).sqrt()


def weight_norm(adapter: nn.Module, host, exact: bool = False) -> torch.Tensor:
    """||W0 + s·BA|| per output feature: detached (Sec. 4.3) unless ``exact``."""
    w = host.dense_weight()
    A, B = adapter.lora_A, adapter.lora_B

    def row_sq_w():
        with torch.no_grad():
            return host.kind.to_out_in(w).to(A.dtype).pow(2).sum(1)

    w_sq = _cached(adapter, "_w_sq", _version_key(w), row_sq_w)
    a, b = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
    if exact and tracking_derivatives(A, B):
        return _norm_expanded(host.kind.to_out_in(w).to(a.dtype).detach(), w_sq, a, b, adapter.scaling)

    def compute():
        with torch.no_grad():  # no_grad stops reverse mode only; detach() stops forward mode (jvp) too
            wo = host.kind.to_out_in(w).to(a.dtype)
            return _norm_expanded(wo, w_sq, a, b, adapter.scaling).detach()

    return _cached(adapter, "_norm", _version_key(w, A, B), compute)


@register("dora", config=DoraConfig, flags={"use_dora": True})
class Dora(Method):
    """Weight-decomposed LoRA: magnitude m times the LoRA-updated direction (norm detached or exact)."""

    rescales_output = True
    low_rank_form = True

    def create(self, host, cfg, module_name, shared):
        adapter = create_lora(host, cfg, module_name)
        adapter.exact_norm = bool(getattr(cfg, "exact_norm", False))
        adapter.lora_magnitude = nn.Parameter(weight_norm(adapter, host).clone())
        adapter.__dict__.pop("_norm", None)
        return adapter

    def output_scale(self, adapter, host):
        return adapter.lora_magnitude / weight_norm(adapter, host, adapter.exact_norm)

    def delta(self, adapter, host, x, base_out):
        g = host.kind.out_view(self.output_scale(adapter, host), base_out)
        low = lowrank_out(adapter, host, x)
        if not lora_deterministic(adapter) and x.is_floating_point():
            # with dropout the paper's (and PEFT's) base term is W0·dropout(x), not the host's output
            xd = adapter.lora_dropout(x.to(adapter.lora_A.dtype))
            plain = host.kind.apply_weight(host.base_layer, xd, host.dense_weight().to(xd.dtype))
        else:
            bias = host.kind.bias(host.base_layer)
            plain = base_out if bias is None else base_out - host.kind.out_view(bias, base_out)
        return ((g - 1) * plain + g * low).to(base_out.dtype)

    def add_delta(self, adapter, host, x, out):
        if not lora_deterministic(adapter):
            return out + self.delta(adapter, host, x, out)
        # out = g (W x + s B A x) + b = g (base_out + s B A x) + (1 - g) b: two passes over the output
        g = host.kind.out_view(self.output_scale(adapter, host), out).to(out.dtype)
        bias = host.kind.bias(host.base_layer)
        y = add_lowrank(adapter, host, x, out)
        if bias is None:
            return y * g
        return torch.addcmul(host.kind.out_view((1 - g.reshape(-1)) * bias, out), y, g)

    def delta_weight(self, adapter, host):
        w = host.dense_weight()
        g = self.output_scale(adapter, host)
        merged = g[:, None] * (host.kind.to_out_in(w) + lowrank_weight_out_in(adapter))
        return host.kind.from_out_in(merged, w).to(w.dtype) - w

    def merge(self, adapter, host):
        g = self.output_scale(adapter, host).detach()
        w = host.dense_weight().detach()
        if w.dtype == adapter.lora_A.dtype:
            direction = host.kind.to_out_in(merged_lowrank_weight(adapter, host))
        else:  # a base in another dtype: sum and scale in the factors' dtype, round once when written back
            direction = host.kind.to_out_in(w).to(g.dtype) + lowrank_weight_out_in(adapter).detach()
        return host.kind.from_out_in(direction * g[:, None], w), g

    def deterministic(self, adapter):
        return lora_deterministic(adapter)

    def unmerge(self, adapter, host, g):
        w = host.dense_weight()
        original = host.kind.to_out_in(w) / g[:, None] - lowrank_weight_out_in(adapter).detach()
        return host.kind.from_out_in(original, w)

    def low_rank(self, adapter):
        return lora_factors(adapter)

    def param_groups(self, adapter):
        return {"weights": ["lora_A", "lora_B"], "architecture": ["lora_magnitude"]}

    def peft_keys(self, kind):
        return {**peft_lora_keys(kind), "lora_magnitude_vector": "lora_magnitude"}

    def peft_shape(self, adapter, host, attr):
        if attr == "lora_magnitude" and host.kind.name == "conv2d":
            return (1, adapter.lora_magnitude.shape[0], 1, 1)
        return super().peft_shape(adapter, host, attr)

    def to_peft(self, adapter, host):
        out = super().to_peft(adapter, host)
        out["lora_magnitude_vector"] = out["lora_magnitude_vector"].reshape(
            self.peft_shape(adapter, host, "lora_magnitude"))
        return out

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        return lora_factors_from_tensors(tensors, cfg, module_name)

    def rank_from_shapes(self, shapes):
        return shapes["lora_A"][0] if "lora_A" in shapes else None

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        if base_weight is None:
            raise NotImplementedError("DoRA's ΔW depends on the base weight: pass base_weight")
        A, B, s = lora_factors_from_tensors(tensors, cfg, module_name)
        w = base_weight.float()
        direction = w + s * (B.float() @ A.float())
        m = tensors["lora_magnitude"].reshape(-1).float()
        return (m / direction.norm(dim=1))[:, None] * direction - w
