"""dare_linear and dare_ties: DARE, Drop And REscale (Yu et al., "Language Models are Super Mario", arXiv
2311.03099).

DARE sparsifies each task vector before merging: every entry is dropped with probability p (here
p = 1 − ``density``) by a Bernoulli mask and the survivors are rescaled so the vector keeps its size (the paper
divides by 1 − p; mergekit, and so grafting, matches the L1 norm, see :mod:`grafting.merge.sparsify`). The paper
then merges the sparsified vectors with task arithmetic or TIES; mergekit names the two ``dare_linear`` and
``dare_ties``, and both default to ``rescale`` on and ``normalize`` off (unlike ``ties``, whose normalize is on).

The masks are drawn from ``group.generator``, one model after another in config order, with mergekit's draw
(``torch.bernoulli`` of a tensor filled with the density): seeding both the same way gives identical masks.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..base import DENSITY, INT8_MASK, LAMBDA, NORMALIZE, RESCALE, WEIGHT, TensorGroup, merge_method
from ..sparsify import drop_random
from .task_arithmetic import merge_task_vectors

_PARAMS = [WEIGHT, DENSITY, LAMBDA, replace(NORMALIZE, default=False), RESCALE, INT8_MASK]


def _dare(group: TensorGroup, params: dict, elect: str | None) -> torch.Tensor:
    return merge_task_vectors(
        group, params, elect=elect,
        trim=lambda tau, m: drop_random(tau, m.params["density"], generator=group.generator,
                                        rescale=params["rescale"]))


@merge_method("dare_linear", params=_PARAMS, needs_base=True,
              paper="Yu et al., arXiv 2311.03099 (DARE, merged by task arithmetic)",
              summary="random drop and rescale of each τ_i, then task arithmetic")
def dare_linear(group: TensorGroup, params: dict) -> torch.Tensor:
    """DARE then task arithmetic: θ_base + λ Σ_i w_i DARE(τ_i)."""
    return _dare(group, params, elect=None)


@merge_method("dare_ties", params=_PARAMS, needs_base=True,
              paper="Yu et al., arXiv 2311.03099 (DARE, merged by TIES, arXiv 2306.01708)",
              summary="random drop and rescale of each τ_i, then TIES sign election")
def dare_ties(group: TensorGroup, params: dict) -> torch.Tensor:
    """DARE then TIES's election and disjoint merge (summed, not averaged, unless ``normalize``)."""
    return _dare(group, params, elect="sum")
