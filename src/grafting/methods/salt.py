"""SALT: Singular Value Adaptation with Low-Rank Transformation (Elsayed et al., 2025, arXiv:2503.16055).

The base weight's SVD W = U diag(σ) Vᵀ (thin, k = min(out, fan_in) triplets) is frozen. The method (the paper's
Sec. 3; equation numbers not cited, the rule below is the official code's): the top r singular values get a
trainable scale and shift, σ_i ← α_i σ_i + β_i (i ≤ r), and the remaining k − r dimensional singular subspace
gets a LoRA-style low-rank update X Y (X: (k−r) × r_lora, Y: r_lora × (k−r)):
    W' = U · ReLU(Σ') · Vᵀ,    Σ' = diag(α ⊙ σ_top + β) ⊕ (diag(σ_rest) + X Y),
so ΔW = W' − W = U (ReLU(Σ') − diag(σ)) Vᵀ. As in the official code (github.com/BioMedIA-MBZUAI/SALT,
``SALTLinear.get_modified_singular_values`` / ``forward``): the ReLU acts elementwise on the whole k × k matrix
Σ' (so negative off-diagonal entries of X Y are cut as well as negative singular values); Σ' is block-diagonal
(the top block is diagonal, the cross blocks zero); α = 1, β = 0, Y = 0 and X Kaiming-uniform (a = √20,
fan_in, ReLU gain) at init (their SAM2 adapter; the earlier SAM one drew both X and Y ~ N(0, 0.01²)), so
training starts from the base. Their optional penalty (weight ``reg_multiplier``, 0 in their configs) is
Σ_layers ||diag(α ⊙ σ_top + β − σ_top)||_F + ||X Y||_F. Defaults: the official layer's r_lora = 8; the paper's
SAM runs use r = 10% of k (their SAM2 ``ratio_salt = 0.1``) with r_lora = 256. Trainable count per layer:
2r + 2(k − r)·r_lora.

Storage: the file holds only the trained tensors (α, β, X, Y). The frozen SVD is recomputed from the base weight
when the adapter is created or loaded (and by ``delta_weight_from_tensors(base_weight=...)`` for merging from
files), in float32 with each pair (u_i, v_i) sign-fixed so that u_i's largest-magnitude entry is positive:
singular vectors are unique only up to such a sign, and X Y couples different pairs, so the same base gives the
same ΔW wherever the SVD runs (repeated singular values, whose vectors are not unique, remain a limit). The frozen
U, σ, V are adapter buffers as large as the layer's weight (as in the official layer); the forward goes through
them (x → Vᵀx → ReLU(Σ') − diag(σ) → U) and never builds a dense ΔW for linear and Conv1D layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..errors import GraftingError
from ..init_stage import random_init_wanted
from ..registry import register
from .base import Method
from .lora import factor_dtype


@dataclass
class SaltConfig(AdapterConfig):
    """Configuration of a SALT adapter (official names: ``rank`` -> r, ``r_lora``, ``reg_multiplier``).

    r: number of top singular values adapted by scale and shift (at most min(out, fan_in) of each layer).
    r_lora: rank of the low-rank update in the remaining singular subspace. reg_multiplier: weight of the
    official penalty (0: none). init_weights: True (α = 1, β = 0, Y = 0: the adapter starts as the base);
    False also draws Y and β (a non-zero update, for tests). fan_in_fan_out: the targets are Conv1D layers
    (GPT-2), for tools that merge from files.
    """

    peft_type = "SALT"

    r: int = 8
    r_lora: int = 8
    reg_multiplier: float = 0.0
    init_weights: bool = True
    fan_in_fan_out: bool = False

    def check(self, bad) -> None:
        for name in ("r", "r_lora"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "a positive integer", v)
        g = self.reg_multiplier
        if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0:
            raise bad("reg_multiplier", "a number >= 0", g)
        for flag in ("init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "true or false", getattr(self, flag))


def canonical_svd(w_out_in: torch.Tensor):
    """Thin SVD in float32 with a platform-independent sign per singular pair (see the module docstring)."""
    U, S, Vh = torch.linalg.svd(w_out_in.to(torch.float32), full_matrices=False)
    pick = U.abs().argmax(0)
    sign = torch.sign(U.gather(0, pick[None]).squeeze(0))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, S, Vh * sign[:, None]


class SaltAdapter(nn.Module):
    def __init__(self, U, S, Vh, r: int, r_lora: int, dtype):
        super().__init__()
        k = S.shape[0]
        kw = dict(dtype=dtype, device=U.device)
        self.register_buffer("salt_U", U.to(**kw))
        self.register_buffer("salt_S", S.to(**kw))
        self.register_buffer("salt_Vh", Vh.to(**kw))
        self.salt_scale = nn.Parameter(torch.ones(r, **kw))
        self.salt_shift = nn.Parameter(torch.zeros(r, **kw))
        self.salt_X = nn.Parameter(torch.zeros(k - r, r_lora, **kw))
        self.salt_Y = nn.Parameter(torch.zeros(r_lora, k - r, **kw))
        self.r, self.r_lora = r, r_lora

    def extra_repr(self) -> str:
        return f"r={self.r}, r_lora={self.r_lora}, k={self.salt_S.shape[0]}"


def singular_change(scale, shift, X, Y, S):
    """(d_top, M_rest): ReLU(Σ') − diag(σ) as its diagonal top block (r,) and its rest block (k−r, k−r)."""
    r = scale.shape[0]
    top, rest = S[:r], S[r:]
    d_top = F.relu(scale * top + shift) - top
    m_rest = F.relu(torch.diag(rest) + X @ Y) - torch.diag(rest)
    return d_top, m_rest


def salt_delta_out_in(U, S, Vh, scale, shift, X, Y) -> torch.Tensor:
    """ΔW = U (ReLU(Σ') − diag(σ)) Vᵀ in the (out, fan_in) view."""
    r = scale.shape[0]
    d_top, m_rest = singular_change(scale, shift, X, Y, S)
    return (U[:, :r] * d_top) @ Vh[:r] + U[:, r:] @ m_rest @ Vh[r:]


@register("salt", config=SaltConfig)
class Salt(Method):
    """SALT: scale and shift of the top singular values plus a low-rank update of the rest, on a frozen SVD."""

    def create(self, host, cfg, module_name, shared):
        w = host.kind.to_out_in(host.dense_weight().detach())
        k = min(w.shape)
        if cfg.r > k:
            raise GraftingError(f"SALT: r={cfg.r} exceeds the {k} singular values of module '{module_name}'")
        adapter = SaltAdapter(*canonical_svd(w), cfg.r, cfg.r_lora, factor_dtype(host))
        if random_init_wanted():  # loading overwrites every trained tensor
            with torch.no_grad():
                # kaiming_uniform_ with nonlinearity "relu" uses gain √2 (``a`` is read only for leaky_relu)
                nn.init.kaiming_uniform_(adapter.salt_X, a=math.sqrt(20), mode="fan_in", nonlinearity="relu")
                if not cfg.init_weights:
                    adapter.salt_Y.normal_(std=0.5)
                    adapter.salt_shift.normal_(std=0.1)
        return adapter

    def _delta_out_in(self, adapter):
        return salt_delta_out_in(adapter.salt_U, adapter.salt_S, adapter.salt_Vh, adapter.salt_scale,
                                 adapter.salt_shift, adapter.salt_X, adapter.salt_Y)

    def delta(self, adapter, host, x, base_out):
        if not (host.kind.gathered and x.is_floating_point()):
            return super().delta(adapter, host, x, base_out)
        # through the singular basis: x → Vᵀx (k) → ReLU(Σ') − diag(σ) → U, never a dense out × fan_in ΔW
        r = adapter.r
        d_top, m_rest = singular_change(adapter.salt_scale, adapter.salt_shift, adapter.salt_X, adapter.salt_Y,
                                        adapter.salt_S)
        h = F.linear(x.to(adapter.salt_U.dtype), adapter.salt_Vh)
        h = torch.cat([h[..., :r] * d_top, F.linear(h[..., r:], m_rest)], -1)
        return F.linear(h, adapter.salt_U).to(base_out.dtype)

    def delta_weight(self, adapter, host):
        w = host.dense_weight()
        return host.kind.from_out_in(self._delta_out_in(adapter), w).to(w.dtype)

    def deterministic(self, adapter):
        return True

    def regularizer(self, layers, shared, cfg):
        if not cfg.reg_multiplier or not layers:
            return None
        total = 0
        for _, _, a in layers:
            top = a.salt_S[: a.r]
            total = total + torch.linalg.vector_norm(a.salt_scale * top + a.salt_shift - top) \
                + torch.linalg.matrix_norm(a.salt_X @ a.salt_Y)
        return cfg.reg_multiplier * total

    def peft_keys(self, kind):
        return {"salt_scale": "salt_scale", "salt_shift": "salt_shift", "salt_X": "salt_X", "salt_Y": "salt_Y"}

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        if base_weight is None:
            raise GraftingError(f"SALT layer '{module_name}': its ΔW lives in the base weight's singular basis; "
                                "pass base_weight (the file holds only the trained scale, shift and X, Y)")
        U, S, Vh = canonical_svd(base_weight)
        t = {k: tensors[k].float() for k in ("salt_scale", "salt_shift", "salt_X", "salt_Y")}
        if t["salt_scale"].shape[0] + t["salt_X"].shape[0] != S.shape[0]:
            raise GraftingError(f"SALT layer '{module_name}': its tensors fit a weight with "
                                f"{t['salt_scale'].shape[0] + t['salt_X'].shape[0]} singular values, the base "
                                f"weight has {S.shape[0]}")
        return salt_delta_out_in(U, S, Vh, t["salt_scale"], t["salt_shift"], t["salt_X"], t["salt_Y"])

    def rank_from_shapes(self, shapes):
        return shapes["salt_scale"][0] if "salt_scale" in shapes else None
