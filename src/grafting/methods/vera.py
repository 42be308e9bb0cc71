"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2024, arXiv:2310.11454).

Eq. (1): h = W0 x + ΔW x = W0 x + Λ_b B Λ_d A x. A (r x fan_in) and B (out x r) are frozen random matrices
shared by every adapted layer (one pair per adapter, sized to the largest layer and sliced to each:
``A[:, :fan_in]``, ``B[:out, :]``); only the scaling vectors d (r, diagonal of Λ_d) and b (out, diagonal of Λ_b)
train, so a layer costs out + r parameters instead of LoRA's r·(fan_in + out). Paper defaults: A and B
Kaiming-uniform, b = 0 and d = d_initial = 0.1 at init (Sec. 3.1-3.2), r up to 256 and beyond (the trained
parameter count grows with r only through d).

Following peft (its official port), the shared matrices come from ``torch.Generator().manual_seed(
projection_prng_key)``, A drawn first, each Kaiming-uniform with gain sqrt(2) over its own fan-in (fan_in for A,
r for B), so the same key gives the same matrices in both libraries; ``save_projection`` writes them into the
adapter (``base_model.vera_A`` / ``base_model.vera_B``), otherwise they are regenerated from the key on load.
ΔW = (b ⊙ B)(d ⊙ A) is low-rank, so mixed batches take the gathered kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig
from ..registry import register
from .base import FactorMethod

VERA_BIAS = ("none", "all", "vera_only")


@dataclass
class VeraConfig(AdapterConfig):
    """Configuration of a VeRA adapter; field names as peft's ``VeraConfig``.

    r: rank of the shared projections. projection_prng_key: seeds them. save_projection: write them into the
    adapter file. vera_dropout: dropout on the layer input. d_initial: initial value of d. init_weights: b = 0
    and d = d_initial (True, the paper's init: the adapter starts as the base); False: b = 1, d ~ N(0, 1) (a
    non-zero update, for tests). bias: ``none``, ``all`` or ``vera_only``.
    """

    peft_type = "VERA"

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def check(self, bad) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise bad("r", "a positive integer", self.r)
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise bad("projection_prng_key", "an integer", self.projection_prng_key)
        for flag in ("save_projection", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "true or false", getattr(self, flag))
        if isinstance(self.vera_dropout, bool) or not isinstance(self.vera_dropout, (int, float)) \
                or not 0.0 <= self.vera_dropout < 1.0:
            raise bad("vera_dropout", "a number in [0, 1)", self.vera_dropout)
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise bad("d_initial", "a number", self.d_initial)
        if self.bias not in VERA_BIAS:
            raise bad("bias", f"one of {VERA_BIAS}", self.bias)


def kaiming_uniform(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt(2), fan = shape[1]) drawn from ``generator``: peft's ``_kaiming_init``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraShared(nn.Module):
    """The frozen projections of one VeRA adapter, shared by all its layers."""

    def __init__(self, r: int, max_in: int, max_out: int, key: int, dtype, device):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(key)
        A = kaiming_uniform((r, max_in), g)
        B = kaiming_uniform((max_out, r), g)
        self.register_buffer("vera_A", A.to(dtype=dtype, device=device))
        self.register_buffer("vera_B", B.to(dtype=dtype, device=device))


class VeraAdapter(nn.Module):
    scaling = 1.0  # Λ_b and Λ_d carry the scale

    def __init__(self, fan_in: int, out: int, r: int, shared: VeraShared, dropout: float, dtype, device):
        super().__init__()
        self.fan_in, self.r = fan_in, r
        self.vera_lambda_b = nn.Parameter(torch.ones(out, dtype=dtype, device=device))
        self.vera_lambda_d = nn.Parameter(torch.randn(r, device=device).to(dtype))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule: the model owns it

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(d ⊙ A, b ⊙ B) sliced to this layer: ΔW = B' A' in the (out, fan_in) view."""
        A = self.shared.vera_A[: self.r, : self.fan_in]
        B = self.shared.vera_B[: self.vera_lambda_b.shape[0], : self.r]
        return self.vera_lambda_d[:, None] * A, self.vera_lambda_b[:, None] * B


@register("vera", config=VeraConfig)
class Vera(FactorMethod):
    """VeRA: frozen random projections shared by all layers, trained scaling vectors Λ_b B Λ_d A."""

    layer_kinds = frozenset({"linear", "conv1d"})
    dropout = "vera_dropout"

    def create_shared(self, cfg, targets):
        sizes = [h.kind.in_out(h.base_layer) for _, h in targets]
        w = targets[0][1].dense_weight()
        dtype = w.dtype if w.is_floating_point() else torch.float32
        return VeraShared(cfg.r, max(s[0] for s in sizes), max(s[1] for s in sizes), cfg.projection_prng_key,
                          dtype, w.device)

    def create(self, host, cfg, module_name, shared):
        fan_in, out = host.kind.in_out(host.base_layer)
        adapter = VeraAdapter(fan_in, out, cfg.r, shared, cfg.vera_dropout, shared.vera_A.dtype,
                              shared.vera_A.device)
        if cfg.init_weights:
            with torch.no_grad():
                adapter.vera_lambda_b.zero_()
                adapter.vera_lambda_d.fill_(cfg.d_initial)
        return adapter

    def peft_keys(self, kind):
        return {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}

    def shared_keys(self, cfg):
        return {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"} if cfg.save_projection else {}

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        return None  # the layer's fan_in (how much of the shared A it uses) is not in its own tensors

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        from ..errors import GraftingError
        if base_weight is None:
            raise GraftingError(f"VeRA layer '{module_name}': its ΔW needs the base weight's shape (how much of "
                                "the shared projection it uses)")
        if "vera_A" not in shared:  # their size is the largest adapted layer's, which one layer cannot tell
            raise GraftingError(f"VeRA layer '{module_name}': the adapter was saved without its projections "
                                "(save_projection=false); load it onto its model (grafting.load) and save it "
                                "again with save_projection=true")
        out, fan_in = base_weight.shape
        d, b = tensors["vera_lambda_d"].float(), tensors["vera_lambda_b"].float()
        r = d.shape[0]
        return (b[:, None] * shared["vera_B"][:out, :r].float()) @ (d[:, None] * shared["vera_A"][:r, :fan_in].float())

    def rank_from_shapes(self, shapes):
        return shapes["vera_lambda_d"][0] if "vera_lambda_d" in shapes else None
