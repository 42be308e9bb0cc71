"""MiSS: Matrix Shard Sharing, first published as Bone: Block-Affine Adaptation (Kang, 2024, arXiv:2409.15371).

One trainable block is shared by every shard of the weight. In the (out, fan_in) view, with D the block:
- balance (``init_weights=True``, MiSS's default): D ∈ R^{r×out} and ΔW[o, j] = D[j mod r, o], i.e. fan_in
  is cut into shards of r columns and each shard gets Dᵀ added (the last shard of a fan_in not divisible by r
  gets the first columns of Dᵀ). Forward: ΔW x = Dᵀ · Σ_shards x_shard (sum the r-wide shards of the input,
  then one r × out matmul), never a dense ΔW. ΔW = Dᵀ·S with S ∈ {0,1}^{r×fan_in} the shard-sum matrix, so it
  is low-rank (rank ≤ r) and mixed batches use the gathered kernel. r·out parameters per layer.
- mini (``init_weights="mini"``): D ∈ R^{r×mini_r} tiled along the outputs (out divisible by mini_r),
  ΔW[o, j] = D[j mod r, o mod mini_r]; r·mini_r parameters. ``mini_r = out`` is the balance form.
- bat (``init_weights="bat"``, Bone's block-affine transformation, the paper's W-dependent update): W is cut
  into r × r blocks W_{o,i} (fan_in and out divisible by r) and D ∈ R^{(out/r)×r×r} holds one block per
  block-row: W'_{o,i} = W_{o,i} + W_{o,i} D_o + D_o, so ΔW_{o,i} = W_{o,i} D_o + D_o depends on the base
  weight (not low-rank; ``delta_weight_from_tensors`` needs the base weight). Unmerge inverts the affine map:
  W_{o,i} = (W'_{o,i} − D_o)(I + D_o)⁻¹. out·r parameters per layer.
- ``init_weights=False``: the balance form with D Kaiming-uniform (a non-zero update, for tests).
D = 0 at init in the other modes, so training starts from the base. Paper / peft defaults: r = 64 (even),
mini_r = 1, no dropout.

This follows peft's port (peft/tuners/miss), the reference for what is ambiguous in the paper:
the same config fields (``MissConfig``), the same single key ``miss_block`` per layer, the same forward (dropout on
the input of the balance / mini forms only, none for bat) and merge, and peft's shape rules (r ≤ fan_in; bat:
r divides fan_in and out; mini: mini_r divides out), refused here at creation with the module named. The three
forms are three registered methods selected by ``init_weights`` (``flags=``, as DoRA by ``use_dora``), because
their capabilities differ: bat is not low-rank. Like peft, linear layers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..errors import GraftingError
from ..init_stage import random_init_wanted
from ..registry import register
from .base import Method

MISS_INITS = (True, False, "bat", "mini")
MISS_BIAS = ("none", "all", "miss_only", "MiSS_only")


@dataclass
class MissConfig(AdapterConfig):
    """Configuration of a MiSS adapter; field names as peft's ``MissConfig``.

    r: shard width along fan_in (bat: the block size). mini_r: how many distinct output columns the mini form
    trains (out must be divisible by it). miss_dropout: dropout on the layer input (balance / mini). init_weights:
    ``True`` (balance, D = 0), ``"bat"`` (Bone's block-affine update, D = 0), ``"mini"`` (D = 0), ``False``
    (balance with a random non-zero D; for tests). bias: ``none``, ``all`` or ``miss_only``.
    """

    peft_type = "MISS"

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: Any = True
    bias: str = "none"

    def check(self, bad) -> None:
        for name in ("r", "mini_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "a positive integer", value)
        if isinstance(self.miss_dropout, bool) or not isinstance(self.miss_dropout, (int, float)) \
                or not 0.0 <= self.miss_dropout < 1.0:
            raise bad("miss_dropout", "a number in [0, 1)", self.miss_dropout)
        init = self.init_weights
        if not any(init is m or (isinstance(m, str) and init == m) for m in MISS_INITS):
            raise bad("init_weights", f"one of {MISS_INITS}", init)
        if self.bias not in MISS_BIAS:
            raise bad("bias", f"one of {MISS_BIAS}", self.bias)


class MissAdapter(nn.Module):
    def __init__(self, shape: tuple, r: int, fan_in: int, out: int, dropout: float, dtype, device):
        super().__init__()
        self.miss_block = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.r, self.fan_in, self.out = r, fan_in, out
        self.miss_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"r={self.r}, block={tuple(self.miss_block.shape)}"


def _shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """(..., fan_in) -> (..., r): the sum of the r-wide shards of x (zero-padded to a multiple of r)."""
    pad = (-x.shape[-1]) % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, r).sum(-2)


def _shard_matrix(r: int, fan_in: int, like: torch.Tensor) -> torch.Tensor:
    """S ∈ {0,1}^{r×fan_in} with S[k, j] = 1 iff j mod r = k: ΔW = Dᵀ S."""
    j = torch.arange(fan_in, device=like.device)
    return (j[None, :] % r == torch.arange(r, device=like.device)[:, None]).to(like.dtype)


def _check_shape(module_name: str, fan_in: int, out: int, cfg) -> None:
    r = cfg.r
    if r > fan_in:
        raise GraftingError(f"MiSS module '{module_name}': field 'r' = {r} exceeds its in_features ({fan_in}); "
                            "peft requires r <= in_features")
    if cfg.init_weights == "bat" and (fan_in % r or out % r):
        raise GraftingError(f"MiSS module '{module_name}': field 'r' = {r} must divide in_features ({fan_in}) "
                            f"and out_features ({out}) with init_weights='bat' (the weight is cut into r x r "
                            "blocks)")
    if cfg.init_weights == "mini" and out % cfg.mini_r:
        raise GraftingError(f"MiSS module '{module_name}': field 'mini_r' = {cfg.mini_r} must divide "
                            f"out_features ({out}) with init_weights='mini'")


def _block_shape(cfg, out: int) -> tuple:
    if cfg.init_weights == "bat":
        return (out // cfg.r, cfg.r, cfg.r)
    if cfg.init_weights == "mini":
        return (cfg.r, cfg.mini_r)
    return (cfg.r, out)


def _full_block(block: torch.Tensor, out: int) -> torch.Tensor:
    """The (r, out) block of the balance form; mini tiles its (r, mini_r) block along the outputs."""
    return block if block.shape[1] == out else block.repeat(1, out // block.shape[1])


def _shared_delta(block: torch.Tensor, fan_in: int, out: int) -> torch.Tensor:
    """Balance / mini ΔW (out, fan_in): ΔW[o, j] = D[j mod r, o]."""
    full = _full_block(block, out)
    return full.t()[:, torch.arange(fan_in, device=block.device) % full.shape[0]]


def _bat_delta(w: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Bat ΔW (out, fan_in) of base weight ``w`` (out, fan_in): ΔW_{o,i} = W_{o,i} D_o + D_o per r x r block."""
    nb, r, _ = block.shape
    wb = w.reshape(nb, r, w.shape[1] // r, r)
    return (torch.einsum("oaib,obc->oaic", wb, block) + block[:, :, None, :]).reshape(w.shape)


@register("miss", config=MissConfig)
class Miss(Method):
    """MiSS (balance): one r x out block shared by every r-wide shard of fan_in (ΔW[o, j] = D[j mod r, o])."""

    layer_kinds = frozenset({"linear"})
    low_rank_form = True
    #: the contract's 12 -> 10 layers cannot take peft's default r = 64 (r <= in_features)
    tiny_fields = {"r": 2}

    def create(self, host, cfg, module_name, shared):
        fan_in, out = host.kind.in_out(host.base_layer)
        _check_shape(module_name, fan_in, out, cfg)
        w = host.dense_weight()
        adapter = MissAdapter(_block_shape(cfg, out), cfg.r, fan_in, out, cfg.miss_dropout, w.dtype, w.device)
        if cfg.init_weights is False and random_init_wanted():
            with torch.no_grad():
                nn.init.kaiming_uniform_(adapter.miss_block, a=math.sqrt(5))
        return adapter

    def delta(self, adapter, host, x, base_out):
        full = _full_block(adapter.miss_block, adapter.out)
        h = adapter.miss_dropout(x.to(full.dtype))
        return (_shard_sum(h, adapter.r) @ full).to(base_out.dtype)

    def delta_weight(self, adapter, host):
        w = host.dense_weight()
        return _shared_delta(adapter.miss_block, adapter.fan_in, adapter.out).to(w.dtype)

    def deterministic(self, adapter):
        return isinstance(adapter.miss_dropout, nn.Identity) or not adapter.miss_dropout.training

    def low_rank(self, adapter):
        block = adapter.miss_block
        return _shard_matrix(adapter.r, adapter.fan_in, block), _full_block(block, adapter.out).t(), 1.0

    def peft_keys(self, kind):
        return {"miss_block": "miss_block"}

    def rank_from_shapes(self, shapes):
        shape = shapes.get("miss_block")
        return None if shape is None else shape[-1] if len(shape) == 3 else shape[0]

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        if base_weight is None:  # fan_in (how many shards) is not in the layer's tensors
            raise NotImplementedError(f"MiSS layer '{module_name}': its ΔW needs the base weight's shape "
                                      "(in_features is not stored): pass base_weight")
        out, fan_in = base_weight.shape
        return _shared_delta(tensors["miss_block"].float(), fan_in, out)


@register("miss-mini", config=MissConfig, flags={"init_weights": "mini"})
class MissMini(Miss):
    """MiSS (mini): an r x mini_r block tiled over the outputs and shared by every shard of fan_in."""

    tiny_fields = {"r": 2, "mini_r": 2}


@register("miss-bat", config=MissConfig, flags={"init_weights": "bat"})
class MissBat(Miss):
    """Bone / MiSS (bat): block-affine W'_{o,i} = W_{o,i}(I + D_o) + D_o over r x r blocks of the base weight."""

    low_rank_form = False

    def delta(self, adapter, host, x, base_out):
        return Method.delta(self, adapter, host, x, base_out)  # ΔW depends on W: no cheaper factored form

    def delta_weight(self, adapter, host):
        w = host.dense_weight()
        block = adapter.miss_block
        return host.kind.from_out_in(_bat_delta(host.kind.to_out_in(w).to(block.dtype), block), w).to(w.dtype)

    def deterministic(self, adapter):
        return True  # peft applies no dropout to the bat form

    def low_rank(self, adapter):
        return None

    def unmerge(self, adapter, host, token):
        # the merged weight W(I + D) + D no longer holds W: invert the affine map per block (in float64)
        w = host.dense_weight()
        block = adapter.miss_block.detach().double()
        nb, r, _ = block.shape
        merged = host.kind.to_out_in(w).double()
        wb = (merged.reshape(nb, r, -1, r) - block[:, :, None, :]).permute(0, 2, 1, 3)  # (nb, fan_in/r, r, r)
        eye = torch.eye(r, dtype=block.dtype, device=block.device)
        original = torch.linalg.solve((eye + block)[:, None], wb, left=False)  # X (I + D_o) = W' - D_o
        return host.kind.from_out_in(original.permute(0, 2, 1, 3).reshape(merged.shape), w).to(w.dtype)

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        if base_weight is None:
            raise NotImplementedError(f"MiSS (bat) layer '{module_name}': ΔW = W D + D depends on the base "
                                      "weight: pass base_weight")
        return _bat_delta(base_weight.float(), tensors["miss_block"].float())
