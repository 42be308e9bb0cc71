"""LaMDA: spectrally decomposed low-dimensional adaptation (Azizi et al., 2024, arXiv:2406.12832).

Full title: "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation" (Azizi, Kundu &
Pedram, EMNLP Findings 2024).

The adaptation path is LoRA's with a small square matrix between the projections (Fig. 1c; the paper writes
it for row vectors, Y = XW + α·XASB):
    h = W0 x + s·B S A x,     s = α/r,
with the first projection A (PMA, r x fan_in) frozen after init, the low-dimensional adapter S (LDA, r x r)
trained throughout, and the second projection B (PMB, out x r) trained at first and frozen gradually, one column
at a time, until it is completely frozen early in training; from then on only r² parameters per layer train.

Following the official code (github.com/ArminAzizi98/LaMDA, ``lamda.py`` and its trainer's
``gradual_freeze_B``): A and B take peft's LoRA init (A Kaiming-uniform, B = 0, so training starts at the base
model; A is drawn from ``lamda_seed`` and the module name rather than the global RNG, so it is reproducible),
S is ``nn.Linear(r, r)``'s default init (Kaiming-uniform, bound 1/√r), and a frozen column of B receives no
gradient (its columns 0..k-1 are frozen first: for the spectral init those are the largest singular
directions). One deviation, so that B is "completely frozen" after the early stage as the paper states: column
j freezes at step ⌈(j+1)·η·T/r⌉ (B fully frozen after η·T steps, η = ``lamda_freeze_fraction``, default 0.3 as
the code's ``eta``); the released code freezes one column per η·T steps, which fully freezes B only for r <= 3.
The schedule runs in ``Method.on_step``; frozen columns are detached in the forward (exactly the code's
zeroed gradient), and a fully frozen B is left out of the graph so the optimizer skips it.

``lamda_init="svd"``: the spectral init the paper describes (A = V_rᵀ, B = U_r, the top-r singular
vectors of W0; S = 0, so the adapter still starts at the base and the base weight is unchanged). The paper's
exact scaling of this init is not in the released code; this is our reading. LaMDA++ (rank allocation from
each layer's normalized singular-value energy) is not implemented: ranks are given by ``r`` / ``rank_pattern``.

Saved by default as plain LoRA (A' = S·A, B; same r and α: ΔW unchanged), which peft loads;
``save_adapter(..., export=False)`` keeps A, S and B (peft_type ``LAMDA``) to continue training.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from ..init_stage import random_init_wanted
from ..registry import register
from .base import Method
from .lora import LoraConfig, create_lora, lora_deterministic, peft_lora_keys

_INITS = (True, False)
LAMDA_INITS = ("lora", "svd")


@dataclass
class LamdaConfig(LoraConfig):
    """LoRA with a frozen first projection, a trained r x r core and a gradually frozen second projection.

    lamda_freeze_fraction: η, the fraction of training after which B is completely frozen (columns freeze one
    by one, evenly spaced, first column first); 0 freezes B from the start. lamda_init: "lora" (the official
    code: A Kaiming, S Kaiming, B = 0; ``init_lora_weights=False`` makes B random non-zero, for tests) or
    "svd" (A, B the top singular vectors of W0, S = 0). lamda_seed: with the module name, seeds the frozen A."""

    peft_type = "LAMDA"

    lamda_freeze_fraction: float = 0.3
    lamda_seed: int = 0
    lamda_init: str = "lora"

    def check(self, bad) -> None:
        super().check(bad)
        if self.use_dora:
            raise bad("use_dora", "false (LaMDA has no magnitude vector)", self.use_dora)
        init = self.init_lora_weights
        if not isinstance(init, bool):
            raise bad("init_lora_weights", f"one of {_INITS}", init)
        if self.lamda_init not in LAMDA_INITS:
            raise bad("lamda_init", f"one of {LAMDA_INITS}", self.lamda_init)
        if isinstance(self.lamda_seed, bool) or not isinstance(self.lamda_seed, int):
            raise bad("lamda_seed", "an integer", self.lamda_seed)
        eta = self.lamda_freeze_fraction
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise bad("lamda_freeze_fraction", "a number in [0, 1]", eta)


def frozen_columns(r: int, eta: float, step: int, total: int) -> int:
    """How many leading columns of B are frozen after ``step`` of ``total`` optimizer steps."""
    if eta == 0:
        return r
    return min(r, int(math.floor(r * step / (eta * max(total, 1)) + 1e-9)))  # 1e-9: 0.3·100 is 30.000000000000004


def live_b(adapter: nn.Module) -> torch.Tensor:
    """B with its frozen columns detached (all of it once B is completely frozen)."""
    k, B = adapter.frozen_b, adapter.lora_B
    if k <= 0:
        return B
    if k >= B.shape[1]:
        return B.detach()
    return torch.cat([B[:, :k].detach(), B[:, k:]], 1)


def projected_a(adapter: nn.Module) -> torch.Tensor:
    """S·A in A's own layout (the LoRA down-projection LaMDA's path is equivalent to)."""
    A = adapter.lora_A
    return (adapter.lamda_S @ A.reshape(A.shape[0], -1)).reshape(A.shape)


@register("lamda", config=LamdaConfig)
class Lamda(Method):
    """LoRA path B·S·A: A frozen, the r x r core S trained, B trained then frozen column by column."""

    low_rank_form = True

    def create(self, host, cfg, module_name, shared):
        adapter = create_lora(host, cfg, module_name)
        A = adapter.lora_A.detach()
        if random_init_wanted():
            # A is never trained: drawn from (lamda_seed, module name), so the same config gives the same
            # projection in any process (twins, resumed runs) instead of depending on the global RNG
            g = torch.Generator().manual_seed(cfg.lamda_seed * 1_000_003 + zlib.crc32(module_name.encode()))
            A.copy_(nn.init.kaiming_uniform_(torch.empty(A.shape), a=math.sqrt(5), generator=g))
            if host.kind.name == "embedding" and cfg.init_lora_weights is not False:
                with torch.no_grad():  # peft's embedding init is A = 0, B random: here B = 0 (start at the base)
                    adapter.lora_B.zero_()
        del adapter.lora_A
        adapter.register_buffer("lora_A", A)  # frozen after init: a buffer, never in the optimizer
        r = adapter.r
        adapter.lamda_S = nn.Parameter(torch.empty(r, r, dtype=A.dtype, device=A.device))
        if random_init_wanted():
            nn.init.kaiming_uniform_(adapter.lamda_S, a=math.sqrt(5))
        adapter.frozen_b = frozen_columns(r, cfg.lamda_freeze_fraction, 0, 1)
        return adapter

    def init(self, adapter, host, cfg, activations):
        if cfg.lamda_init != "svd":
            return
        w = host.kind.to_out_in(host.dense_weight()).to(torch.float32)
        U, _, Vh = torch.linalg.svd(w, full_matrices=False)
        r = adapter.r
        with torch.no_grad():
            adapter.lora_A.copy_(Vh[:r].reshape(adapter.lora_A.shape))
            adapter.lora_B.copy_(U[:, :r].reshape(adapter.lora_B.shape))
            adapter.lamda_S.zero_()

    def on_step(self, layers, shared, cfg, step, total):
        for _, _, adapter in layers:
            adapter.frozen_b = frozen_columns(adapter.r, cfg.lamda_freeze_fraction, step, total)

    def delta(self, adapter, host, x, base_out):
        A = projected_a(adapter)
        if x.is_floating_point():
            x = adapter.lora_dropout(x.to(A.dtype))
        return (host.kind.lowrank(host.base_layer, x, A, live_b(adapter)) * adapter.scaling).to(base_out.dtype)

    def deterministic(self, adapter):
        return lora_deterministic(adapter)

    def low_rank(self, adapter):
        A, B = projected_a(adapter), live_b(adapter)
        return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), adapter.scaling

    def delta_weight(self, adapter, host):
        A, B, scale = self.low_rank(adapter)
        w = host.dense_weight()
        return host.kind.from_out_in((B @ A) * scale, w).to(w.dtype)

    def param_groups(self, adapter):
        return {"weights": ["lamda_S", "lora_B"], "architecture": []}

    def peft_keys(self, kind):
        return {**peft_lora_keys(kind), "lamda_S": "lamda_S"}

    def export_config(self, cfg):
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfig)}
        return LoraConfig(**fields)

    def export_tensors(self, now, cfg, module_name):
        A, S = now["lora_A"], now["lamda_S"]
        return {"lora_A": (S @ A.reshape(A.shape[0], -1)).reshape(A.shape), "lora_B": now["lora_B"]}

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        _, alpha = cfg.rank_and_alpha(module_name)
        A, S, B = tensors["lora_A"], tensors["lamda_S"], tensors["lora_B"]
        r = A.shape[0]
        return S @ A.reshape(r, -1), B.reshape(B.shape[0], -1), cfg.scaling(r, alpha)

    def rank_from_shapes(self, shapes):
        return shapes["lora_A"][0] if "lora_A" in shapes else None
