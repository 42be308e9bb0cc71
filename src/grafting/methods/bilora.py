"""BiLoRA: an SVD-form LoRA whose singular values train on a separate split (Qiang et al., 2024, arXiv:2403.13037).

Sec. 3 (eq. 1): ΔW = P Λ Q with P ∈ R^{d×r}, Q ∈ R^{r×k}, Λ = diag(λ); here scaled like LoRA,
ΔW = s · P diag(λ) Q, stored as lora_B = P, lora_A = Q, lora_E = λ (AdaLoRA's names; arXiv:2303.10512, which
BiLoRA builds on). Eq. (2): R = ||PᵀP − I||²_F + ||QQᵀ − I||²_F keeps P and Q near-orthogonal, added to the
training loss with weight ``orth_reg_weight`` (γ; averaged over layers). Bi-level (eq. 3-4): P and Q train on
the training split with the penalty, λ on the validation split through the hypergradient.

Init: P and Q are random orthonormal (so R starts at 0) and λ = 0, so training starts from the base model
(AdaLoRA's choice of λ = 0 with random P, Q; the official code follows it). ``init_lora_weights=False`` draws
λ as well (an adapter that changes the output from the start, for tests).

Saved (``save_adapter``) as plain LoRA with λ folded in (lora_B = P, lora_A = diag(λ) Q, same r and
lora_alpha): peft loads it and gets the same outputs. ``export=False`` keeps λ (``peft_type: BILORA``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..init_stage import random_init_wanted
from ..registry import register
from .base import Method
from .lora import LoraConfig, create_lora, lora_deterministic, peft_lora_keys


@dataclass
class BiLoraConfig(LoraConfig):
    """SVD-form LoRA: P diag(λ) Q; P, Q are weights, λ the architecture (trained on validation data).

    orth_reg_weight: γ, the weight of the orthogonality penalty on P and Q (paper and AdaLoRA: 0.1)."""

    peft_type = "BILORA"

    orth_reg_weight: float = 0.1

    def check(self, bad) -> None:
        super().check(bad)
        if self.use_dora:
            raise bad("use_dora", "false (use method bidora for DoRA)", self.use_dora)
        if not isinstance(self.init_lora_weights, bool):
            raise bad("init_lora_weights", "true (λ = 0) or false (random λ)", self.init_lora_weights)
        g = self.orth_reg_weight
        if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0:
            raise bad("orth_reg_weight", "a number >= 0", g)


def _orthonormal(rows: int, cols: int, dtype, device) -> torch.Tensor:
    """A random (rows, cols) matrix with orthonormal rows (rows <= cols) or columns."""
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), dtype=torch.float32))
    q = q if rows >= cols else q.t()
    return q.to(dtype=dtype, device=device)


def orthogonality_penalty(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Eq. (2): ||PᵀP − I||²_F + ||QQᵀ − I||²_F."""
    eye = torch.eye(P.shape[1], dtype=P.dtype, device=P.device)
    return (P.t() @ P - eye).pow(2).sum() + (Q @ Q.t() - eye).pow(2).sum()


@register("bilora", config=BiLoraConfig)
class BiLora(Method):
    """SVD-form LoRA P diag(λ) Q with an orthogonality penalty; λ tuned on validation data."""

    low_rank_form = True
    layer_kinds = frozenset({"linear", "conv1d"})

    def create(self, host, cfg, module_name, shared):
        adapter = create_lora(host, cfg, module_name)
        A, B = adapter.lora_A, adapter.lora_B
        fresh = random_init_wanted()  # not when the factors are about to be read from a file
        if fresh:
            with torch.no_grad():
                A.copy_(_orthonormal(*A.shape, A.dtype, A.device))
                B.copy_(_orthonormal(*B.shape, B.dtype, B.device))
        lam = torch.zeros(adapter.r, dtype=A.dtype, device=A.device)
        if fresh and cfg.init_lora_weights is False:
            lam.normal_()
        adapter.lora_E = nn.Parameter(lam)
        return adapter

    def _a(self, adapter):
        return adapter.lora_E[:, None] * adapter.lora_A

    def delta(self, adapter, host, x, base_out):
        xin = adapter.lora_dropout(x.to(adapter.lora_A.dtype))
        return (host.kind.lowrank(host.base_layer, xin, self._a(adapter), adapter.lora_B)
                * adapter.scaling).to(base_out.dtype)

    def deterministic(self, adapter):
        return lora_deterministic(adapter)

    def low_rank(self, adapter):
        return self._a(adapter), adapter.lora_B, adapter.scaling

    def delta_weight(self, adapter, host):
        w = host.dense_weight()
        return host.kind.from_out_in((adapter.lora_B @ self._a(adapter)) * adapter.scaling, w).to(w.dtype)

    def regularizer(self, layers, shared, cfg):
        if not cfg.orth_reg_weight or not layers:
            return None
        total = sum(orthogonality_penalty(a.lora_B, a.lora_A) for _, _, a in layers)
        return cfg.orth_reg_weight * total / len(layers)

    def param_groups(self, adapter):
        return {"weights": ["lora_A", "lora_B"], "architecture": ["lora_E"]}

    def peft_keys(self, kind):
        return {**peft_lora_keys(kind), "lora_E": "lora_E"}

    def export_config(self, cfg):
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfig)}
        return LoraConfig(**{**fields, "use_dora": False, "init_lora_weights": True})

    def export_tensors(self, now, cfg, module_name):
        return {"lora_A": now["lora_E"].reshape(-1, 1) * now["lora_A"], "lora_B": now["lora_B"]}

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        _, alpha = cfg.rank_and_alpha(module_name)
        A = tensors["lora_E"].reshape(-1, 1) * tensors["lora_A"]
        return A, tensors["lora_B"], cfg.scaling(A.shape[0], alpha)

    def rank_from_shapes(self, shapes):
        return shapes["lora_A"][0] if "lora_A" in shapes else None
