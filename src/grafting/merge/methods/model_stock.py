"""Model Stock: pull the average of k fine-tuned models back toward the base by an angle-derived ratio.

Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", arXiv 2403.19522: with
θ̄ = (1/k) Σ θ_i the average of k models fine-tuned from θ_0 and θ the angle between their offsets
θ_i − θ_0, the point of their span closest to the centre of the fine-tuned weight distribution is

    θ_H = t · θ̄ + (1 − t) · θ_0,      t = k cos θ / (1 + (k − 1) cos θ)

(k = 2: t = 2 cos θ / (1 + cos θ)). The paper applies it layer-wise; here, as in mergekit, per tensor.
Behaviour matched to mergekit's ``model_stock`` (merge_methods/model_stock.py):

* the paper assumes one common angle between every pair; with k > 2 models cos θ is the *mean* of the
  pairwise cosines;
* ``filter_wise: true`` computes one cos θ (hence one t) per vector along the tensor's last axis (for a
  Linear weight, per output row); a 1-D tensor is one vector either way;
* a norm product below 1e-6 is clamped to 1e-6 (an unchanged tensor gives cos θ = 0, t = 0);
* where 1 + (k − 1) cos θ is within 1e-6 of zero (opposing offsets) there is no finite estimate, and the
  base is kept (t = 0) rather than an exploding extrapolation.
"""

from __future__ import annotations

import torch

from ..base import Param, TensorGroup, merge_method

FILTER_WISE = Param("filter_wise", bool, False, "global",
                    "one interpolation ratio per vector along the last axis instead of one per tensor")


def model_stock_ratio(cos_theta: torch.Tensor, k: int) -> torch.Tensor:
    """t = k cos θ / (1 + (k − 1) cos θ), and 0 where the denominator vanishes."""
    denominator = 1 + (k - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), k * cos_theta / safe)


def mean_pairwise_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs i < j of cos(offset_i, offset_j), along the last axis."""
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1.0, 1.0))
    return torch.stack(cosines).mean(dim=0)


@merge_method("model_stock", params=[FILTER_WISE], needs_base=True, min_models=2,
              paper="Jang et al., arXiv 2403.19522 (t = k cosθ / (1 + (k−1) cosθ)); mergekit's model_stock",
              summary="t·mean(θ_i) + (1−t)·θ_base, t from the mean angle between the task vectors")
def model_stock(group: TensorGroup, params: dict) -> torch.Tensor:
    shape = group.base.shape
    if params.get("filter_wise", False):
        # A 1-D tensor has no filters: it is one vector, as in mergekit.
        w0 = group.base if group.base.dim() > 1 else group.base.unsqueeze(0)
        ws = [m.tensor.reshape(w0.shape) for m in group.models]
    else:
        w0 = group.base.reshape(-1)
        ws = [m.tensor.reshape(-1) for m in group.models]
    k = len(ws)
    t = model_stock_ratio(mean_pairwise_cosine([w - w0 for w in ws]), k).unsqueeze(-1)
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)
