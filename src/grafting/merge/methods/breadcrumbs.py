"""breadcrumbs and breadcrumbs_ties: Model Breadcrumbs (Davari & Belilovsky, arXiv 2312.06795).

Breadcrumbs sparsifies each task vector per layer with a mask that drops both tails of |τ|: the largest entries
(outliers that fine-tuning pushed far, which the paper finds harmful to merge) and the smallest (noise), and then
adds the masked task vectors with task arithmetic. ``breadcrumbs_ties`` adds TIES's sign election.

Parameters are mergekit's: ``gamma`` (default 0.01) is the fraction of largest entries dropped and ``density``
the fraction kept; the smallest 1 − density − gamma are dropped. When density + gamma > 1, density wins and fewer
outliers go. Both methods default to ``normalize`` and ``rescale`` off, as mergekit (breadcrumbs_ties too,
although ties normalizes by default).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..base import DENSITY, INT8_MASK, LAMBDA, NORMALIZE, RESCALE, WEIGHT, Param, TensorGroup, merge_method
from ..sparsify import trim_outliers
from .task_arithmetic import merge_task_vectors

GAMMA = Param("gamma", float, 0.01, "model", "fraction of this model's task vector dropped as largest outliers")

_PARAMS = [WEIGHT, DENSITY, GAMMA, LAMBDA, replace(NORMALIZE, default=False), replace(RESCALE, default=False),
           INT8_MASK]


def _breadcrumbs(group: TensorGroup, params: dict, elect: str | None) -> torch.Tensor:
    return merge_task_vectors(
        group, params, elect=elect,
        trim=lambda tau, m: trim_outliers(tau, m.params["density"], m.params["gamma"],
                                          rescale=params["rescale"]))


@merge_method("breadcrumbs", params=_PARAMS, needs_base=True,
              paper="Davari & Belilovsky, arXiv 2312.06795 (Model Breadcrumbs)",
              summary="drop the largest gamma and the smallest entries of each τ_i, then task arithmetic")
def breadcrumbs(group: TensorGroup, params: dict) -> torch.Tensor:
    """Model Breadcrumbs: both-tails magnitude mask on each τ_i, then θ_base + λ Σ_i w_i τ̂_i."""
    return _breadcrumbs(group, params, elect=None)


@merge_method("breadcrumbs_ties", params=_PARAMS, needs_base=True,
              paper="Davari & Belilovsky, arXiv 2312.06795, with TIES's election (arXiv 2306.01708)",
              summary="breadcrumbs mask, then TIES sign election")
def breadcrumbs_ties(group: TensorGroup, params: dict) -> torch.Tensor:
    """Breadcrumbs mask, then TIES's election and disjoint merge (summed unless ``normalize``)."""
    return _breadcrumbs(group, params, elect="sum")
