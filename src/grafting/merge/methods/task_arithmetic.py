"""task_arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", arXiv 2212.04089), and the merge
every method of its family shares.

Task arithmetic, Sec. 2 of the paper: a task vector is τ_i = θ_i − θ_base, and adding task vectors edits the base,
θ = θ_base + λ Σ_i w_i τ_i. TIES, DARE, Model Breadcrumbs and DELLA are this sum with two changes, which
:func:`merge_task_vectors` takes as arguments: each τ_i is first trimmed (:mod:`grafting.merge.sparsify`), and an
optional sign election keeps, per entry, only the task vectors that agree with the elected sign.

The arithmetic is mergekit's ``GeneralizedTaskArithmeticMerge``, so a shared config gives the same tensors:
- trim τ_i, then weight it by w_i; the sign election sees the weighted vectors;
- ``normalize`` divides by the weights of the contributing models: with an election, per entry, the weights of
  the models that agree (TIES's disjoint mean; a divisor of exactly 0 becomes 1); without, Σ_i w_i (left at 1
  when |Σ w_i| < 1e-8, so opposite weights that cancel do not blow up);
- then λ scales the merged task vector and it is added to the base.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from ...errors import GraftingError
from ..base import DENSITY, INT8_MASK, LAMBDA, NORMALIZE, RESCALE, WEIGHT, ModelTensor, TensorGroup, merge_method
from ..sparsify import SLICE, elect_sign

Trim = Callable[[torch.Tensor, ModelTensor], torch.Tensor]


def merge_task_vectors(group: TensorGroup, params: dict, *, trim: Trim | None = None,
                       elect: str | None = None) -> torch.Tensor:
    """θ_base + λ · Σ_i w_i trim(τ_i) [· elected] / divisor, as the module docstring describes.

    ``trim(tau, model)`` sparsifies one model's task vector and may do so in place (``tau`` is the caller's to
    overwrite; it may read ``model.params``); ``elect`` is ``"sum"`` / ``"count"`` (see
    :func:`~grafting.merge.sparsify.elect_sign`) or None for no sign election. ``params`` needs ``lambda`` and
    ``normalize``.

    Memory: with an owned group (the merge driver's) the task vectors are made in place of the models' tensors,
    the election and the mean run slice by slice, and the result overwrites the first task vector, so the whole
    merge needs the inputs plus a few slices (plus what ``trim`` allocates)."""
    if not group.models:
        return group.base.clone()
    if elect not in (None, "sum", "count"):
        raise GraftingError(f"unknown sign election '{elect}'; expected 'sum' or 'count'")
    weights = [m.params["weight"] for m in group.models]
    taus = []
    for m, tau in zip(group.models, group.take_task_vectors()):
        tau = trim(tau, m) if trim else tau
        taus.append(tau.mul_(tau.new_tensor(m.params["weight"])).reshape(-1))
    base = group.base.reshape(-1)
    out = taus[0]
    if elect is None:  # the weight sum in the tensors' precision, as mergekit divides by it
        total = float(torch.tensor(weights, dtype=out.dtype).sum())
        divisor = total if (params["normalize"] and abs(total) >= 1e-8) else 1.0
    for sl in (slice(s, min(s + SLICE, out.numel())) for s in range(0, out.numel(), SLICE)):
        parts = [t[sl] for t in taus]
        if elect is None:
            merged = parts[0].clone()
            for p in parts[1:]:
                merged.add_(p)
            if divisor != 1.0:
                merged.div_(divisor)
        else:
            merged = torch.zeros_like(parts[0])
            div = torch.zeros_like(parts[0])
            for w, p, agree in zip(weights, parts, elect_sign(parts, elect)):
                merged.add_(p * agree)
                div.add_(agree, alpha=w)
            if params["normalize"]:
                div[div == 0] = 1
                merged.div_(div)
        out[sl] = base[sl] + params["lambda"] * merged  # this slice of the first task vector is no longer read
    return out.view(group.base.shape)


@merge_method(
    "task_arithmetic",
    params=[WEIGHT,
            replace(DENSITY, doc="accepted as mergekit does; task_arithmetic trims nothing"),
            LAMBDA,
            replace(NORMALIZE, default=False),
            replace(RESCALE, default=False, doc="accepted as mergekit does; task_arithmetic trims nothing"),
            INT8_MASK],
    needs_base=True,
    paper="Ilharco et al., arXiv 2212.04089, Sec. 2",
    summary="base + λ Σ w_i τ_i (divided by Σ w_i with normalize)",
)
def task_arithmetic(group: TensorGroup, params: dict) -> torch.Tensor:
    """θ_base + λ Σ_i w_i τ_i (Ilharco et al., Sec. 2); ``normalize`` (default off, as mergekit) divides by
    Σ_i w_i. mergekit declares ``density``, ``rescale`` and ``int8_mask`` for every method of the family, this
    one included, and ignores them here; grafting accepts them likewise so mergekit configs run unchanged."""
    return merge_task_vectors(group, params)
