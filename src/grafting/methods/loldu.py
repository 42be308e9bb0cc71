"""LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition (Shi et al., 2024, arXiv:2410.13618).

Sec. 3 of the paper: the pre-trained weight is factored W = P L D U (LU with partial pivoting, the pivots
pulled out of U into the diagonal D, so L and U are unit-triangular); the top-r parts P L_r, D_r, U_r
initialise the adapter, and only the diagonal z (r values, initialised to D_r) and a scalar scaling factor σ
(initialised to α/r) train:
    h = (W_res + σ · P L_r diag(z) U_r) x,      W_res = W − σ₀ · P L_r diag(D_r) U_r,
so the model starts exactly at W, and each layer trains r + 1 parameters (the paper's count; the official
code's ``get_loldu_params`` helper trains z alone, its ``LoLDUParametrization`` holds σ as a parameter too).
Defaults from the official code's ``from_linear``: r = 4, α = 1 (σ₀ = 1/r), z initialised from the pivots
(``init_method="lu"``; the paper's ablation inits ``ones``, ``zeros`` and ``constant`` (the mean of D_r) start
z elsewhere while W_res still removes σ₀·P L_r D_r U_r, as in the official code).

The official code writes W_res into the layer. Here the base stays untouched: the same function is
    h = W x + L' diag(σ z − c₀) U_r x,          L' = P L_r,  c₀ = σ₀ D_r (frozen),
ΔW = L' diag(σ z − c₀) U_r is a rank-r product (mixed batches use the gathered kernel, merges are exact and
reversible), no base write is needed (quantized bases, several adapters on one base), and deleting the adapter
restores nothing. What goes on disk is only the trained vectors, ``vector_z`` (r) and ``scaling_factor`` (one
value) per layer, named as in the official code: L', U_r and c₀ are a deterministic function of the base weight,
recomputed by the init stage when the adapter is loaded (in float64, so pivots do not flip with rounding),
and by ``delta_weight_from_tensors`` from the base weight when merging from files. An adapter therefore applies
to the base it was trained on, exactly as with PiSSA; the saved file is tiny (r + 1 values per layer).
Linear, Conv1D and Conv2d layers, on their (out, fan_in) view (embeddings are left out: the merge tools read
their base weight in another layout than the adapter's view). Not in peft: ``peft_type`` is ``"LOLDU"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import GraftingError
from ..registry import register
from .base import Method

INIT_METHODS = ("lu", "constant", "ones", "zeros")
LOLDU_BIAS = ("none", "all", "loldu_only")


@dataclass
class LolduConfig(AdapterConfig):
    """Configuration of a LoLDU adapter; field names after the official code.

    r: how many LDU components adapt (at most min(out, fan_in)). lora_alpha: σ starts at lora_alpha / r.
    init_method: how z starts: ``lu`` (the pivots D_r: the adapter starts as the base), ``constant`` (their
    mean), ``ones``, ``zeros``. fan_in_fan_out: set for GPT-2 ``Conv1D`` targets (merging from files reads
    the base weight transposed). bias: ``none``, ``all`` or ``loldu_only``.
    """

    peft_type = "LOLDU"

    r: int = 4
    lora_alpha: float = 1.0
    init_method: str = "lu"
    fan_in_fan_out: bool = False
    bias: str = "none"

    def check(self, bad) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise bad("r", "a positive integer", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise bad("lora_alpha", "a positive number", self.lora_alpha)
        if self.init_method not in INIT_METHODS:
            raise bad("init_method", f"one of {INIT_METHODS}", self.init_method)
        if not isinstance(self.fan_in_fan_out, bool):
            raise bad("fan_in_fan_out", "true or false", self.fan_in_fan_out)
        if self.bias not in LOLDU_BIAS:
            raise bad("bias", f"one of {LOLDU_BIAS}", self.bias)


def ldu_factors(w: torch.Tensor, r: int, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P L_r, D_r, U_r) of W = P L D U, in float64: (out, r), (r,), (r, fan_in) with U_r unit upper."""
    P, L, U = torch.linalg.lu(w.to(torch.float64))
    d = U.diagonal()[:r]
    if not bool(torch.isfinite(w).all()) or bool((d == 0).any()):
        raise GraftingError(f"LoLDU layer '{where}': the base weight's LDU decomposition has a zero pivot among "
                            f"its first r = {r} (the weight has rank < r, or holds NaN/inf); lower r")
    return P @ L[:, :r], d, U[:r] / d[:, None]


def initial_z(d: torch.Tensor, init_method: str) -> torch.Tensor:
    if init_method == "lu":
        return d
    if init_method == "constant":
        return torch.full_like(d, float(d.mean()))
    return torch.ones_like(d) if init_method == "ones" else torch.zeros_like(d)


class LolduAdapter(nn.Module):
    def __init__(self, out: int, fan_in: int, r: int, sigma: float, dtype, device):
        super().__init__()
        self.r = r
        self.vector_z = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))
        self.scaling_factor = nn.Parameter(torch.tensor(float(sigma), dtype=dtype, device=device))
        # frozen, recomputed from the base by the init stage (never saved)
        self.register_buffer("loldu_L", torch.zeros(out, r, dtype=dtype, device=device))
        self.register_buffer("loldu_U", torch.zeros(r, fan_in, dtype=dtype, device=device))
        self.register_buffer("loldu_c0", torch.zeros(r, dtype=dtype, device=device))

    def coefficients(self) -> torch.Tensor:
        """σ z − c₀: the diagonal between L' and U_r."""
        return self.scaling_factor * self.vector_z - self.loldu_c0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in the (out, fan_in) view: ΔW = B A."""
        return self.loldu_U, self.loldu_L * self.coefficients()[None, :]

    def extra_repr(self) -> str:
        return f"r={self.r}"


@register("loldu", config=LolduConfig)
class Loldu(Method):
    """LoLDU: W's top-r LDU factors frozen, the diagonal z and a scale σ trained (r + 1 per layer)."""

    layer_kinds = frozenset({"linear", "conv1d", "conv2d"})
    low_rank_form = True

    def create(self, host, cfg, module_name, shared):
        w = host.kind.to_out_in(host.dense_weight())
        out, fan_in = w.shape
        if cfg.r > min(out, fan_in):
            raise GraftingError(f"LoLDU module '{module_name}': field 'r' = {cfg.r} exceeds min(out_features, "
                                f"fan_in) = {min(out, fan_in)} (the LDU factors have that many components)")
        dtype = w.dtype if w.is_floating_point() else torch.float32
        adapter = LolduAdapter(out, fan_in, cfg.r, cfg.lora_alpha / cfg.r, dtype, w.device)
        adapter.module_name = module_name  # for the init stage's errors
        return adapter

    def init(self, adapter, host, cfg, activations):
        L, d, U = ldu_factors(host.kind.to_out_in(host.dense_weight().detach()), cfg.r, adapter.module_name)
        dtype = adapter.vector_z.dtype
        with torch.no_grad():
            adapter.loldu_L.copy_(L)
            adapter.loldu_U.copy_(U)
            adapter.vector_z.copy_(initial_z(d, cfg.init_method))
            adapter.scaling_factor.fill_(cfg.lora_alpha / cfg.r)
            # σ₀·D_r in the adapter's dtype, the same product the forward forms: σ z − c₀ is exactly 0 at "lu"
            adapter.loldu_c0.copy_(adapter.scaling_factor * d.to(dtype))

    def delta(self, adapter, host, x, base_out):
        A, B = adapter.factors()
        shape_a, shape_b = host.kind.factor_shapes(host.base_layer, adapter.r)
        xin = x.to(A.dtype) if x.is_floating_point() else x
        return host.kind.lowrank(host.base_layer, xin, A.reshape(shape_a), B.reshape(shape_b)).to(base_out.dtype)

    def delta_weight(self, adapter, host):
        A, B = adapter.factors()
        w = host.dense_weight()
        return host.kind.from_out_in(B @ A, w).to(w.dtype)

    def deterministic(self, adapter):
        return True

    def low_rank(self, adapter):
        A, B = adapter.factors()
        return A, B, 1.0

    def peft_keys(self, kind):
        return {"vector_z": "vector_z", "scaling_factor": "scaling_factor"}

    def rank_from_shapes(self, shapes):
        return shapes["vector_z"][0] if "vector_z" in shapes else None

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        if base_weight is None:
            raise NotImplementedError(f"LoLDU layer '{module_name}': its factors come from the base weight's LDU "
                                      "decomposition (the file holds only z and σ): pass base_weight")
        z, sigma = tensors["vector_z"].double(), tensors["scaling_factor"].double()
        L, d, U = ldu_factors(base_weight, z.shape[0], module_name)
        coefficients = sigma * z - (cfg.lora_alpha / z.shape[0]) * d
        return ((L * coefficients[None, :]) @ U).float()
