"""LiNeS: scale the merged task vector linearly with depth, so shallow layers stay near the base.

Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging",
arXiv 2410.17146: the task vector's block ℓ of L residual blocks is scaled by

    λ(ℓ) = α + β · (ℓ − 1) / (L − 1),       ℓ = 1 … L

so the first block gets α and the last α + β. For multi-task merging the scaling is applied to the
task-arithmetic multi-task vector, here with a per-model weight:

    θ = θ_0 + λ(ℓ) · Σ_i w_i τ_i,          τ_i = θ_i − θ_0

With the driver's 0-based ``group.layer``, (ℓ − 1)/(L − 1) is ``group.t``.

Choices, following the official code (github.com/wang-kee/LiNeS, ``src/eval/eval.py``):

* tensors outside the layer stack (embeddings, final norm, head) are scaled by α, the first block's factor
  ("scale with alpha for layers outside residual blocks"); so is every tensor of a one-block model;
* ``alpha`` left unset is the official multi-task choice α = ‖Σ_i τ_i‖₁ / ‖τ_MTL‖₁ · 1/T, τ_MTL the
  merged multi-task vector. For task arithmetic with equal weights w that ratio is 1/w, so α = 1/Σ_i w_i
  exactly (1/T for unit weights: the shallowest block gets the plain average of the task vectors). With
  unequal weights we keep 1/Σ_i w_i: the official ratio is over the whole model's L1 norms, which a
  tensor-by-tensor merge cannot see;
* ``beta`` has no default: the paper tunes it on validation data (the official grid is 0.1 … 1.0 for
  merging; for editing one fine-tuned model it sets β = 1 − α with α swept in [0, 1]).
"""

from __future__ import annotations

import torch

from ...errors import GraftingError
from ..base import Param, TensorGroup, merge_method

WEIGHT = Param("weight", float, 1.0, "model", "scale of this model's task vector in Σ w_i τ_i (the paper sums them)")
ALPHA = Param("alpha", float, None, "global",
              "scale of the first block (and of tensors outside the blocks); unset: 1 / Σ w_i, the paper's "
              "multi-task choice")
BETA = Param("beta", float, scope="global", doc="extra scale of the last block over the first (λ(L) = α + β)")


def lines_scale(alpha: float, beta: float, layer: int | None, num_layers: int | None) -> float:
    """λ(ℓ) = α + β (ℓ − 1)/(L − 1) for 0-based block ``layer`` of ``num_layers``; α outside the stack."""
    if layer is None or not num_layers or num_layers < 2:
        return alpha
    return alpha + beta * layer / (num_layers - 1)


@merge_method("lines", params=[WEIGHT, ALPHA, BETA], needs_base=True,
              paper="Wang et al., arXiv 2410.17146 (λ(ℓ) = α + β(ℓ−1)/(L−1)), on task arithmetic",
              summary="θ_base + (α + β·(ℓ−1)/(L−1)) Σ w_i τ_i, α outside the layer stack")
def lines(group: TensorGroup, params: dict) -> torch.Tensor:
    weights = [float(m.params.get("weight", 1.0)) for m in group.models]
    alpha = params.get("alpha")
    if alpha is None:
        total = sum(weights)
        if abs(total) < 1e-8:
            raise GraftingError(f"{group.name}: lines with alpha unset uses 1 / Σ weight, but the weights sum "
                                "to 0; set alpha")
        alpha = 1.0 / total
    scale = lines_scale(float(alpha), float(params["beta"]), group.layer, group.num_layers)
    merged = sum(w * tau for w, (_, tau) in zip(weights, group.task_vectors()))
    return group.base + scale * merged
