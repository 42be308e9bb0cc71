"""SoMA: Singular Value Decomposed Minor Components Adaptation (Yun et al., CVPR 2025, arXiv:2412.04077).

Full title: "... for Domain Generalizable Representation Learning" (Yun, Chae, Lee & Ro); first released as "SoRA".

The pre-trained weight is split by its SVD, W = U S Vᵀ, into the r *minor* singular components and the rest;
only the minor ones are tuned, the residual stays frozen (the paper's form):
    W_res = W − U_[r] S_[r] V_[r]ᵀ,      h = W_res x + s·B A x,      s = α/r,
with, as in the official code (github.com/ysj9909/SoMA, ``rein/peft/sora.py``, init ``"sora"``), the trainable
factors initialised to A₀ = √S'_[r] V_[r]ᵀ and B₀ = U_[r] √S'_[r], S' = S / s, over the last r singular triplets
(the smallest singular values, in the SVD's order as the code takes them), so that s·B₀A₀ = U_[r] S_[r] V_[r]ᵀ and
training starts at the base model. The SVD is the full one, in float32 (the code's randomized ``sora_niter_*``
variant returns the *top* components, so it is not offered).

How it is computed here: the base weight is never written. Since W_res = W − s·B₀A₀, the same function is
    h = W x + ΔW x,      ΔW = s·(B A − B₀A₀) = s·[B, −B₀]·[A; A₀]      (rank 2r),
with A, B trained (initialised to A₀, B₀) and A₀, B₀ kept in the adapter as frozen buffers (``soma_A0``,
``soma_B0``; not saved: the init stage recomputes them from the base weight on every add and load). Outputs and
gradients are the paper's exactly; the forward is two thin matmuls over the concatenated factors (never a dense
ΔW). Dropout (``lora_dropout``) acts on the input of the trained branch s·B A x only, as in the paper, where the
frozen −s·B₀A₀ part belongs to the (undropped) residual base. Keeping the base untouched is what lets adapters
compose: several SoMA / LoRA / other adapters can share a layer and a mixed batch, each seeing the original W;
``disabled()`` is the true base, deleting the adapter is exact, and a quantized or packed base is never
re-quantized (the paper's form would re-quantize W_res). The cost: one frozen rank-r product more per forward.

Paper defaults (DINOv2-L): r = 16, α = r (s = 1); AdamW lr 1e-4, weight decay 0.05 annealed by a cosine to 1e-5
over training (the paper's "annealing weight decay"); the first blocks are frozen entirely (here: choose
targets with ``layers_to_transform``); the official code also trains the adapted layers' biases
(``bias="lora_only"`` here). grafting's default r is 8 (α = 8) so that small layers can host it.

Annealing weight decay: ``Method.on_step`` applies AdamW's decoupled decay to A and B (not to the frozen A₀, B₀)
after every optimizer step, θ ← θ·(1 − γ·λ_t), λ_t = λ_min + (λ_0 − λ_min)·(1 + cos(π t / T))/2
(``soma_weight_decay`` = λ_0, ``soma_weight_decay_min`` = λ_min, ``soma_decay_lr`` = γ, the learning rate AdamW
multiplies the decay by; γ = 0 turns it off). It is self-contained so it works with any optimizer; give the
optimizer itself no weight decay for these parameters, or they decay twice. Unlike AdamW under a learning-rate
schedule, γ is constant.

Saving: by default as a plain LoRA of rank 2r against the original base, lora_A = [A; A₀], lora_B = [B, −B₀],
``lora_alpha`` doubled so that α/r is kept (peft loads it). ``save_adapter(..., export=False)`` (or, as before,
``convert_init=False``) keeps the native form: peft_type ``SOMA`` with the trained A, B only; loading it onto the
original base recomputes A₀, B₀ from that base (so ``AdapterReader`` / merging need the base weight for its ΔW).

How this differs from a LoRA whose init takes the minor components (``init_lora_weights="milora"``, MiLoRA,
arXiv:2406.09044): the split at init is of the same kind (here with the official SoMA scaling S/s), but MiLoRA
writes W_res into the base (a base-changing init, so it cannot join a layer that holds other adapters) while
SoMA keeps W and subtracts the frozen s·B₀A₀ in the adapter; and SoMA is its own method and adapter type whose
training rule includes the annealed weight decay above, which pulls the tuned minor components towards zero.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import GraftingError
from ..registry import register
from .base import Method
from .lora import LoraConfig, create_lora, lora_deterministic, lora_factors_from_tensors, peft_lora_keys


@dataclass
class SomaConfig(LoraConfig):
    """SoMA: LoRA factors on the r minor singular components of each weight, their initial values subtracted.

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
    """(A, B) of the r minor singular components of ``w`` (out, fan_in), in float64: s·B A = U_[r] S_[r] V_[r]ᵀ.
    The SVD runs in float32 (float64 is many times slower on large layers)."""
    U, S, Vh = (t.to(torch.float64) for t in torch.linalg.svd(w.to(torch.float32), full_matrices=False))
    if r > S.shape[0]:
        raise GraftingError(f"SoMA: r={r} exceeds the {S.shape[0]} singular components of a {tuple(w.shape)} "
                            "weight; choose a smaller r")
    root = (S[-r:] / s).sqrt()
    return root[:, None] * Vh[-r:], U[:, -r:] * root


def minor_split(adapter, host) -> None:
    """A₀, B₀ from the r minor singular components of the base weight (left as it is), into the frozen buffers
    and, as the init, into the trained factors."""
    w = host.kind.to_out_in(host.dense_weight().detach())
    A0, B0 = minor_factors(w, adapter.r, adapter.scaling)
    with torch.no_grad():
        for attr, t in (("soma_A0", A0), ("soma_B0", B0), ("lora_A", A0), ("lora_B", B0)):
            target = getattr(adapter, attr)
            target.copy_(t.reshape(target.shape).to(target.dtype))


def _concatenated(adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """[A; A₀] and [B, −B₀] in the adapter's own layout (ΔW = s·B'A'; rows of A / columns of B are the rank)."""
    return (torch.cat([adapter.lora_A, adapter.soma_A0], 0),
            torch.cat([adapter.lora_B, -adapter.soma_B0], 1))


def _factors(adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """[A; A₀] and [B, −B₀] in the (out, fan_in) view."""
    A, B = _concatenated(adapter)
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)


@register("soma", config=SomaConfig)
class Soma(Method):
    """Minor singular components tuned as LoRA factors against the untouched base, with an annealed weight decay."""

    low_rank_form = True
    export_converts_base = True

    def create(self, host, cfg, module_name, shared):
        adapter = create_lora(host, cfg, module_name)
        # the initial factors: frozen, recomputed from the base weight by the init stage on every add and load
        for name, like in (("soma_A0", adapter.lora_A), ("soma_B0", adapter.lora_B)):
            adapter.register_buffer(name, torch.zeros_like(like), persistent=False)
        return adapter

    def init(self, adapter, host, cfg, activations):
        minor_split(adapter, host)

    def on_step(self, layers, shared, cfg, step, total):
        if cfg.soma_decay_lr == 0 or cfg.soma_weight_decay == 0:
            return
        # on_step follows optimizer step number `step` (1-based): its decay is λ at t = step - 1, as AdamW's
        factor = 1.0 - cfg.soma_decay_lr * annealed_weight_decay(cfg, step - 1, total)
        with torch.no_grad():
            for _, _, adapter in layers:
                for p in (adapter.lora_A, adapter.lora_B):  # the trained factors only, never the buffers
                    if p.requires_grad:  # a frozen adapter does not train, so it does not decay either
                        p.mul_(factor)

    def delta(self, adapter, host, x, base_out):
        base, s = host.base_layer, adapter.scaling
        if x.is_floating_point():
            x = x.to(adapter.lora_A.dtype)
        if not x.is_floating_point() or self.deterministic(adapter):
            A, B = _concatenated(adapter)
            return (host.kind.lowrank(base, x, A, B) * s).to(base_out.dtype)
        # dropout acts on the trained branch only: the frozen −s·B₀A₀ is the paper's residual base, undropped
        trained = host.kind.lowrank(base, adapter.lora_dropout(x), adapter.lora_A, adapter.lora_B)
        initial = host.kind.lowrank(base, x, adapter.soma_A0, adapter.soma_B0)
        return ((trained - initial) * s).to(base_out.dtype)

    def add_delta(self, adapter, host, x, out):
        if not (host.kind.gathered and x.is_floating_point() and x.dtype == out.dtype == adapter.lora_A.dtype
                and isinstance(adapter.lora_dropout, nn.Identity)):
            return out + self.delta(adapter, host, x, out)
        # one addmm pass over the output: out + s·([B, −B₀]([A; A₀] x))
        A, B = _factors(adapter)
        xa = x.reshape(-1, x.shape[-1]) @ A.t()
        return torch.addmm(out.reshape(-1, out.shape[-1]), xa, B.t(), alpha=adapter.scaling).view(out.shape)

    def delta_weight(self, adapter, host):
        A, B = _factors(adapter)
        w = host.dense_weight()
        return host.kind.from_out_in((B @ A) * adapter.scaling, w).to(w.dtype)

    def merge(self, adapter, host):
        A, B = _factors(adapter)
        return host.kind.add_lowrank_weight(host.dense_weight().detach(), A.detach(), B.detach(),
                                            adapter.scaling), None

    def deterministic(self, adapter):
        return lora_deterministic(adapter)

    def low_rank(self, adapter):
        A, B = _factors(adapter)
        return A, B, adapter.scaling

    def param_groups(self, adapter):
        return {"weights": ["lora_A", "lora_B"], "architecture": []}

    def peft_keys(self, kind):
        return peft_lora_keys(kind)

    def export_config(self, cfg):
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfig)}
        return LoraConfig(**{**fields, "r": 2 * cfg.r, "lora_alpha": 2 * cfg.lora_alpha,  # keeps α/r
                             "rank_pattern": {k: 2 * v for k, v in cfg.rank_pattern.items()},
                             "alpha_pattern": {k: 2 * v for k, v in cfg.alpha_pattern.items()}})

    def export_tensors(self, now, cfg, module_name):
        return {"lora_A": torch.cat([now["lora_A"], now["soma_A0"]], 0),
                "lora_B": torch.cat([now["lora_B"], -now["soma_B0"]], 1)}

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        return None  # a native file holds A, B only: A₀, B₀ (ΔW's frozen half) come from the base weight

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        if base_weight is None:
            raise GraftingError(f"SoMA layer '{module_name}': its ΔW needs the base weight (the native file holds "
                                "the trained factors; the initial ones are the base's minor components)")
        A, B, s = lora_factors_from_tensors(tensors, cfg, module_name)
        # A₀, B₀ rounded to the factors' dtype, as the adapter's buffers hold them
        A0, B0 = (t.to(A.dtype).double() for t in minor_factors(base_weight, A.shape[0], s))
        return (s * (B.double() @ A.double() - B0 @ A0)).float()

    def rank_from_shapes(self, shapes):
        return shapes["lora_A"][0] if "lora_A" in shapes else None
