"""SoMA: Singular Value Decomposed Minor Components Adaptation (Yun et al., CVPR 2025, arXiv:2412.04077).

Full title: "... for Domain Generalizable Representation Learning" (Yun, Chae, Lee & Ro); first released as "SoRA".

The pre-trained weight is split by its SVD, W = U S Vᵀ, into the r *minor* singular components and the rest;
only the minor ones are tuned, the residual stays frozen:
    W_res = W − U_[r] S_[r] V_[r]ᵀ,      h = W_res x + s·B A x,      s = α/r,
with, as in the official code (github.com/ysj9909/SoMA, ``rein/peft/sora.py``, init ``"sora"``), the trainable
factors A = √S'_[r] V_[r]ᵀ and B = U_[r] √S'_[r], S' = S / s, over the last r singular triplets (the smallest
singular values, in the SVD's order as the code takes them), so that at init W_res + s·B A = W and training
starts at the base model (to rounding). The SVD is the full one (the code's randomized ``sora_niter_*`` variant returns the
*top* components, so it is not offered).
Paper defaults (DINOv2-L): r = 16, α = r (s = 1); AdamW lr 1e-4, weight decay 0.05 annealed by a cosine to 1e-5
over training (the paper's "annealing weight decay"); the first blocks are frozen entirely (here: choose
targets with ``layers_to_transform``); the official code also trains the adapted layers' biases
(``bias="lora_only"`` here). grafting's default r is 8 (α = 8) so that small layers can host it.

Annealing weight decay: ``Method.on_step`` applies AdamW's decoupled decay to A and B after every optimizer
step, θ ← θ·(1 − γ·λ_t), λ_t = λ_min + (λ_0 − λ_min)·(1 + cos(π t / T))/2 (``soma_weight_decay`` = λ_0,
``soma_weight_decay_min`` = λ_min, ``soma_decay_lr`` = γ, the learning rate AdamW multiplies the decay by;
γ = 0 turns it off). It is self-contained so it works with any optimizer; give the optimizer itself no weight
decay for these parameters, or they decay twice. Unlike AdamW under a learning-rate schedule, γ is constant.

How this differs from a LoRA whose init takes the minor components (``init_lora_weights="milora"``, MiLoRA,
arXiv:2406.09044): the split at init is of the same kind (here with the official SoMA scaling S/s), but SoMA is
its own method and adapter type: (1) its training rule includes the annealed weight decay above, which pulls the
tuned minor components towards zero over training; (2) its native form (``save_adapter(..., convert_init=False)``,
peft_type ``SOMA``) holds the trained factors against the residual base, which loading recomputes from the
original base (so ``AdapterReader`` / merging compute its ΔW from the base weight); (3) by default it is saved,
like PiSSA in methods/lora.py, as a plain LoRA of rank 2r against the *original* base,
ΔW = s(BA − B₀A₀) = s[B, −B₀][A; A₀], which peft loads. Deleting the adapter restores the original base.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..errors import GraftingError
from ..registry import register
from .base import Method
from .lora import (LoraConfig, add_lowrank, create_lora, lora_deterministic, lora_factors,
                   lora_factors_from_tensors, lowrank_out, lowrank_weight_out_in, merged_lowrank_weight,
                   peft_lora_keys)


@dataclass
class SomaConfig(LoraConfig):
    """SoMA: LoRA factors on the r minor singular components of each weight, the base the residual.

    r / lora_alpha: rank and scale numerator (s = α/r). soma_weight_decay / soma_weight_decay_min: the annealed
    decay's start and end (0.05 → 1e-5, the paper's). soma_decay_lr: the learning rate the decoupled decay is
    multiplied by (the paper's 1e-4; 0 disables the decay)."""

    peft_type = "SOMA"

    soma_weight_decay: float = 0.05
    soma_weight_decay_min: float = 1e-5
    soma_decay_lr: float = 1e-4

    def check(self, bad) -> None:
        super().check(bad)
        if self.use_dora:
            raise bad("use_dora", "false (SoMA tunes plain low-rank factors)", self.use_dora)
        if self.use_rslora:
            raise bad("use_rslora", "false (SoMA's scale is α/r)", self.use_rslora)
        if self.init_lora_weights is not True:
            raise bad("init_lora_weights", "true (SoMA's init is the minor-component split)",
                      self.init_lora_weights)
        for name in ("soma_weight_decay", "soma_weight_decay_min", "soma_decay_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise bad(name, "a number in [0, 1)", v)
        if self.soma_weight_decay_min > self.soma_weight_decay:
            raise bad("soma_weight_decay_min", f"at most soma_weight_decay ({self.soma_weight_decay})",
                      self.soma_weight_decay_min)


def annealed_weight_decay(cfg: SomaConfig, t: int, total: int) -> float:
    """λ_t: cosine from soma_weight_decay (t = 0) to soma_weight_decay_min (t = total)."""
    frac = min(max(t, 0), total) / max(total, 1)
    lo, hi = cfg.soma_weight_decay_min, cfg.soma_weight_decay
    return lo + (hi - lo) * (1 + math.cos(math.pi * frac)) / 2


def minor_factors(w: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the r minor singular components of ``w`` (out, fan_in): s·B A = U_[r] S_[r] V_[r]ᵀ. The SVD runs
    in float32 (float64 is many times slower on large layers); the residual is formed from the stored factors."""
    U, S, Vh = (t.to(torch.float64) for t in torch.linalg.svd(w.to(torch.float32), full_matrices=False))
    if r > S.shape[0]:
        raise GraftingError(f"SoMA: r={r} exceeds the {S.shape[0]} singular components of a {tuple(w.shape)} "
                            "weight; choose a smaller r")
    root = (S[-r:] / s).sqrt()
    return root[:, None] * Vh[-r:], U[:, -r:] * root


def minor_split(adapter, host) -> None:
    """Factors from the r minor singular components; the base becomes the residual (subtracted in float64)."""
    w0 = host.dense_weight()
    w = host.kind.to_out_in(w0).to(torch.float64)
    r, s = adapter.r, adapter.scaling
    A, B = minor_factors(w, r, s)
    with torch.no_grad():
        adapter.lora_A.copy_(A.reshape(adapter.lora_A.shape))
        adapter.lora_B.copy_(B.reshape(adapter.lora_B.shape))
        # the residual from the factors as stored, so that W_res + s·B A reproduces W to rounding
        a = adapter.lora_A.reshape(r, -1).to(torch.float64)
        b = adapter.lora_B.reshape(-1, r).to(torch.float64)
        host.write_weight(host.kind.from_out_in(w - s * (b @ a), w0).to(w0.dtype))


@register("soma", config=SomaConfig)
class Soma(Method):
    """Minor singular components tuned as LoRA factors (base = residual), with an annealed weight decay."""

    low_rank_form = True

    def create(self, host, cfg, module_name, shared):
        return create_lora(host, cfg, module_name)

    def changes_base(self, cfg):
        return True

    def init(self, adapter, host, cfg, activations):
        minor_split(adapter, host)

    def undo_init(self, initial, adapter, host, cfg):
        w = host.dense_weight()
        A0 = initial["lora_A"].reshape(adapter.r, -1).to(torch.float64)
        B0 = initial["lora_B"].reshape(-1, adapter.r).to(torch.float64)
        restored = host.kind.to_out_in(w).to(torch.float64) + adapter.scaling * (B0 @ A0)
        host.write_weight(host.kind.from_out_in(restored, w).to(w.dtype))

    def to_original_base(self, now, initial, cfg):
        return {"lora_A": torch.cat([now["lora_A"], initial["lora_A"]], 0),
                "lora_B": torch.cat([now["lora_B"], -initial["lora_B"]], 1)}

    def original_base_config(self, cfg):
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfig)}
        return LoraConfig(**{**fields, "r": 2 * cfg.r, "lora_alpha": 2 * cfg.lora_alpha,  # keeps α/r
                             "rank_pattern": {k: 2 * v for k, v in cfg.rank_pattern.items()},
                             "alpha_pattern": {k: 2 * v for k, v in cfg.alpha_pattern.items()}})

    def on_step(self, layers, shared, cfg, step, total):
        if cfg.soma_decay_lr == 0 or cfg.soma_weight_decay == 0:
            return
        # on_step follows optimizer step number `step` (1-based): its decay is λ at t = step - 1, as AdamW's
        factor = 1.0 - cfg.soma_decay_lr * annealed_weight_decay(cfg, step - 1, total)
        with torch.no_grad():
            for _, _, adapter in layers:
                for p in (adapter.lora_A, adapter.lora_B):
                    if p.requires_grad:  # a frozen adapter does not train, so it does not decay either
                        p.mul_(factor)

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

    def peft_keys(self, kind):
        return peft_lora_keys(kind)

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        return None  # the native factors act on the residual base: ΔW against the original needs the base

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        if base_weight is None:
            raise GraftingError(f"SoMA layer '{module_name}': its ΔW against the original base needs the base "
                                "weight (the saved factors replace the base's minor components)")
        A, B, s = lora_factors_from_tensors(tensors, cfg, module_name)
        A0, B0 = minor_factors(base_weight, A.shape[0], s)
        return (s * (B.double() @ A.double() - B0 @ A0)).float()

    def rank_from_shapes(self, shapes):
        return shapes["lora_A"][0] if "lora_A" in shapes else None
