"""NOLA: Compressing LoRA using Linear Combination of Random Basis (Koohpayegani et al., 2024, arXiv:2310.02556).

Sec. 3: LoRA's factors are re-parameterised as linear combinations of frozen random matrices,
    ΔW = s · B A,     A = Σ_{i=1..k} α_i A_i  (r × fan_in),     B = Σ_{j=1..l} β_j B_j  (out × r),
and only the coefficients α (k) and β (l) train: k + l numbers per layer, whatever r and the layer's size. The
bases are regenerated from a seed, so an adapter is its coefficients plus one seed. s = lora_alpha / r as LoRA.
Official defaults (github.com/UCDvision/NOLA, GPT-2 M on E2E: gpt/examples/NLG/scripts): r = 8, k = l = 512,
lora_alpha = 8, lr 5e-3; LLaMA-2 (llama/scripts): r = 16, k = l = 512, lora_alpha = 4.

Where the paper leaves details open, the official code for language models (gpt/src/model_nola.py and
llama/peft/tuners/lora.py, ``NOLALinear``) decides:
- Bases: i.i.d. U(-1, 1) scaled by 1/√k (A_i) and 1/√l (B_j).
- Init: α = β = 0. A also carries a frozen Kaiming-uniform (a = √5) matrix A_0, the ``weight`` of the official
  ``NOLALinear`` the generated combination is added to: A = A_0 + Σ α_i A_i (B's counterpart is zero). So B = 0 and
  the adapter starts as the base (as LoRA), while A = A_0 ≠ 0 gives β a gradient from the first step (with
  A_0 = 0, α = β = 0 would be a stationary point). A_0 is regenerated from the seed like the bases.
- The official code draws a random seed per layer and stores it in the checkpoint. Here one integer ``seed`` in
  the config derives every layer's bases deterministically: the layer's generator is seeded with the first 8 bytes
  (little-endian, top bit cleared) of sha256("<seed>:<module name>"), where the module name is the layer's path in
  the adapted model (as in the adapter's keys, ``base_model.model.<module name>.nola_alpha``); from it A_0
  (r, fan_in), then the k A_i as one (k, r, fan_in) draw, then the l B_j as one (l, out, r) draw, in float32 on the
  CPU. So a layer's bases do not depend on which or how many other layers are adapted, nor on their order; they
  do depend on the module's name, so load an adapter onto a model whose module paths match the ones it was
  trained with. The adapter file holds only ``nola_alpha`` / ``nola_beta``.

Memory: the bases are kept per layer as frozen buffers (k·r·fan_in + l·out·r numbers; not saved) so the forward
is fast; the official code regenerates them on every forward and backward instead (less memory, much more time).
The forward combines A and B (k·r·fan_in + l·out·r multiply-adds) and applies two thin matmuls; it never builds
the dense ΔW. ΔW = s·B A is low rank (rank r): mixed batches use the gathered kernel. A layer's shape is not in its
coefficients, so ΔW from a file alone needs the base weight (``delta_weight_from_tensors``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import GraftingError
from ..init_stage import random_init_wanted
from ..registry import register
from .base import FactorMethod

NOLA_BIAS = ("none", "all", "nola_only")


@dataclass
class NolaConfig(AdapterConfig):
    """Configuration of a NOLA adapter (field names from the official code).

    r: rank of A (r × fan_in) and B (out × r). num_basis_A / num_basis_B: k and l, the numbers of random bases
    (and trained coefficients) for A and B. seed: derives every layer's bases (see the module docstring).
    lora_alpha: scale numerator, s = lora_alpha / r. lora_dropout: dropout on the layer input. init_weights:
    α = β = 0 (True, the official init: the adapter starts as the base); False: α, β ~ N(0, 1) (a non-zero
    update, for tests). bias: ``none``, ``all`` or ``nola_only``.
    """

    peft_type = "NOLA"

    r: int = 8
    num_basis_A: int = 512
    num_basis_B: int = 512
    seed: int = 0
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def check(self, bad) -> None:
        for name in ("r", "num_basis_A", "num_basis_B"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "a positive integer", v)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad("seed", "an integer", self.seed)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not self.lora_alpha > 0:
            raise bad("lora_alpha", "a positive number (0 makes an adapter that never changes the output)",
                      self.lora_alpha)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "a number in [0, 1)", self.lora_dropout)
        for flag in ("fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "true or false", getattr(self, flag))
        if self.bias not in NOLA_BIAS:
            raise bad("bias", f"one of {NOLA_BIAS}", self.bias)


def layer_seed(seed: int, module_name: str) -> int:
    """The seed of one layer's generator: sha256("<seed>:<module name>"), first 8 bytes, top bit cleared."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def nola_bases(cfg: NolaConfig, module_name: str, fan_in: int, out: int):
    """(A_0 (r, fan_in), A bases (k, r, fan_in), B bases (l, out, r)) of one layer, float32 on the CPU."""
    g = torch.Generator(device="cpu").manual_seed(layer_seed(cfg.seed, module_name))
    a0 = nn.init.kaiming_uniform_(torch.empty(cfg.r, fan_in), a=math.sqrt(5), generator=g)
    a = torch.empty(cfg.num_basis_A, cfg.r, fan_in).uniform_(-1.0, 1.0, generator=g) / math.sqrt(cfg.num_basis_A)
    b = torch.empty(cfg.num_basis_B, out, cfg.r).uniform_(-1.0, 1.0, generator=g) / math.sqrt(cfg.num_basis_B)
    return a0, a, b


def combine(alpha, beta, a0, a_bases, b_bases) -> tuple[torch.Tensor, torch.Tensor]:
    """A = A_0 + Σ α_i A_i and B = Σ β_j B_j (the (out, fan_in) view: ΔW = s·B A)."""
    k, r, fan_in = a_bases.shape
    l, out, _ = b_bases.shape
    A = torch.addmm(a0.reshape(1, -1), alpha.reshape(1, k), a_bases.reshape(k, -1))
    B = beta.reshape(1, l) @ b_bases.reshape(l, -1)
    return A.reshape(r, fan_in), B.reshape(out, r)


class NolaAdapter(nn.Module):
    def __init__(self, fan_in: int, out: int, cfg: NolaConfig, module_name: str, dtype, device):
        super().__init__()
        self.r, self.scaling = cfg.r, cfg.lora_alpha / cfg.r
        self.nola_alpha = nn.Parameter(torch.zeros(cfg.num_basis_A, dtype=dtype, device=device))
        self.nola_beta = nn.Parameter(torch.zeros(cfg.num_basis_B, dtype=dtype, device=device))
        a0, a, b = nola_bases(cfg, module_name, fan_in, out)
        # frozen and regenerated from the seed: never written to the adapter file nor to state_dict()
        self.register_buffer("nola_A0", a0.to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("nola_A_bases", a.to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("nola_B_bases", b.to(dtype=dtype, device=device), persistent=False)
        self.lora_dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return combine(self.nola_alpha, self.nola_beta, self.nola_A0, self.nola_A_bases, self.nola_B_bases)

    def extra_repr(self) -> str:
        return (f"r={self.r}, num_basis_A={self.nola_alpha.shape[0]}, num_basis_B={self.nola_beta.shape[0]}, "
                f"scaling={self.scaling:g}")


@register("nola", config=NolaConfig)
class Nola(FactorMethod):
    """NOLA: LoRA's A and B as linear combinations of frozen seeded random bases; only the coefficients train."""

    layer_kinds = frozenset({"linear", "conv1d"})

    def create(self, host, cfg, module_name, shared):
        fan_in, out = host.kind.in_out(host.base_layer)
        w = host.dense_weight()
        adapter = NolaAdapter(fan_in, out, cfg, module_name, w.dtype if w.is_floating_point() else torch.float32,
                              w.device)
        if not cfg.init_weights and random_init_wanted():
            with torch.no_grad():
                adapter.nola_alpha.copy_(torch.randn(adapter.nola_alpha.shape))
                adapter.nola_beta.copy_(torch.randn(adapter.nola_beta.shape))
        return adapter

    def param_groups(self, adapter):
        return {"weights": ["nola_alpha", "nola_beta"], "architecture": []}

    def peft_keys(self, kind):
        return {"nola_alpha": "nola_alpha", "nola_beta": "nola_beta"}

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        return None  # the layer's (out, fan_in), which the bases are drawn at, is not in its coefficients

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        if base_weight is None:
            raise GraftingError(f"NOLA layer '{module_name}': its ΔW needs the base weight's shape (the bases are "
                                "regenerated from the seed at the layer's size)")
        out, fan_in = base_weight.shape
        alpha, beta = tensors["nola_alpha"].float(), tensors["nola_beta"].float()
        if alpha.shape != (cfg.num_basis_A,) or beta.shape != (cfg.num_basis_B,):
            raise GraftingError(f"NOLA layer '{module_name}': coefficients of shapes {tuple(alpha.shape)} / "
                                f"{tuple(beta.shape)}, but the config has num_basis_A={cfg.num_basis_A}, "
                                f"num_basis_B={cfg.num_basis_B}")
        A, B = combine(alpha, beta, *nola_bases(cfg, module_name, fan_in, out))
        return (B @ A) * (cfg.lora_alpha / cfg.r)
