"""PCB-merging: weight every entry of every task vector by how much it matters to its own task and how
well it agrees with the other tasks, drop the low scorers, and average the rest by their weights.

Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024, arXiv 2410.02396. For N
task vectors τ_i = θ_i − θ_0 over D entries the paper defines

    intra-balancing   β_intra,i = Softmax(N · Norm(τ_i ⊙ τ_i))
    inter-balancing   β_inter,i = Σ_j Softmax(Norm(τ_i ⊙ τ_j))
    PCB matrix        β_i = β_intra,i ⊙ β_inter,i
    drop              m_i = [β_i ≥ sorted(β_i)[(1 − r) D]],   β̂_i = m_i ⊙ β_i
    rescale, merge    τ_m = Σ_i β̂_i ⊙ τ_i / Σ_i β̂_i,          θ = θ_0 + λ τ_m

The authors' reference implementation (github.com/duguodong7/pcb-merging, ``pcb-merging.py``), which is
what we follow where it and the formulas differ:

* intra: exp(N · Norm(|τ_i|)²), Norm the min-max rescale to [0, 1] over the tensor. The softmax
  denominator is a per-model constant that the per-model rescale below removes, so we also divide by
  e^N (exp(N · (Norm² − 1)), which cannot overflow) without changing the result;
* inter: tanh(τ_i ⊙ Σ_j τ_j), i.e. of Σ_j τ_i ⊙ τ_j: negative where τ_i's sign fights the consensus, so
  conflicting entries score low and are dropped;
* drop and rescale: each model keeps its ⌈r·D⌉ highest-scoring entries, weighted by the score min-max
  rescaled between the highest dropped score (→ 0) and the top score (→ 1). ``pcb_ratio`` is r, the
  fraction *kept* (default 0.1, as in ``PCB_merge``; the official run scripts use 0.05 – 0.2). The
  official threshold index sits one entry higher, which divides by zero on small tensors. With r = 1
  nothing is dropped, but the rescale still maps each model's lowest score to 0, as the official code does;
* per-model ``weight`` w_i scales τ_i inside the weighted average (the official code's per-task λ_i,
  which it tunes by evolutionary search): τ_m = Σ_i s_i w_i τ_i / Σ_i s_i; the global ``lambda`` then
  scales τ_m, as in the paper's θ_0 + λ τ_m.

Where every model's entry is dropped, Σ s_i = 0 and the entry keeps the base value. A model whose
scores are all equal on a tensor (e.g. it left the tensor unchanged) carries no ranking and gets weight
0 there. The official code scores the whole model flattened into one vector; a streaming merge scores
each tensor on its own (as mergekit does for TIES and DARE), so quantiles and Norm are per tensor.
The official code also clips |τ| at its 0.01 % tails first; the formulas above have no such step, nor do we.
"""

from __future__ import annotations

import math

import torch

from ...errors import GraftingError
from ..base import LAMBDA, Param, TensorGroup, merge_method

WEIGHT = Param("weight", float, 1.0, "model", "scale of this model's task vector inside the balanced average")
PCB_RATIO = Param("pcb_ratio", float, 0.1, "global",
                  "fraction r of each task vector's entries kept: the ⌈r·D⌉ highest PCB scores")


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Rescale each row to [0, 1]; a constant row (no ranking) becomes 0."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def balancing_scores(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(intra, inter, β = intra ⊙ inter) for task vectors ``taus`` of shape [N, D].

    ``intra`` is the paper's softmax numerator exp(N · Norm(|τ_i|)²) divided by the constant e^N."""
    n = taus.shape[0]
    intra = torch.exp(n * (_minmax(taus.abs()) ** 2 - 1))
    inter = torch.tanh(taus * taus.sum(dim=0, keepdim=True))
    return intra, inter, intra * inter


def drop_and_rescale(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per row: 0 for all but the ⌈ratio·D⌉ top scores, which are min-max rescaled from the highest dropped
    score (0) to the top score (1)."""
    d = scores.shape[1]
    keep = min(d, max(1, math.ceil(ratio * d - 1e-9)))
    if keep < d:
        # The (d − keep)-th smallest is the highest dropped score: everything at or below it goes to 0.
        floor = scores.kthvalue(d - keep, dim=1, keepdim=True).values
    else:
        floor = scores.min(dim=1, keepdim=True).values
    return _minmax(torch.maximum(scores, floor))


@merge_method("pcb", params=[WEIGHT, PCB_RATIO, LAMBDA], needs_base=True,
              paper="Du et al., arXiv 2410.02396 (intra/inter-balancing, drop, rescale); official pcb-merging code",
              summary="θ_base + λ Σ s_i w_i τ_i / Σ s_i, s_i the kept, rescaled PCB scores")
def pcb(group: TensorGroup, params: dict) -> torch.Tensor:
    taus = torch.stack([tau.reshape(-1) for _, tau in group.task_vectors()])
    if taus.shape[1] == 0:
        return group.base.clone()
    ratio = float(params.get("pcb_ratio", 0.1))
    if not 0 < ratio <= 1:
        raise GraftingError(f"{group.name}: pcb_ratio is the fraction of entries kept, in (0, 1]; got {ratio}")
    _, _, beta = balancing_scores(taus)
    s = drop_and_rescale(beta, ratio)
    w = torch.tensor([float(m.params.get("weight", 1.0)) for m in group.models], dtype=taus.dtype).unsqueeze(1)
    merged = (s * w * taus).sum(dim=0) / s.sum(dim=0).clamp(min=1e-12)
    return group.base + float(params.get("lambda", 1.0)) * merged.reshape(group.base.shape)
