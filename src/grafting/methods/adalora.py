"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., 2023, arXiv:2303.10512).

Eq. (1): the update is kept in SVD form, ΔW = P Λ Q, with P (out x r) the left and Q (r x fan_in) the right
singular vectors and Λ = diag(λ) the singular values; peft names them lora_B = P, lora_A = Q, lora_E = λ (r x 1).
As in the official code and peft, ΔW = lora_alpha / (ranknum + 1e-5) · P diag(λ) Q with ranknum the initial rank
init_r (it stays init_r after ranks are cut, so cutting a triplet never rescales the others); λ = 0 at init and
P, Q ~ N(0, 0.02²), so training starts from the base.

Eq. (4): R(P, Q) = ||PᵀP − I||_F + ||QQᵀ − I||_F keeps P and Q near-orthogonal; the loss adds orth_reg_weight
times its mean over all the adapter's matrices. The paper writes squared norms; its official code and peft use
the plain Frobenius norm averaged over matrices, which is followed here (same loss as peft).

Eq. (5)-(9), the rank budget: after each optimizer step, with the gradients still present, every entry w of P, λ, Q
gets the sensitivity I = |w·∇w|, smoothed Ī ← β1 Ī + (1 − β1) I and its uncertainty Ū ← β2 Ū + (1 − β2)|I − Ī|;
s = Ī·Ū. A triplet's score is S_i = s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki). The total budget b(t) of kept
triplets follows the cubic schedule b(t) = b_T + (b_0 − b_T)(1 − (t − tinit)/(T − tfinal − tinit))³ (the paper's
global budget scheduler, floored; b_0 = the sum of initial ranks, b_T = target_r x layers; b(t) = b_0 up to
tinit; target_r >= init_r cuts nothing, where peft would fail); every deltaT steps the λ of all but the b(t)
highest-scoring triplets are set to 0. At step T − tfinal the final mask (b_T triplets)
is fixed and re-applied after every later step. ``step`` is the trainer's count of finished optimizer steps.

Paper defaults: β1 = β2 = 0.85; the initial budget 1.5x the target (peft's init_r 12 for target_r 8); the
official scripts weight the orthogonality penalty 0.1 (peft's default 0.5 is kept as the field default, so
configs mean the same in both libraries). The importance state (Ī, Ū) lives in memory only: a run resumed from
a checkpoint restarts its averages (in the final phase it recovers the fixed mask from the λ saved as 0).

On disk (peft's format): lora_A, lora_B, lora_E (no ".weight"), ranknum not saved; after allocation
adapter_config.json holds ``rank_pattern`` {"<module>.lora_E": [kept?] x init_r} and only the kept triplets
are written. A config with a rank_pattern (a loaded file's) builds each layer at its kept rank, as peft does on
load (peft's get_peft_model builds init_r rows and cuts them on save: the same file). During
training the mask lives in the grafting-only field ``allocated``: ``save_adapter`` writes the peft form (the
rank_pattern and only kept triplets); ``save_adapter(..., export=False)`` (checkpoints) writes every triplet, the
cut ones with λ = 0, so it refills the same model. ΔW = s·(P diag(λ)) Q is low-rank: mixed batches use the
gathered kernel, cut triplets contributing λ = 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import AdapterConfig
from ..init_stage import random_init_wanted
from ..registry import register
from .base import Method
from .lora import _PEFT_IGNORED, BIAS_MODES, factor_dtype

# peft's AdaLoRA layers never read use_rslora or alpha_pattern (the scale is lora_alpha / init_r): any value loads
_ADALORA_IGNORED = {**_PEFT_IGNORED, "use_rslora": None, "use_dora": (False,), "alpha_pattern": None,
                    "corda_config": (None,), "eva_config": (None,)}  # LoRA inits AdaLoRA does not take
_TRIPLET = ("lora_A", "lora_B", "lora_E")


@dataclass
class AdaLoraConfig(AdapterConfig):
    """Configuration of an AdaLoRA adapter; field names as peft's ``AdaLoraConfig``.

    init_r: initial rank of every layer. target_r: average rank left after allocation (budget target_r x
    layers). tinit / tfinal: steps before rank cutting starts / after it ends (the final mask is fixed then).
    deltaT: steps between two allocations. beta1 / beta2: EMA factors of sensitivity / uncertainty.
    orth_reg_weight: weight of the orthogonality penalty. total_step: training steps of the schedule (None: the
    trainer's step count, recorded at the first step). rank_pattern: kept triplets per layer (written after
    allocation; a file with one loads each layer at its kept rank). lora_alpha: scale numerator (ΔW =
    lora_alpha / init_r · P Λ Q). init_lora_weights: True (λ = 0, P, Q ~ N(0, 0.02²)) or False (all N(0, 1), for
    tests). r: peft's LoRA rank field, unused (as in peft: the rank is init_r). ``allocated`` (grafting-only):
    masks found during training, written as rank_pattern on save.
    """

    peft_type = "ADALORA"
    peft_ignored = _ADALORA_IGNORED
    grafting_only = ("allocated",)

    r: int = 8
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    fan_in_fan_out: bool = False
    init_lora_weights: bool = True
    allocated: dict = field(default_factory=dict)

    def check(self, bad) -> None:
        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("r", "init_r", "target_r", "deltaT"):
            if not integer(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "a positive integer", getattr(self, name))
        for name in ("tinit", "tfinal"):
            if not integer(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a non-negative integer", getattr(self, name))
        if self.total_step is not None:
            if not integer(self.total_step) or self.total_step < 1:
                raise bad("total_step", "a positive integer (or null: the trainer's step count)", self.total_step)
            if self.tinit >= self.total_step - self.tfinal:
                raise bad("total_step", f"more than tinit + tfinal ({self.tinit} + {self.tfinal}), so that "
                          "ranks are cut in between", self.total_step)
        for name in ("beta1", "beta2"):
            if not number(getattr(self, name)) or not 0 < getattr(self, name) < 1:
                raise bad(name, "a number in (0, 1)", getattr(self, name))
        if not number(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise bad("orth_reg_weight", "a non-negative number", self.orth_reg_weight)
        if not number(self.lora_alpha) or self.lora_alpha < 0:
            raise bad("lora_alpha", "a non-negative number (0 means init_r, as in peft)", self.lora_alpha)
        if not number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "a number in [0, 1)", self.lora_dropout)
        if self.bias not in BIAS_MODES:
            raise bad("bias", f"one of {BIAS_MODES}", self.bias)
        for flag in ("fan_in_fan_out", "init_lora_weights"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "true or false", getattr(self, flag))
        for name in ("rank_pattern", "allocated"):
            pattern = getattr(self, name)
            if pattern is None and name == "rank_pattern":
                continue
            if not isinstance(pattern, dict):
                raise bad(name, "a mapping of '<module>.lora_E' to a list of true/false per triplet", pattern)
            for key, mask in pattern.items():
                if not isinstance(mask, list) or not all(isinstance(m, bool) for m in mask) \
                        or len(mask) != self.init_r:
                    raise bad(f"{name}[{key!r}]", f"a list of {self.init_r} (init_r) true/false values", mask)

    def to_peft_dict(self) -> dict:
        d = super().to_peft_dict()
        if d["total_step"] is None:  # peft refuses null; it only shapes a schedule that is not running
            d["total_step"] = self.tinit + self.tfinal + 1
        return d


def layer_mask(pattern: dict | None, module_name: str) -> list | None:
    """A layer's entry of a rank_pattern (peft writes '<module>.lora_E', in memory '<module>.lora_E.<name>')."""
    for key, mask in (pattern or {}).items():
        if key == f"{module_name}.lora_E" or key.startswith(f"{module_name}.lora_E."):
            return mask
    return None


def scaling(cfg) -> float:
    return cfg.lora_alpha if cfg.lora_alpha > 0 else float(cfg.init_r)


class AdaLoraAdapter(nn.Module):
    def __init__(self, rows: int, fan_in: int, out: int, cfg, dtype, device):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rows, fan_in, dtype=dtype, device=device))  # Q
        self.lora_E = nn.Parameter(torch.empty(rows, 1, dtype=dtype, device=device))  # λ
        self.lora_B = nn.Parameter(torch.empty(out, rows, dtype=dtype, device=device))  # P
        self.ranknum = float(cfg.init_r)
        self.scaling = scaling(cfg)
        self.lora_dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.keep: torch.Tensor | None = None  # the rows the allocator keeps (None: not allocated yet)
        self.importance: dict = {}  # parameter name -> (smoothed sensitivity Ī, uncertainty Ū)

    def scale(self) -> float:
        return self.scaling / (self.ranknum + 1e-5)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(diag(λ) Q, P) in the (out, fan_in) view."""
        return self.lora_A * self.lora_E, self.lora_B

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, init_r={int(self.ranknum)}, scaling={self.scale():g}"


def budget_schedule(step: int, init_bgt: int, target_bgt: int, cfg, total_step: int) -> tuple[int, bool]:
    """(triplets kept, whether to mask now) at ``step``: the paper's cubic budget schedule."""
    if step <= cfg.tinit:
        return init_bgt, False
    if step > total_step - cfg.tfinal:
        return target_bgt, True
    progress = 1 - (step - cfg.tinit) / (total_step - cfg.tfinal - cfg.tinit)
    return int((init_bgt - target_bgt) * progress ** 3 + target_bgt), step % cfg.deltaT == 0


@torch.no_grad()
def update_importance(adapter: AdaLoraAdapter, beta1: float, beta2: float) -> None:
    """Eq. (5)-(7): I = |w·∇w| per entry, its EMA Ī and the EMA Ū of |I − Ī|."""
    for name in _TRIPLET:
        p = getattr(adapter, name)
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        ipt = (p * grad).abs().detach()
        avg, unc = adapter.importance.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
        avg = beta1 * avg + (1 - beta1) * ipt
        unc = beta2 * unc + (1 - beta2) * (ipt - avg).abs()
        adapter.importance[name] = (avg, unc)


def triplet_scores(adapter: AdaLoraAdapter) -> torch.Tensor:
    """Eq. (8)-(9): S_i = s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki), with s = Ī·Ū."""
    s = {name: avg * unc for name, (avg, unc) in adapter.importance.items()}
    return s["lora_E"].view(-1) + (s["lora_A"].mean(dim=1).view(-1) + s["lora_B"].mean(dim=0).view(-1))


def full_mask(cfg, module_name: str, keep_rows: list) -> list:
    """A layer's kept rows as a rank_pattern entry over all init_r triplets (a layer loaded at a reduced rank
    holds only its pattern's kept ones)."""
    old = layer_mask(cfg.rank_pattern, module_name)
    if old is None or len(keep_rows) == len(old):
        return [bool(k) for k in keep_rows]
    rows = iter(keep_rows)
    return [bool(next(rows)) if o else False for o in old]


@register("adalora", config=AdaLoraConfig)
class AdaLora(Method):
    """SVD-form update P Λ Q whose triplets are cut to a rank budget by importance during training."""

    layer_kinds = frozenset({"linear", "conv1d", "conv2d"})
    low_rank_form = True

    def create(self, host, cfg, module_name, shared):
        fan_in = host.kind.to_out_in(host.dense_weight()).shape[1]  # conv2d: in x kh x kw, flat as in peft
        _, out = host.kind.in_out(host.base_layer)
        mask = layer_mask(cfg.rank_pattern, module_name)
        rows = cfg.init_r if mask is None else sum(mask)
        adapter = AdaLoraAdapter(rows, fan_in, out, cfg, factor_dtype(host), host.dense_weight().device)
        if random_init_wanted():
            # peft's draws in peft's order (A, E, B, its ranknum), so one seed gives both libraries one adapter
            with torch.no_grad():
                adapter.lora_A.copy_(torch.randn(rows, fan_in))
                adapter.lora_E.copy_(torch.randn(rows, 1))
                adapter.lora_B.copy_(torch.randn(out, rows))
                torch.randn(1)
                if cfg.init_lora_weights:
                    nn.init.zeros_(adapter.lora_E)
                    nn.init.normal_(adapter.lora_A, mean=0.0, std=0.02)
                    nn.init.normal_(adapter.lora_B, mean=0.0, std=0.02)
        return adapter

    # ---- training ---------------------------------------------------------------------------------------------
    def on_step(self, layers, shared, cfg, step, total):
        if not layers:
            return
        if cfg.total_step is None:
            if total <= cfg.tinit + cfg.tfinal:
                from ..errors import GraftingError
                raise GraftingError(f"AdaLoraConfig: training runs {total} steps, not more than tinit + tfinal "
                                    f"({cfg.tinit} + {cfg.tfinal}): no step is left to cut ranks in")
            cfg.total_step = total
        end = cfg.total_step - cfg.tfinal
        if step < end:
            for _, _, adapter in layers:
                update_importance(adapter, cfg.beta1, cfg.beta2)
            init_bgt = sum(a.lora_A.shape[0] for _, _, a in layers)
            budget, mask_now = budget_schedule(step, init_bgt, cfg.target_r * len(layers), cfg, cfg.total_step)
            if mask_now:
                self._mask_to_budget(layers, cfg, budget)
        elif step == end:
            self._mask_to_budget(layers, cfg, cfg.target_r * len(layers))
            for _, _, adapter in layers:
                adapter.importance = {}
        else:
            with torch.no_grad():
                for module_name, _, adapter in layers:
                    if adapter.keep is None:  # resumed from a checkpoint: its cut triplets were saved with λ = 0
                        adapter.keep = adapter.lora_E.detach().view(-1) != 0
                        cfg.allocated[f"{module_name}.lora_E"] = full_mask(cfg, module_name, adapter.keep.tolist())
                    adapter.lora_E.masked_fill_(~adapter.keep.view(-1, 1), 0.0)

    @torch.no_grad()
    def _mask_to_budget(self, layers, cfg, budget: int) -> None:
        if any(not a.importance for _, _, a in layers):
            return  # no importance measured yet (a schedule that cuts at its first step)
        scores = [triplet_scores(a) for _, _, a in layers]
        cut = sum(s.numel() for s in scores) - budget
        if cut <= 0:  # target_r >= init_r: nothing to cut (peft's kthvalue fails here; its configs allow it)
            return
        threshold = torch.kthvalue(torch.cat(scores), k=cut)[0].item()
        for (module_name, _, adapter), score in zip(layers, scores):
            dropped = score <= threshold
            adapter.lora_E.masked_fill_(dropped.view(-1, 1), 0.0)
            adapter.keep = ~dropped
            cfg.allocated[f"{module_name}.lora_E"] = full_mask(cfg, module_name, adapter.keep.tolist())

    def regularizer(self, layers, shared, cfg):
        if not cfg.orth_reg_weight or not layers:
            return None
        total = 0
        for _, _, a in layers:
            for cov in (a.lora_A @ a.lora_A.T, a.lora_B.T @ a.lora_B):
                total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype,
                                                                         device=cov.device))
        return cfg.orth_reg_weight * total / (2 * len(layers))

    # ---- forward ----------------------------------------------------------------------------------------------
    def delta(self, adapter, host, x, base_out):
        A, B = adapter.factors()
        if host.kind.name == "conv2d":
            w = host.base_layer.weight
            A, B = A.reshape(A.shape[0], *w.shape[1:]), B.reshape(*B.shape, 1, 1)
        xin = adapter.lora_dropout(x.to(A.dtype)) if x.is_floating_point() else x
        return (host.kind.lowrank(host.base_layer, xin, A, B) * adapter.scale()).to(base_out.dtype)

    def delta_weight(self, adapter, host):
        A, B = adapter.factors()
        w = host.dense_weight()
        return host.kind.from_out_in((B @ A) * adapter.scale(), w).to(w.dtype)

    def deterministic(self, adapter):
        return isinstance(adapter.lora_dropout, nn.Identity) or not adapter.lora_dropout.training

    def low_rank(self, adapter):
        A, B = adapter.factors()
        return A, B, adapter.scale()

    # ---- on disk ----------------------------------------------------------------------------------------------
    def peft_keys(self, kind):
        return {name: name for name in _TRIPLET}

    def export_config(self, cfg):
        if not cfg.allocated:
            return None  # nothing allocated: the adapter is saved as it is
        return dataclasses.replace(cfg, rank_pattern={**(cfg.rank_pattern or {}), **cfg.allocated}, allocated={})

    def export_tensors(self, now, cfg, module_name):
        mask = layer_mask(cfg.allocated, module_name)
        if mask is None:
            return dict(now)
        rows = now["lora_E"].shape[0]
        if rows != len(mask):  # loaded at a reduced rank: its rows are the kept ones of the old pattern
            old = layer_mask(cfg.rank_pattern, module_name)
            mask = [m for m, o in zip(mask, old) if o]
        keep = torch.tensor(mask, dtype=torch.bool, device=now["lora_E"].device)
        return {"lora_A": now["lora_A"][keep], "lora_E": now["lora_E"][keep], "lora_B": now["lora_B"][:, keep]}

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        A, B = tensors["lora_A"], tensors["lora_B"]  # (rows, fan_in) and (out, rows) for every kind, as peft
        return A * tensors["lora_E"].reshape(-1, 1), B, scaling(cfg) / (cfg.init_r + 1e-5)

    def rank_from_shapes(self, shapes):
        return shapes["lora_A"][0] if "lora_A" in shapes else None
