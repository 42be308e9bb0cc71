"""SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation (Cao, 2024, arXiv:2409.00055).

The base weight's SVD W = U diag(S) Vᵀ splits it into a trainable principal part and a frozen residual:
    W = W_res + s · U_p diag(S_p) V_pᵀ,        W_res = W − s · U_p,0 diag(S_p,0) V_p,0ᵀ,
with U_p, S_p, V_p the top-r singular triplets at init, all three trained, and an orthonormal regularizer on the
singular vectors
    J = ||U_pᵀU_p − I||_F + ||V_pᵀV_p − I||_F     (Frobenius norms, not squared: the official ``calc_ortho``).
Equation numbers are not cited: only the abstract and the official code were available when this was written.
Following the official code (github.com/Gunale0926/SORSA, sorsalib): ``sorsa_A`` = V_pᵀ (r × fan_in),
``sorsa_S`` = S_p, ``sorsa_B`` = U_p (out × r); s = alpha / r, or 1 when ``alpha`` is None (their default; S_p is
*not* divided by s, so with s ≠ 1 the trained part starts at s·U S Vᵀ and the residual absorbs the difference);
dropout acts on the adapter branch's input only. The penalty is averaged over the regularized matrices (two per
layer) and its gradient is scaled by γ / lr: γ is "the learning rate of the regularizer" (paper and README, 4e-4
in their runs; lr the optimizer's peak learning rate), so one SGD step moves U_p, V_p by γ·∇J whatever lr is.
This penalty hook cannot see the optimizer, so the loss term is (γ / learning_rate)·mean J when
``learning_rate`` is given (the official weighting) and γ·mean J otherwise. Official settings (Llama 2 7B
script): r = 128 (library default 4), alpha None, dropout 0, γ = 4e-4, lr 3e-5 (penalty weight ≈ 13.3); the
official trainer adds the penalty's gradient after gradient clipping, grafting's trainer before it.

Two equivalent placements of the frozen part (same outputs, same gradients):
- default: the base stays the original W and the adapter keeps the initial triplets as frozen buffers
  (``sorsa_A0/S0/B0``): ΔW = s (B diag(S) A − B0 diag(S0) A0), a rank-2r low-rank update [B, −B0][S A; S0 A0].
  Disabling the adapter gives the original model, several adapters can share a layer, merges are exact.
- ``residual_base=True`` (the paper's and official code's form, like PiSSA): the init writes W_res into the base
  and the forward adds only the rank-r part (other adapters and disabled rows of that layer then see W_res, as
  with PiSSA). Saving writes the default form (the buffers hold the initial
  triplets, so it applies to the original base: config ``residual_base`` false); deleting the adapter restores W.
The file is grafting's own ``SORSA`` type (peft has none): trained and initial triplets per layer, so ΔW is known
from the file alone (``factors_from_tensors``, rank 2r) and merging or serving from disk needs no SVD.
"""

from __future__ import annotations

import dataclasses
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

_TRAINED = ("sorsa_A", "sorsa_S", "sorsa_B")
_INITIAL = ("sorsa_A0", "sorsa_S0", "sorsa_B0")


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


@dataclass
class SorsaConfig(AdapterConfig):
    """Configuration of a SORSA adapter (field names as the official ``SORSAConfig`` / trainer arguments).

    r: rank of the trained principal part. alpha: scale numerator (s = alpha / r); None: s = 1 (official
    default). dropout: dropout on the adapter branch's input. gamma: the orthonormal regularizer's learning
    rate γ. learning_rate: the optimizer's peak learning rate; given, the penalty weight is γ / learning_rate
    (the official trainer), otherwise γ. residual_base: write W_res into the base (the paper's placement) instead
    of keeping the initial triplets in the adapter. fan_in_fan_out: the targets are Conv1D layers (GPT-2), for
    tools that merge from files.
    """

    peft_type = "SORSA"

    r: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    gamma: float = 4e-4
    learning_rate: float | None = None
    residual_base: bool = False
    fan_in_fan_out: bool = False

    def check(self, bad) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise bad("r", "a positive integer", self.r)
        if self.alpha is not None and (not _number(self.alpha) or self.alpha <= 0):
            raise bad("alpha", "a positive number or null (scale 1)", self.alpha)
        if not _number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "a number in [0, 1)", self.dropout)
        if not _number(self.gamma) or self.gamma < 0:
            raise bad("gamma", "a number >= 0 (0: no orthonormal regularizer)", self.gamma)
        if self.learning_rate is not None and (not _number(self.learning_rate) or self.learning_rate <= 0):
            raise bad("learning_rate", "a positive number or null", self.learning_rate)
        for flag in ("residual_base", "fan_in_fan_out"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "true or false", getattr(self, flag))

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r

    @property
    def reg_weight(self) -> float:
        return self.gamma / self.learning_rate if self.learning_rate else self.gamma


class SorsaAdapter(nn.Module):
    def __init__(self, fan_in: int, out: int, r: int, scaling: float, dropout: float, residual: bool, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.sorsa_A = nn.Parameter(torch.zeros(r, fan_in, **kw))
        self.sorsa_S = nn.Parameter(torch.zeros(r, **kw))
        self.sorsa_B = nn.Parameter(torch.zeros(out, r, **kw))
        self.register_buffer("sorsa_A0", torch.zeros(r, fan_in, **kw))
        self.register_buffer("sorsa_S0", torch.zeros(r, **kw))
        self.register_buffer("sorsa_B0", torch.zeros(out, r, **kw))
        self.r, self.scaling, self.residual = r, scaling, residual
        self.sorsa_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, residual_base={self.residual}"


def principal_triplets(w_out_in: torch.Tensor, r: int):
    """(V_pᵀ, S_p, U_p) of the top r singular triplets, computed in float32 (the official code's A, S, B)."""
    U, S, Vh = torch.linalg.svd(w_out_in.to(torch.float32), full_matrices=False)
    return Vh[:r], S[:r], U[:, :r]


def _factors(A, S, B, A0, S0, B0, residual: bool):
    """(A', B') with ΔW = s·B' A' against the host's base (the residual one when ``residual``)."""
    if residual:
        return S[:, None] * A, B
    return torch.cat([S[:, None] * A, S0[:, None] * A0], 0), torch.cat([B, -B0], 1)


def orthonormal_penalty(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||A Aᵀ − I||_F + ||BᵀB − I||_F (A = V_pᵀ, B = U_p): the paper's J for one layer."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(A @ A.t() - eye) + torch.linalg.matrix_norm(B.t() @ B - eye)


@register("sorsa", config=SorsaConfig)
class Sorsa(Method):
    """SORSA: trained principal singular triplets U_p diag(S_p) V_pᵀ with an orthonormal regularizer."""

    layer_kinds = frozenset({"linear", "conv1d"})
    low_rank_form = True

    def create(self, host, cfg, module_name, shared):
        fan_in, out = host.kind.in_out(host.base_layer)
        if cfg.r > min(fan_in, out):
            raise GraftingError(f"SORSA: r={cfg.r} exceeds the rank bound min({out}, {fan_in}) of module "
                                f"'{module_name}'")
        w = host.dense_weight()
        adapter = SorsaAdapter(fan_in, out, cfg.r, cfg.scaling, cfg.dropout, cfg.residual_base,
                               factor_dtype(host), w.device)
        # loading fills every tensor from the file; only the residual placement needs the SVD to rewrite the base
        if random_init_wanted() or cfg.residual_base:
            A, S, B = principal_triplets(host.kind.to_out_in(w.detach()), cfg.r)
            with torch.no_grad():
                for attrs in (_TRAINED, _INITIAL):
                    for attr, t in zip(attrs, (A, S, B)):
                        getattr(adapter, attr).copy_(t)
        return adapter

    def changes_base(self, cfg):
        return cfg.residual_base

    def _rewrite_base(self, host, A0, S0, B0, scaling, sign: float) -> None:
        w = host.dense_weight()
        principal = scaling * ((B0.float() * S0.float()) @ A0.float())
        host.write_weight(host.kind.from_out_in(host.kind.to_out_in(w).float() + sign * principal, w))

    def init(self, adapter, host, cfg, activations):
        if cfg.residual_base:
            self._rewrite_base(host, adapter.sorsa_A0, adapter.sorsa_S0, adapter.sorsa_B0, adapter.scaling, -1.0)

    def undo_init(self, initial, adapter, host, cfg):
        self._rewrite_base(host, initial["sorsa_A0"], initial["sorsa_S0"], initial["sorsa_B0"], adapter.scaling, 1.0)

    def to_original_base(self, now, initial, cfg):
        # the buffers keep the initial triplets: the default placement's tensors already apply to the original base
        return {**now, **{k: initial[k] for k in _INITIAL}}

    def original_base_config(self, cfg):
        return dataclasses.replace(cfg, residual_base=False)

    def low_rank(self, adapter):
        A, B = _factors(adapter.sorsa_A, adapter.sorsa_S, adapter.sorsa_B, adapter.sorsa_A0, adapter.sorsa_S0,
                        adapter.sorsa_B0, adapter.residual)
        return A, B, adapter.scaling

    def deterministic(self, adapter):
        return isinstance(adapter.sorsa_dropout, nn.Identity) or not adapter.sorsa_dropout.training

    def delta(self, adapter, host, x, base_out):
        x = x.to(adapter.sorsa_A.dtype)
        if self.deterministic(adapter) or adapter.residual:
            A, B, s = self.low_rank(adapter)
            return (F.linear(F.linear(adapter.sorsa_dropout(x), A), B) * s).to(base_out.dtype)
        # dropout acts on the trained branch only: the frozen initial part is the residual base's, undropped
        trained = F.linear(F.linear(adapter.sorsa_dropout(x), adapter.sorsa_S[:, None] * adapter.sorsa_A),
                           adapter.sorsa_B)
        initial = F.linear(F.linear(x, adapter.sorsa_S0[:, None] * adapter.sorsa_A0), adapter.sorsa_B0)
        return ((trained - initial) * adapter.scaling).to(base_out.dtype)

    def delta_weight(self, adapter, host):
        A, B, s = self.low_rank(adapter)
        w = host.dense_weight()
        return host.kind.from_out_in((B @ A) * s, w).to(w.dtype)

    def regularizer(self, layers, shared, cfg):
        if not cfg.reg_weight or not layers:
            return None
        total = sum(orthonormal_penalty(a.sorsa_A, a.sorsa_B) for _, _, a in layers)
        return cfg.reg_weight * total / (2 * len(layers))  # the official mean over regularized matrices

    def param_groups(self, adapter):
        return {"weights": list(_TRAINED), "architecture": []}

    def peft_keys(self, kind):
        return {k: k for k in _TRAINED + _INITIAL}

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        # a file always applies to the original base (a residual-placement save converts unless told not to,
        # and then the initial triplets are still in it): ΔW against W is the rank-2r form
        t = {k: tensors[k].float() for k in _TRAINED + _INITIAL}
        A, B = _factors(*(t[k] for k in _TRAINED + _INITIAL), residual=False)
        return A, B, cfg.scaling

    def rank_from_shapes(self, shapes):
        return shapes["sorsa_A"][0] if "sorsa_A" in shapes else None
