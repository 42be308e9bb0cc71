"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685), with rsLoRA scaling.

Eq. (3) of the LoRA paper: h = W0 x + ΔW x = W0 x + (α/r)·B A x, with A ∈ R^{r×k}, B ∈ R^{d×r}, B = 0 at init
so training starts from the base model. rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732) replaces α/r by
α/√r so that the update's scale stays stable as r grows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import register
from .base import Method


class LoraAdapter(nn.Module):
    def __init__(self, a_shape: tuple, b_shape: tuple, r: int, lora_alpha: float, scaling: float,
                 dropout: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


def init_factors(adapter: LoraAdapter, init, kind_name: str) -> None:
    """PEFT's initialisations. Embeddings invert the roles (A = 0, B random) as PEFT does."""
    A, B = adapter.lora_A, adapter.lora_B
    with torch.no_grad():
        if kind_name == "embedding":
            if init is False:
                nn.init.normal_(A)
                nn.init.normal_(B)
            else:
                nn.init.zeros_(A)
                nn.init.normal_(B)
            return
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / adapter.r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)


def factor_dtype(host) -> torch.dtype:
    w = host.dense_weight()
    return w.dtype if w.is_floating_point() else torch.float32


def create_lora(host, cfg, r: int, alpha: float) -> LoraAdapter:
    a_shape, b_shape = host.kind.factor_shapes(host.base_layer, r)
    w = host.dense_weight()
    adapter = LoraAdapter(a_shape, b_shape, r, alpha, cfg.scaling(r, alpha), cfg.lora_dropout,
                          factor_dtype(host), w.device)
    init_factors(adapter, cfg.init_lora_weights, host.kind.name)
    return adapter


def lowrank_out(adapter: LoraAdapter, host, x: torch.Tensor) -> torch.Tensor:
    """scale·B(A(dropout(x))) in the host's output layout and in the factors' dtype."""
    if x.is_floating_point():
        x = adapter.lora_dropout(x.to(adapter.lora_A.dtype))
    return host.kind.lowrank(host.base_layer, x, adapter.lora_A, adapter.lora_B) * adapter.scaling


def add_lowrank(adapter: LoraAdapter, host, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out + scale·B A x. For linear kinds one addmm pass over the output instead of scale, cast and add."""
    if not (host.kind.gathered and x.is_floating_point() and x.dtype == out.dtype == adapter.lora_A.dtype
            and isinstance(adapter.lora_dropout, nn.Identity)):
        return out + lowrank_out(adapter, host, x).to(out.dtype)
    xa = x.reshape(-1, x.shape[-1]) @ adapter.lora_A.t()
    return torch.addmm(out.reshape(-1, out.shape[-1]), xa, adapter.lora_B.t(), alpha=adapter.scaling).view(out.shape)


def lora_deterministic(adapter: LoraAdapter) -> bool:
    return isinstance(adapter.lora_dropout, nn.Identity) or not adapter.lora_dropout.training


def merged_lowrank_weight(adapter: LoraAdapter, host) -> torch.Tensor:
    """W + scale·B·A in the base layout, detached, as one fused pass over W."""
    A, B, scale = lora_factors(adapter)
    return host.kind.add_lowrank_weight(host.dense_weight().detach(), A.detach(), B.detach(), scale)


def lowrank_weight_out_in(adapter: LoraAdapter) -> torch.Tensor:
    """scale·B·A in the (out, fan_in) view."""
    A, B, scale = lora_factors(adapter)
    return (B @ A) * scale


def lora_factors(adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) in the (out, fan_in) view: ΔW = scale·B·A."""
    A = adapter.lora_A.reshape(adapter.lora_A.shape[0], -1)
    B = adapter.lora_B.reshape(adapter.lora_B.shape[0], -1)
    return A, B, adapter.scaling


def peft_lora_keys(host) -> dict[str, str]:
    if host.kind.name == "embedding":
        return {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}
    return {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}


@register("lora")
class Lora(Method):
    low_rank_form = True

    def create(self, host, cfg, r, alpha):
        return create_lora(host, cfg, r, alpha)

    def delta(self, adapter, host, x, base_out):
        return lowrank_out(adapter, host, x).to(base_out.dtype)

    def add_delta(self, adapter, host, x, out):
        return add_lowrank(adapter, host, x, out)

    def delta_weight(self, adapter, host):
        w = host.dense_weight()
        return host.kind.from_out_in(lowrank_weight_out_in(adapter), w).to(w.dtype)

    def merge(self, adapter, host):
        return merged_lowrank_weight(adapter, host), None

    def deterministic(self, adapter):
        return lora_deterministic(adapter)

    def low_rank(self, adapter):
        return lora_factors(adapter)

    def peft_keys(self, host):
        return peft_lora_keys(host)
