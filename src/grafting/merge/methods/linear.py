"""linear: the weighted average of the models' tensors (a "model soup", Wortsman et al., arXiv 2203.05482).

θ = Σ_i w_i θ_i / Σ_i w_i with ``normalize`` (default on), Σ_i w_i θ_i without, as mergekit's ``linear``.
Where mergekit would divide by a zero weight sum and write inf/NaN into the model, grafting refuses.

Linear has no base: mergekit's ``linear`` ignores a ``base_model``'s special role and averages it as one more
weighted input. This function averages ``group.models`` and never reads ``group.base``, so for mergekit's result
a base model that is listed among the inputs must reach it in ``group.models``, with its weight.
"""

from __future__ import annotations

import torch

from ...errors import GraftingError
from ..base import NORMALIZE, WEIGHT, TensorGroup, merge_method


@merge_method("linear", params=[WEIGHT, NORMALIZE], needs_base=False,
              paper="Wortsman et al., arXiv 2203.05482 (model soups)",
              summary="Σ w_i θ_i, divided by Σ w_i with normalize")
def linear(group: TensorGroup, params: dict) -> torch.Tensor:
    """Weighted sum of the models' tensors, divided by the weight sum when ``normalize``."""
    weights = [m.params["weight"] for m in group.models]
    merged = torch.zeros_like(group.models[0].tensor)
    for m, w in zip(group.models, weights):
        merged.add_(m.tensor, alpha=w)
    if params["normalize"]:
        total = sum(weights)
        if total == 0:
            raise GraftingError(f"{group.name}: linear with normalize: the weights {weights} sum to 0; "
                                f"set normalize: false or change the weights")
        merged.div_(total)
    return merged
