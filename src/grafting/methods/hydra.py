"""Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning (Kim et al., 2023, arXiv:2309.06922).

Hydra adds two low-rank branches to a frozen linear layer (Sec. 3, "Hydra", Fig. 1c): a parallel branch (LoRA,
which learns new features from the layer's input) and a sequential branch (a low-rank adapter on the layer's
*output*, a linear combination of the pre-trained features W0 x). In the (out, fan_in) view grafting uses,
    h = W0 x + b + s·B_p A_p x + s·B_s A_s W0 x,        ΔW = s·(B_p A_p + B_s A_s W0),
with A_p (r_p × fan_in), B_p (out × r_p), A_s (r_s × out), B_s (out × r_s). The paper writes the sequential term
in its row-vector layout (W ∈ R^{fan_in × out}) as W0·W_seq; the official code is what fixes the orientation
(github.com/extremebird/Hydra: ``hydra_seq(dense(x))`` in nlu/.../modeling_roberta.py, and the merge
``W0 + scale·(W_p + W0 @ W_s)`` in vtab1k/hydra.py's ``reparameterize``): the sequential branch mixes the layer's
output features, so it is B_s A_s W0, not W0 B_s A_s.

Choices where the paper leaves details open, from the official code:
- Init (nlu/src/transformers/models/adapter.py): A Kaiming-uniform (a = √5), B = 0 in both branches, so the
  adapter starts as the base. No biases in the branches (the NLU version; the ViT version's zero-initialised
  branch biases are not kept).
- Ranks: ``hydra_par_r`` / ``hydra_seq_r`` as the NLU scripts name them (RoBERTa on GLUE: 4 and 8), both
  defaulting to ``r``; the ViT code uses one ``dim`` (2) for both.
- ``scale``: one fixed factor for both branches (vtab1k configs: 0.1 to 10 per dataset; 1 in the NLU and ELEVATER
  code, which is the default here). ``dropout``: on the branches' r-dim bottleneck, up(dropout(down(·))), as
  vtab1k's ``Hydra_layer`` (default 0).
- The official sequential branch reads the layer's output *with* its bias, W0 x + b, which adds a constant s·B_s
  A_s b to the output. Here it reads W0 x only, so the whole update is a weight (ΔW above) and merges into the
  weight alone, as every grafting method does; the bias term is not reproduced.

ΔW depends on the base weight, so it is not a fixed pair of factors: ``low_rank`` is not offered (the mixed-batch
kernel caches factors keyed by the adapter's own tensors, which would go stale if the base changed), and mixed
batches group rows by adapter. The forward never builds the dense ΔW: it stacks [A_p; A_s W0] (r_p + r_s rows)
for long inputs, or runs A_s on W0 x for inputs shorter than r_s tokens, whichever costs less. Merging from an
adapter file needs the base weight (``delta_weight_from_tensors(base_weight=...)``).
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


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class HydraConfig(AdapterConfig):
    """Configuration of a Hydra adapter (field names from the official code).

    r: rank of both branches unless overridden. hydra_par_r / hydra_seq_r: rank of the parallel (LoRA) and the
    sequential (output-mixing) branch (None: ``r``). scale: factor on both branches' output. dropout: dropout on
    the branches' bottleneck. init_weights: B_p = B_s = 0 (True, the official init: the adapter starts as the
    base); False: every factor random (a non-zero update, for tests). fan_in_fan_out: the targets store their
    weight (in, out) (GPT-2's Conv1D), for merging adapter files into such checkpoints.
    """

    peft_type = "HYDRA"

    r: int = 8
    hydra_par_r: int | None = None
    hydra_seq_r: int | None = None
    scale: float = 1.0
    dropout: float = 0.0
    init_weights: bool = True
    fan_in_fan_out: bool = False

    def check(self, bad) -> None:
        if not _positive_int(self.r):
            raise bad("r", "a positive integer", self.r)
        for name in ("hydra_par_r", "hydra_seq_r"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise bad(name, "a positive integer or null (use r)", value)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or self.scale == 0 \
                or not math.isfinite(self.scale):
            raise bad("scale", "a finite non-zero number (0 makes an adapter that never changes the output)",
                      self.scale)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "a number in [0, 1)", self.dropout)
        for flag in ("init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "true or false", getattr(self, flag))

    def ranks(self) -> tuple[int, int]:
        return (self.hydra_par_r or self.r, self.hydra_seq_r or self.r)


class HydraAdapter(nn.Module):
    def __init__(self, fan_in: int, out: int, par_r: int, seq_r: int, scale: float, dropout: float, dtype, device):
        super().__init__()
        self.par_A = nn.Parameter(torch.zeros(par_r, fan_in, dtype=dtype, device=device))
        self.par_B = nn.Parameter(torch.zeros(out, par_r, dtype=dtype, device=device))
        self.seq_A = nn.Parameter(torch.zeros(seq_r, out, dtype=dtype, device=device))
        self.seq_B = nn.Parameter(torch.zeros(out, seq_r, dtype=dtype, device=device))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"par_r={self.par_A.shape[0]}, seq_r={self.seq_A.shape[0]}, scale={self.scale:g}"


def _base_out_in(adapter: HydraAdapter, host) -> torch.Tensor:
    # the frozen base weight in the (out, fan_in) view; detached: it is never trained through the adapter
    return host.kind.to_out_in(host.dense_weight()).detach().to(adapter.par_A.dtype)


def _delta_out_in(par_A, par_B, seq_A, seq_B, w_out_in, scale) -> torch.Tensor:
    return (par_B @ par_A + seq_B @ (seq_A @ w_out_in)) * scale


@register("hydra", config=HydraConfig)
class Hydra(Method):
    """Parallel LoRA branch plus a sequential branch mixing the base's output: W0 + s·(B_p A_p + B_s A_s W0)."""

    layer_kinds = frozenset({"linear", "conv1d"})

    def create(self, host, cfg, module_name, shared):
        fan_in, out = host.kind.in_out(host.base_layer)
        par_r, seq_r = cfg.ranks()
        w = host.dense_weight()
        adapter = HydraAdapter(fan_in, out, par_r, seq_r, float(cfg.scale), cfg.dropout,
                               w.dtype if w.is_floating_point() else torch.float32, w.device)
        if random_init_wanted():  # loading overwrites every factor
            with torch.no_grad():
                for A in (adapter.par_A, adapter.seq_A):
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                if not cfg.init_weights:
                    for B in (adapter.par_B, adapter.seq_B):
                        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        return adapter

    def delta(self, adapter, host, x, base_out):
        h = x.to(adapter.par_A.dtype)
        w = _base_out_in(adapter, host)
        seq_r = adapter.seq_A.shape[0]
        if h.numel() // h.shape[-1] < seq_r:  # a few tokens (decoding): W0 x is cheaper than A_s W0
            down = torch.cat([F.linear(h, adapter.par_A), F.linear(F.linear(h, w), adapter.seq_A)], -1)
        else:
            down = F.linear(h, torch.cat([adapter.par_A, adapter.seq_A @ w]))
        up = torch.cat([adapter.par_B, adapter.seq_B], 1)
        return (F.linear(adapter.dropout(down), up) * adapter.scale).to(base_out.dtype)

    def delta_weight(self, adapter, host):
        w = host.dense_weight()
        dw = _delta_out_in(adapter.par_A, adapter.par_B, adapter.seq_A, adapter.seq_B, _base_out_in(adapter, host),
                           adapter.scale)
        return host.kind.from_out_in(dw, w).to(w.dtype)

    def merge(self, adapter, host):
        # ΔW reads the base weight, which the merge changes: unmerge subtracts the ΔW added, not a recomputed one
        dw = self.delta_weight(adapter, host).detach()
        return host.dense_weight().detach() + dw, dw

    def unmerge(self, adapter, host, token):
        return host.dense_weight() - token

    def deterministic(self, adapter):
        return isinstance(adapter.dropout, nn.Identity) or not adapter.dropout.training

    def peft_keys(self, kind):
        return {"hydra_par.hydra_A.weight": "par_A", "hydra_par.hydra_B.weight": "par_B",
                "hydra_seq.hydra_A.weight": "seq_A", "hydra_seq.hydra_B.weight": "seq_B"}

    def rank_from_shapes(self, shapes):
        if "par_A" in shapes and "seq_A" in shapes:
            return shapes["par_A"][0] + shapes["seq_A"][0]  # rank of ΔW is at most r_p + r_s
        return None

    def delta_weight_from_tensors(self, tensors, cfg, module_name, kind, shared, base_weight=None):
        if base_weight is None:
            raise GraftingError(f"Hydra layer '{module_name}': its ΔW needs the base weight (the sequential branch "
                                "mixes the base's output features)")
        t = {k: tensors[k].float() for k in ("par_A", "par_B", "seq_A", "seq_B")}
        w = base_weight.float()
        if t["par_A"].shape[1] != w.shape[1] or t["seq_A"].shape[1] != w.shape[0]:
            raise GraftingError(f"Hydra layer '{module_name}': factors of shapes {tuple(t['par_A'].shape)} / "
                                f"{tuple(t['seq_A'].shape)} do not fit a base weight of shape {tuple(w.shape)}")
        return _delta_out_in(t["par_A"], t["par_B"], t["seq_A"], t["seq_B"], w, float(cfg.scale))
