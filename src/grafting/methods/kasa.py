"""KaSA: Knowledge-Aware Singular-Value Adaptation (Wang et al., ICLR 2025, arXiv:2412.06071).

Two stages (Sec. 3 of the paper):
1. Knowledge-based SVD truncation. W = U Σ Vᵀ; the r smallest singular components ("noisy, long-tail
   knowledge") are dropped: W_world = W − U_r Σ_r V_rᵀ, the rank-(k − r) approximation, k = min(out, in).
2. Knowledge-aware singular-value adaptation. ΔW = ΔU ΔΣ ΔVᵀ with a trainable diagonal ΔΣ = diag(Δσ) between
   LoRA's factors: h = W_world x + s·B diag(Δσ) A x, s = α/r (α/√r with rsLoRA), B = 0 at init.
Training adds (L = L_task + β L2 + γ L3; Eq. 9-11 as peft's port cites them):
   L2 = ||Δσ||²,   L3 = ||BᵀB − I||_F + ||A Aᵀ − I||_F   (summed over layers; :meth:`Kasa.regularizer`).
Paper / reference defaults (peft's ``KasaConfig``): β = 1e-4, γ = 1e-3; Δσ ~ N(0, 1) (B = 0 keeps the update
zero); ranks as LoRA's (r = 8 and up).

Following peft 0.21 (its ``KasaLinearVariant``, the format adapters move in): ``LoraConfig`` plus
``kasa_config: {"beta", "gamma"}`` selects the variant (``flags={"kasa_config": GIVEN}``), the file holds
``lora_A.weight``, ``lora_B.weight`` and ``lora_diag``, and loading re-runs the truncation on the base it is
loaded onto (the SVD is deterministic, so a saved adapter always applies to the *original* base). Linear layers
only, no ``fan_in_fan_out`` (peft refuses both); the SVD runs in float32 on the dense (dequantized) weight.

One deliberate difference: peft writes W_world into the base layer; here the dropped part stays in the adapter
as frozen buffers (U_r Σ_r and V_rᵀ, recomputed, never saved), so the adapter's ΔW relative to the untouched base is
    ΔW = s·(B diag(Δσ)) A − (U_r Σ_r) V_rᵀ = [s·B diag(Δσ), −U_r Σ_r] [A; V_rᵀ]   (rank 2r).
Outputs, merged weights and files are peft's; in addition ``disabled()`` is the true base, a packed/quantized
base is never re-quantized, deleting the adapter leaves the base as it was, and several KaSA
adapters (or KaSA next to others) each see the original base, so mixed batches serve every one correctly (peft
truncates cumulatively and refuses mixing with non-KaSA adapters). The cost: one frozen rank-r product more
per forward. Since the init truncates on purpose, a fresh KaSA adapter changes the output
(``starts_at_base = False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GraftingError
from ..init_stage import random_init_wanted
from ..registry import GIVEN, register
from .base import Method
from .lora import LoraConfig, create_lora, factor_dtype, lora_deterministic

KASA_DEFAULTS = {"beta": 1e-4, "gamma": 1e-3}


@dataclass
class KasaConfig(LoraConfig):
    """A LoRA config with ``kasa_config`` (peft's field): KaSA's SVD truncation of the base and trainable
    singular values between A and B. kasa_config: ``{"beta": β, "gamma": γ}``, the weights of the singular-value
    L2 penalty and of the orthogonality penalty in :meth:`AdaptedModel.regularizer` (missing keys take the
    paper's 1e-4 / 1e-3). Other fields as LoRA's; ``r`` must stay below min(in, out) of every target."""

    kasa_config: dict = field(default_factory=lambda: dict(KASA_DEFAULTS))

    def check(self, bad) -> None:
        super().check(bad)
        kc = self.kasa_config
        if not isinstance(kc, dict):
            raise bad("kasa_config", 'a mapping {"beta": ..., "gamma": ...}', kc)
        for key, value in kc.items():
            if key not in KASA_DEFAULTS:
                raise bad(f"kasa_config[{key!r}]", f"one of the keys {sorted(KASA_DEFAULTS)}", key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise bad(f"kasa_config[{key!r}]", "a number >= 0", value)
        self.kasa_config = {**KASA_DEFAULTS, **kc}
        if self.use_dora:
            raise bad("use_dora", "false with kasa_config (peft has no DoRA + KaSA variant)", self.use_dora)
        if self.fan_in_fan_out:
            raise bad("fan_in_fan_out", "false: KaSA adapts nn.Linear layers only (as peft)", self.fan_in_fan_out)
        if self.init_lora_weights not in (True, False, "gaussian", "kaiming"):
            raise bad("init_lora_weights", "true, false, 'gaussian' or 'kaiming' (KaSA truncates the base itself; "
                      "inits that rewrite it or read activations do not combine with that)", self.init_lora_weights)


def truncated_part(w_out_in: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r Σ_r, V_rᵀ): the r smallest singular components of W (out, fan_in), in float32."""
    U, S, Vh = torch.linalg.svd(w_out_in.detach().to(torch.float32), full_matrices=False)
    keep = S.shape[0] - r
    return U[:, keep:] * S[keep:], Vh[keep:]


def _factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with ΔW = B'A' against the untouched base: [A; V_rᵀ] and [s·B diag(Δσ), −U_r Σ_r]."""
    A = torch.cat([adapter.lora_A, adapter.kasa_vh])
    B = torch.cat([adapter.lora_B * (adapter.lora_diag * adapter.scaling), -adapter.kasa_us], 1)
    return A, B


@register("kasa", config=KasaConfig, flags={"kasa_config": GIVEN})
class Kasa(Method):
    """KaSA: base truncated by its r smallest singular components, update s·B diag(Δσ) A with trained Δσ."""

    layer_kinds = frozenset({"linear"})
    low_rank_form = True
    starts_at_base = False

    def create(self, host, cfg, module_name, shared):
        fan_in, out = host.kind.in_out(host.base_layer)
        r, _ = cfg.rank_and_alpha(module_name)
        if r >= min(fan_in, out):
            raise GraftingError(f"KaSA module '{module_name}': field 'r' (or rank_pattern) must be below "
                                f"min(in, out) = {min(fan_in, out)} so that the truncation keeps part of the "
                                f"base weight, got {r}")
        adapter = create_lora(host, cfg, module_name)
        dtype, device = factor_dtype(host), adapter.lora_A.device
        adapter.lora_diag = nn.Parameter(torch.empty(r, dtype=dtype, device=device))
        if random_init_wanted():
            with torch.no_grad():
                adapter.lora_diag.normal_()
        # frozen and recomputed from the base on every load: not part of the file
        adapter.register_buffer("kasa_us", torch.zeros(out, r, dtype=dtype, device=device), persistent=False)
        adapter.register_buffer("kasa_vh", torch.zeros(r, fan_in, dtype=dtype, device=device), persistent=False)
        return adapter

    def init(self, adapter, host, cfg, activations):
        us, vh = truncated_part(host.kind.to_out_in(host.dense_weight()), adapter.r)
        with torch.no_grad():
            adapter.kasa_us.copy_(us)
            adapter.kasa_vh.copy_(vh)

    def delta(self, adapter, host, x, base_out):
        A, d = adapter.lora_A, adapter.lora_diag
        xin = x.to(A.dtype)
        update = F.linear(F.linear(adapter.lora_dropout(xin), A) * d, adapter.lora_B) * adapter.scaling
        # the truncation belongs to the base: it sees the input without the adapter's dropout
        dropped = F.linear(F.linear(xin, adapter.kasa_vh), adapter.kasa_us)
        return (update - dropped).to(base_out.dtype)

    def add_delta(self, adapter, host, x, out):
        A = adapter.lora_A
        if not (x.dtype == out.dtype == A.dtype and isinstance(adapter.lora_dropout, nn.Identity)):
            return out + self.delta(adapter, host, x, out)
        # two addmm passes over the output instead of building the delta, scaling and adding it
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(out.reshape(-1, out.shape[-1]), (x2 @ A.t()) * adapter.lora_diag, adapter.lora_B.t(),
                        alpha=adapter.scaling)
        return torch.addmm(y, x2 @ adapter.kasa_vh.t(), adapter.kasa_us.t(), alpha=-1).view(out.shape)

    def deterministic(self, adapter):
        return lora_deterministic(adapter)

    def delta_weight(self, adapter, host):
        A, B = _factors(adapter)
        w = host.dense_weight()
        return host.kind.from_out_in(B @ A, w).to(w.dtype)

    def merge(self, adapter, host):
        A, B = _factors(adapter)
        return host.kind.add_lowrank_weight(host.dense_weight().detach(), A.detach(), B.detach(), 1.0), None

    def low_rank(self, adapter):
        A, B = _factors(adapter)
        return A, B, 1.0

    def regularizer(self, layers, shared, cfg):
        beta, gamma = cfg.kasa_config["beta"], cfg.kasa_config["gamma"]
        total = None
        for _, _, adapter in layers:
            d, A, B = adapter.lora_diag.float(), adapter.lora_A.float(), adapter.lora_B.float()
            eye = torch.eye(d.shape[0], dtype=torch.float32, device=d.device)
            term = beta * d.pow(2).sum() + gamma * (torch.linalg.norm(B.t() @ B - eye)
                                                    + torch.linalg.norm(A @ A.t() - eye))
            total = term if total is None else total + term
        return total

    def peft_keys(self, kind):
        return {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_diag": "lora_diag"}

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        return None  # the truncated part comes from the base weight, which the file does not hold

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        if base_weight is None:
            raise NotImplementedError("KaSA's ΔW includes the truncation of the base weight: pass base_weight")
        A, B, d = tensors["lora_A"].float(), tensors["lora_B"].float(), tensors["lora_diag"].reshape(-1).float()
        r = A.shape[0]
        _, alpha = cfg.rank_and_alpha(module_name)
        us, vh = truncated_part(base_weight, r)
        return cfg.scaling(r, alpha) * ((B * d) @ A) - us @ vh

    def rank_from_shapes(self, shapes):
        return shapes["lora_A"][0] if "lora_A" in shapes else None
