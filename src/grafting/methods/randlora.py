"""RandLoRA: Full-rank parameter-efficient fine-tuning of large models (Albert et al., 2025, arXiv:2502.00987).

The update (Sec. 3 of the paper) is a sum of n low-rank random terms with trained diagonal scalings,
    ΔW = s · Σ_{j=1..n} B_j Λ_j A Γ_j,     n = ⌈min(out, fan_in) / r⌉,
with A (r × min) shared by every term, B_j (max × r) one random basis per term (A, B_j frozen, shared by every
adapted layer), Λ_j = diag(λ_j) (r) and Γ_j = diag(γ_j) (min) trained. n·r ≥ min(out, fan_in), so ΔW can have
full rank, while a layer trains only n·(r + min) numbers. The trained scalings sit on the smaller side of the
layer (A spans min(out, fan_in)). Paper / peft defaults: r = 32, randlora_alpha = 640 (s = α / r = 20, "typically
20 times the rank"), λ = 0 and γ = 1 / max(n, min) at init, so training starts from the base model.

Everything follows peft's port (peft/tuners/randlora), so adapters move between the libraries unchanged:
- Shared bases: ``torch.Generator().manual_seed(projection_prng_key)``; A of shape (r, 1, min_g) drawn first,
  then the n_g bases B (max_g, 1, r) one after another, each Kaiming-uniform (a = √5) in bfloat16, each tensor
  divided by its own std, then cast to the base weight's dtype; min_g / max_g / n_g come from the largest
  adapted (out, fan_in) shape. (peft draws in bfloat16 wherever accelerate reports bf16 support: CPU and Ampere
  or newer GPUs; on older GPUs it draws float16, so a save_projection=false adapter trained there regenerates
  differently here; files with the bases saved are unaffected.) With ``sparse`` / ``very_sparse`` the bases
  are ternary (-1, 0, 1) from ``torch.rand`` (A then B in one draw each) with P(±1) = 1/6 (sparse) or
  1/(2√min_g) (very sparse), divided by their std (float32). The same key gives the same bases, bit for bit.
- Each layer uses the slices A[:, :, :min] and B[:max, :n, :]; the n·r columns of the flattened B pair with the
  rows of the flattened (r, n, min) tensor λ[k, j]·A[k]·γ[j] in peft's flattening order (a fixed relabelling of
  the i.i.d. random basis columns: statistically the paper's sum, and it must match for adapters to agree).
- On disk: ``randlora_lambda`` (r, n) and ``randlora_gamma`` (n, min) per layer; with ``save_projection`` the
  bases once as ``base_model.randlora_A`` / ``base_model.randlora_B`` (peft also writes a copy of both under
  every layer: read when present, not written), otherwise regenerated from the key on load.

Rank: ΔW = s·B'A' with A' (n·r × fan_in) and B' (out × n·r) the concatenated factors, exactly. The module
declares ``low_rank_form`` with that concatenated rank n·r (≥ min(out, fan_in): not low-rank in the usual
sense): the forward is two thin matmuls x → A'x → B'(A'x), costing n·r·(fan_in + out) per token, and never
builds the dense ΔW (that costs out·fan_in·n·r per call); mixed batches use the gathered kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import GraftingError
from ..init_stage import random_init_wanted
from ..registry import register
from .base import FactorMethod

RANDLORA_BIAS = ("none", "all", "randlora_only")


@dataclass
class RandLoraConfig(AdapterConfig):
    """Configuration of a RandLoRA adapter; field names as peft's ``RandLoraConfig``.

    r: rank of each random basis (fewer trained parameters as r grows: a layer trains n·(r + min) with
    n = ⌈min/r⌉). randlora_alpha: scale numerator, s = randlora_alpha / r. projection_prng_key: seeds the shared
    bases. save_projection: write them into the adapter file. sparse / very_sparse: ternary bases (see the module
    docstring). randlora_dropout: dropout on the layer input. init_weights: λ = 0, γ = 1/max(n, min) (True: the
    adapter starts as the base); False: λ ~ N(0, 1), γ = 1/max(out, fan_in) (a non-zero update, for tests).
    bias: ``none``, ``all`` or ``randlora_only``.
    """

    peft_type = "RANDLORA"

    r: int = 32
    randlora_alpha: float = 640
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def check(self, bad) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise bad("r", "a positive integer", self.r)
        if isinstance(self.randlora_alpha, bool) or not isinstance(self.randlora_alpha, (int, float)) \
                or not self.randlora_alpha > 0:
            raise bad("randlora_alpha", "a positive number (0 makes an adapter that never changes the output)",
                      self.randlora_alpha)
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise bad("projection_prng_key", "an integer", self.projection_prng_key)
        for flag in ("save_projection", "sparse", "very_sparse", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "true or false", getattr(self, flag))
        if isinstance(self.randlora_dropout, bool) or not isinstance(self.randlora_dropout, (int, float)) \
                or not 0.0 <= self.randlora_dropout < 1.0:
            raise bad("randlora_dropout", "a number in [0, 1)", self.randlora_dropout)
        if self.bias not in RANDLORA_BIAS:
            raise bad("bias", f"one of {RANDLORA_BIAS}", self.bias)

    def to_peft_dict(self) -> dict:
        d = super().to_peft_dict()
        if d.get("exclude_modules") is None:  # peft's RandLoraConfig has no such field (it would warn)
            d.pop("exclude_modules", None)
        return d


def num_bases(min_dim: int, r: int) -> int:
    """n = ⌈min / r⌉: enough rank-r terms for a full-rank sum."""
    return -(-min_dim // r)


def _kaiming_bf16(shape: tuple, g: torch.Generator) -> torch.Tensor:
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)


def shared_bases(cfg: RandLoraConfig, max_out: int, max_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, 1, min_g), B (max_g, n_g, r)) for the largest adapted shape, as peft draws them (see docstring)."""
    max_dim, min_dim = max(max_out, max_in), min(max_out, max_in)
    n, r = num_bases(min_dim, cfg.r), cfg.r
    g = torch.Generator(device="cpu").manual_seed(cfg.projection_prng_key)
    if cfg.sparse or cfg.very_sparse:
        sparsity = math.sqrt(min_dim) if cfg.very_sparse else 3
        A_u = torch.rand((r, 1, min_dim), generator=g)
        B_u = torch.rand((max_dim, n, r), generator=g)
        out = []
        for u in (A_u, B_u):
            t = torch.zeros(u.shape)
            t[u < 1 / (2 * sparsity)] = -1
            t[u > 1 - 1 / (2 * sparsity)] = 1
            out.append(t / t.std())
        return out[0], out[1]
    A = _kaiming_bf16((r, 1, min_dim), g)
    B = torch.cat([_kaiming_bf16((max_dim, 1, r), g) for _ in range(n)], dim=1)
    return (A / A.std()).float(), (B / B.std()).float()


def randlora_factors(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, B: torch.Tensor, fan_in: int,
                     out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') in the (out, fan_in) view with ΔW = s·B'A', from λ (r, n), γ (n, min) and the shared bases."""
    r, n = lam.shape
    lo, hi = min(fan_in, out), max(fan_in, out)
    scaled = (lam[:, :, None] * A[:r, :, :lo] * gam[None]).reshape(r * n, lo)  # rows k·n + j
    flat = B[:hi, :n, :r].reshape(hi, n * r)  # columns j·r + k: peft's pairing (module docstring)
    if lo == fan_in:
        return scaled, flat
    return flat.t(), scaled.t()


class RandLoraShared(nn.Module):
    """The frozen random bases of one RandLoRA adapter, shared by all its layers."""

    def __init__(self, cfg: RandLoraConfig, max_out: int, max_in: int, dtype, device):
        super().__init__()
        A, B = shared_bases(cfg, max_out, max_in)
        self.register_buffer("randlora_A", A.to(dtype=dtype, device=device))
        self.register_buffer("randlora_B", B.to(dtype=dtype, device=device))


class RandLoraAdapter(nn.Module):
    def __init__(self, fan_in: int, out: int, cfg: RandLoraConfig, shared: RandLoraShared, dtype, device):
        super().__init__()
        self.fan_in, self.out, self.r = fan_in, out, cfg.r
        lo, n = min(fan_in, out), num_bases(min(fan_in, out), cfg.r)
        self.scaling = cfg.randlora_alpha / cfg.r
        self.randlora_lambda = nn.Parameter(torch.zeros(cfg.r, n, dtype=dtype, device=device))
        self.randlora_gamma = nn.Parameter(torch.full((n, lo), 1.0 / max(fan_in, out), dtype=dtype, device=device))
        self.randlora_dropout = nn.Dropout(cfg.randlora_dropout) if cfg.randlora_dropout > 0 else nn.Identity()
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule: the model owns it

    # peft's per-layer copies of the shared bases read into the shared tensors themselves
    @property
    def randlora_A(self) -> torch.Tensor:
        return self.shared.randlora_A

    @property
    def randlora_B(self) -> torch.Tensor:
        return self.shared.randlora_B

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return randlora_factors(self.randlora_lambda, self.randlora_gamma, self.shared.randlora_A,
                                self.shared.randlora_B, self.fan_in, self.out)

    def extra_repr(self) -> str:
        n = self.randlora_lambda.shape[1]
        return f"r={self.r}, bases={n}, rank={n * self.r}, scaling={self.scaling:g}"


@register("randlora", config=RandLoraConfig)
class RandLora(FactorMethod):
    """RandLoRA: full-rank ΔW = s·Σ_j B_j Λ_j A Γ_j from shared frozen random bases; only diagonals train."""

    layer_kinds = frozenset({"linear", "conv1d"})
    dropout = "randlora_dropout"  # ΔW is exactly s·B'A' with the concatenated rank n·r (module docstring)

    def create_shared(self, cfg, targets):
        sizes = [h.kind.in_out(h.base_layer) for _, h in targets]
        w = targets[0][1].dense_weight()
        dtype = w.dtype if w.is_floating_point() else torch.float32
        return RandLoraShared(cfg, max(s[1] for s in sizes), max(s[0] for s in sizes), dtype, w.device)

    def create(self, host, cfg, module_name, shared):
        fan_in, out = host.kind.in_out(host.base_layer)
        adapter = RandLoraAdapter(fan_in, out, cfg, shared, shared.randlora_A.dtype, shared.randlora_A.device)
        with torch.no_grad():
            if cfg.init_weights:
                adapter.randlora_gamma.fill_(1.0 / max(adapter.randlora_gamma.shape))
            elif random_init_wanted():
                adapter.randlora_lambda.copy_(torch.randn(adapter.randlora_lambda.shape))
        return adapter

    def param_groups(self, adapter):
        return {"weights": ["randlora_lambda", "randlora_gamma"], "architecture": []}

    def peft_keys(self, kind):
        return {"randlora_lambda": "randlora_lambda", "randlora_gamma": "randlora_gamma"}

    def peft_optional_keys(self, kind):
        return {"randlora_A": "randlora_A", "randlora_B": "randlora_B"}

    def shared_keys(self, cfg):
        return {"base_model.randlora_A": "randlora_A", "base_model.randlora_B": "randlora_B"} \
            if cfg.save_projection else {}

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        return None  # which side is the smaller one, and the larger size, are not in the layer's tensors

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        if base_weight is None:
            raise GraftingError(f"RandLoRA layer '{module_name}': its ΔW needs the base weight's shape (which "
                                "side the trained scalings are on, and how much of the shared bases it uses)")
        A = shared.get("randlora_A", tensors.get("randlora_A"))
        B = shared.get("randlora_B", tensors.get("randlora_B"))
        if A is None or B is None:  # their size is the largest adapted layer's, which one layer cannot tell
            raise GraftingError(f"RandLoRA layer '{module_name}': the adapter was saved without its bases "
                                "(save_projection=false); load it onto its model (grafting.load) and save it "
                                "again with save_projection=true")
        out, fan_in = base_weight.shape
        A_f, B_f = randlora_factors(tensors["randlora_lambda"].float(), tensors["randlora_gamma"].float(),
                                    A.float(), B.float(), fan_in, out)
        return (B_f @ A_f) * (cfg.randlora_alpha / cfg.r)

    def rank_from_shapes(self, shapes):
        lam = shapes.get("randlora_lambda")
        return lam[0] * lam[1] if lam is not None and len(lam) == 2 else None
