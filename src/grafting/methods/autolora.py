"""AutoLoRA: LoRA ranks chosen by bi-level optimization (Zhang, Zhang & Xie, 2024, arXiv:2403.09113).

Eq. (1): each layer's update is a weighted sum of rank-1 terms, ΔW = Σ_j α_j B_{:,j} A_{j,:}, with selection
weights α_j ∈ [0, 1], Σ_j α_j = 1 (Sec. 3.2). As in the official code, α = softmax(rank_logits) per layer.
Here the sum is scaled by LoRA's s·r, ΔW = s·r·B diag(α) A, so that uniform weights (the init, α_j = 1/r)
give exactly plain LoRA and the same learning rates apply; the ranking of components is unchanged.

Bi-level (Sec. 3.3, eq. 2-3): A and B train on the training split; the logits on the validation split through
the hypergradient. Ranks (Sec. 3.4): a component is kept when its weight α_j >= 1/r (``rank_threshold``,
default 1/r); at least the largest always is. The recipe (grafting.recipes.autolora) then retrains a plain LoRA
at the found ranks (a ``rank_pattern``) on train + validation, as the paper does.

Saved (``save_adapter``) as plain LoRA with s·r·α folded into B: peft loads it and gets the same outputs.
``save_adapter(..., export=False)`` keeps the logits (grafting's own ``peft_type: AUTOLORA``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..registry import register
from .base import Method
from .lora import LoraConfig, create_lora, lora_deterministic, peft_lora_keys

_INITS = (True, False, "gaussian", "kaiming")


@dataclass
class AutoLoraConfig(LoraConfig):
    """LoRA with per-layer rank-selection weights (architecture parameters, trained on validation data).

    rank_threshold: keep components whose selection weight is >= this (default 1/r, the paper's rule)."""

    peft_type = "AUTOLORA"

    rank_threshold: float | None = None

    def check(self, bad) -> None:
        super().check(bad)
        if self.use_dora:
            raise bad("use_dora", "false (AutoLoRA selects LoRA ranks; use method bidora for DoRA)", self.use_dora)
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in ("gaussian", "kaiming")):
            raise bad("init_lora_weights", f"one of {_INITS}", init)
        t = self.rank_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1):
            raise bad("rank_threshold", "a number in (0, 1)", t)


def selection_weights(adapter: nn.Module) -> torch.Tensor:
    """α = softmax(rank_logits): one weight per rank-1 component, summing to 1."""
    return torch.softmax(adapter.rank_logits, dim=0)


def gated_b(B: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """B with column j scaled by r·α_j: ΔW = s·gated_b·A (uniform weights give B itself)."""
    alpha = torch.softmax(logits.float(), dim=0)
    return B * (alpha * alpha.shape[0]).to(B.dtype)


def _gated_b(adapter: nn.Module) -> torch.Tensor:
    return gated_b(adapter.lora_B, adapter.rank_logits)


def kept_components(adapter: nn.Module, threshold: float | None = None) -> list[int]:
    """Indices of the components the paper's rule keeps (α_j >= threshold, default 1/r), largest first."""
    alpha = selection_weights(adapter).detach()
    t = 1.0 / alpha.shape[0] if threshold is None else threshold
    order = torch.argsort(alpha, descending=True).tolist()
    kept = [j for j in order if alpha[j] >= t]
    return kept or order[:1]


@register("autolora", config=AutoLoraConfig)
class AutoLora(Method):
    """LoRA as a weighted sum of rank-1 terms; selection weights tuned on validation data pick each layer's rank."""

    low_rank_form = True
    layer_kinds = frozenset({"linear", "conv1d"})

    def create(self, host, cfg, module_name, shared):
        adapter = create_lora(host, cfg, module_name)
        adapter.rank_logits = nn.Parameter(torch.zeros(adapter.r, dtype=adapter.lora_A.dtype,
                                                       device=adapter.lora_A.device))
        return adapter

    def delta(self, adapter, host, x, base_out):
        xin = adapter.lora_dropout(x.to(adapter.lora_A.dtype))
        low = host.kind.lowrank(host.base_layer, xin, adapter.lora_A, _gated_b(adapter))
        return (low * adapter.scaling).to(base_out.dtype)

    def deterministic(self, adapter):
        return lora_deterministic(adapter)

    def low_rank(self, adapter):
        return adapter.lora_A, _gated_b(adapter), adapter.scaling

    def delta_weight(self, adapter, host):
        w = host.dense_weight()
        dw = (_gated_b(adapter) @ adapter.lora_A) * adapter.scaling
        return host.kind.from_out_in(dw, w).to(w.dtype)

    def param_groups(self, adapter):
        return {"weights": ["lora_A", "lora_B"], "architecture": ["rank_logits"]}

    def peft_keys(self, kind):
        return {**peft_lora_keys(kind), "rank_logits": "rank_logits"}

    def export_config(self, cfg):
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfig)}
        return LoraConfig(**{**fields, "use_dora": False})

    def export_tensors(self, now, cfg, module_name):
        return {"lora_A": now["lora_A"], "lora_B": gated_b(now["lora_B"], now["rank_logits"].reshape(-1))}

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        _, alpha = cfg.rank_and_alpha(module_name)
        A = tensors["lora_A"]
        r = A.shape[0]
        B = gated_b(tensors["lora_B"], tensors["rank_logits"].reshape(-1))
        return A, B, cfg.scaling(r, alpha)

    def rank_from_shapes(self, shapes):
        return shapes["lora_A"][0] if "lora_A" in shapes else None
