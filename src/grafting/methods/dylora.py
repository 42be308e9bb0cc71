"""DyLoRA: search-free dynamic low-rank adaptation (Valipour et al., EACL 2023, arXiv:2210.07558).

One LoRA pair of rank r_max is trained so that every truncation to its first b components is itself a good
adapter. Eq. (3)-(5): at each training step a rank b ~ p_B (uniform over {r_min, ..., r_max}, Sec. 3) is drawn
and the forward uses the truncated factors,
    h = W0 x + (α/b)·B[:, :b] A[:b] x,
so the scale follows the rank in use (the official code multiplies each truncated factor by √(r_max/b) on top of
LoRA's α/r_max, which is α/b). In the "frozen" mode (the official training script's setting, and the default
here) only the b-th row of A and column of B are updated at that step; rows < b are detached. At inference any
rank k ≤ r_max may be used (``eval_rank``; default r_max). Paper defaults (GLUE, RoBERTa): r_max = 8, α = 16,
b uniform over 1..8, frozen mode.

Where the paper leaves it open, following the official code (huawei-noah/Efficient-NLP, DyLoRA/):
- one b per step for the whole model (its ``set_rank`` is applied to every layer);
- the sampling here is a pure function of (``dylora_seed``, step), so a resumed run draws the same ranks.
  ``Method.on_step`` runs after each optimizer step and draws the rank of the next one; until the first
  ``on_step`` (the very first step) the training forward uses ``eval_rank``. The sampled rank applies only in
  training mode; ``model.eval()`` switches to ``eval_rank``. A training-mode forward is therefore not a fixed
  function (like dropout), so it never folds into the weight nor takes the gathered mixed-batch kernel.

Saved: natively (``save_adapter(..., export=False)``, peft_type ``DYLORA``) with all r_max components and each
layer's ``eval_rank`` (key ``dylora_eval_rank``), so the rank can be chosen after loading
(:func:`set_eval_rank`); by default (``export=True``) as a plain LoRA of rank ``eval_rank`` (A[:k], B[:, :k],
same α, so α/k is kept), which peft and any PEFT-compatible server load with the same outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import GraftingError
from ..hashing import unseal
from ..registry import register
from .base import Method
from .lora import LoraConfig, create_lora, lora_deterministic, peft_lora_keys

_INITS = (True, False, "gaussian", "kaiming")


@dataclass
class DyLoraConfig(LoraConfig):
    """A LoRA of rank ``r`` (= r_max) trained at a random truncation rank per step (DyLoRA).

    r_min: smallest sampled rank (1). dylora_frozen: update only the b-th component per step (True, the
    official setting) or all of the first b (False). dylora_seed: seeds the per-step rank draws. eval_rank: the
    rank used outside training and written by the plain-LoRA export (None: r)."""

    peft_type = "DYLORA"

    r_min: int = 1
    dylora_frozen: bool = True
    dylora_seed: int = 0
    eval_rank: int | None = None

    def check(self, bad) -> None:
        super().check(bad)
        if self.use_dora:
            raise bad("use_dora", "false (DyLoRA truncates plain LoRA factors)", self.use_dora)
        if self.use_rslora:
            raise bad("use_rslora", "false (DyLoRA's scale is α/b for the rank b in use)", self.use_rslora)
        if self.rank_pattern:
            raise bad("rank_pattern", "empty (one rank b is sampled for the whole model, up to r)",
                      self.rank_pattern)
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in ("gaussian", "kaiming")):
            raise bad("init_lora_weights", f"one of {_INITS}", init)
        if isinstance(self.r_min, bool) or not isinstance(self.r_min, int) or not 1 <= self.r_min <= self.r:
            raise bad("r_min", f"an integer in [1, r={self.r}]", self.r_min)
        if not isinstance(self.dylora_frozen, bool):
            raise bad("dylora_frozen", "true or false", self.dylora_frozen)
        if isinstance(self.dylora_seed, bool) or not isinstance(self.dylora_seed, int):
            raise bad("dylora_seed", "an integer", self.dylora_seed)
        k = self.eval_rank
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.r):
            raise bad("eval_rank", f"null or an integer in [1, r={self.r}]", k)

    def inference_rank(self) -> int:
        return self.r if self.eval_rank is None else self.eval_rank


def sampled_rank(cfg: DyLoraConfig, step: int) -> int:
    """b for training step ``step``: uniform over {r_min, ..., r} (p_B), a pure function of (seed, step)."""
    g = torch.Generator().manual_seed((cfg.dylora_seed * 1_000_003 + step) % (2 ** 63))
    return cfg.r_min + int(torch.randint(cfg.r - cfg.r_min + 1, (1,), generator=g))


def rank_in_use(adapter: nn.Module) -> int:
    """The training rank b after the first ``on_step`` in training mode, else the layer's eval rank."""
    if adapter.training and adapter.train_rank is not None:
        return adapter.train_rank
    hit = adapter.__dict__.get("_eval_rank")
    key = (adapter.eval_rank._version, adapter.eval_rank.data_ptr())
    if hit is None or hit[0] != key:  # read the buffer once per change, not once per forward (no device sync)
        hit = adapter.__dict__["_eval_rank"] = (key, int(adapter.eval_rank.reshape(-1)[0].item()))
    return hit[1]


def truncated(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A[:b], B[:, :b], α/b) in the layer's own factor layout; in frozen training only component b is live."""
    b = rank_in_use(adapter)
    A, B = adapter.lora_A[:b], adapter.lora_B[:, :b]
    if adapter.training and adapter.train_rank is not None and adapter.frozen and b > 1:
        A = torch.cat([A[:b - 1].detach(), A[b - 1:]], 0)
        B = torch.cat([B[:, :b - 1].detach(), B[:, b - 1:]], 1)
    return A, B, adapter.lora_alpha / b


def set_eval_rank(model, rank: int, name: str = "default") -> None:
    """Use rank ``rank`` (≤ r) for adapter ``name`` at inference and in its plain-LoRA export."""
    cfg = model.peft_config.get(name)
    if not isinstance(cfg, DyLoraConfig):
        raise GraftingError(f"adapter '{name}' is not a DyLoRA adapter")
    cfg.eval_rank = rank
    cfg.validate()
    unseal(model, [name])  # the rank changes in place: mixed calls must re-stack it
    for _, host in model.hosts():
        if name in host.adapters:
            with torch.no_grad():
                host.adapters[name].eval_rank.fill_(rank)


@register("dylora", config=DyLoraConfig)
class DyLora(Method):
    """LoRA with nested ranks: a random truncation rank b per training step, any rank ≤ r_max at inference."""

    low_rank_form = True

    def create(self, host, cfg, module_name, shared):
        adapter = create_lora(host, cfg, module_name)
        adapter.register_buffer("eval_rank", torch.full((1,), float(cfg.inference_rank()),
                                                        device=adapter.lora_A.device))
        adapter.train_rank = None  # set by on_step
        adapter.frozen = cfg.dylora_frozen
        return adapter

    def on_step(self, layers, shared, cfg, step, total):
        b = sampled_rank(cfg, step)
        for _, _, adapter in layers:
            adapter.train_rank = b

    def _out(self, adapter, host, x):
        A, B, scale = truncated(adapter)
        if x.is_floating_point():
            x = adapter.lora_dropout(x.to(A.dtype))
        return host.kind.lowrank(host.base_layer, x, A, B) * scale

    def delta(self, adapter, host, x, base_out):
        return self._out(adapter, host, x).to(base_out.dtype)

    def deterministic(self, adapter):
        return lora_deterministic(adapter) and not (adapter.training and adapter.train_rank is not None)

    def low_rank(self, adapter):
        A, B, scale = truncated(adapter)
        return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), scale

    def delta_weight(self, adapter, host):
        A, B, scale = self.low_rank(adapter)
        w = host.dense_weight()
        return host.kind.from_out_in((B @ A) * scale, w).to(w.dtype)

    def peft_keys(self, kind):
        return {**peft_lora_keys(kind), "dylora_eval_rank": "eval_rank"}

    def from_peft(self, adapter, host, attr, tensor):
        if attr == "eval_rank":
            k = float(tensor.reshape(-1)[0])
            if k != int(k) or not 1 <= k <= adapter.r:
                raise GraftingError(f"dylora_eval_rank = {k:g} must be an integer in [1, r={adapter.r}]")
        super().from_peft(adapter, host, attr, tensor)

    def export_config(self, cfg):
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfig)}
        return LoraConfig(**{**fields, "r": cfg.inference_rank()})

    def export_tensors(self, now, cfg, module_name):
        k = cfg.inference_rank()
        return {"lora_A": now["lora_A"][:k], "lora_B": now["lora_B"][:, :k]}

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        _, alpha = cfg.rank_and_alpha(module_name)
        k = int(tensors["eval_rank"].reshape(-1)[0]) if "eval_rank" in tensors else cfg.inference_rank()
        A, B = tensors["lora_A"][:k], tensors["lora_B"][:, :k]
        return A.reshape(k, -1), B.reshape(B.shape[0], -1), alpha / k

    def rank_from_shapes(self, shapes):
        return shapes["lora_A"][0] if "lora_A" in shapes else None
