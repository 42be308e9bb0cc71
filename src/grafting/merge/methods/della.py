"""della and della_linear: DELLA-Merging (Deep et al., "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", arXiv 2406.11617).

DELLA is Drop, Elect, Fuse. Drop is MAGPRUNE: rank each row's task-vector entries by magnitude and drop small ones
more often than large ones, then rescale the survivors (the paper by 1 / keep probability; mergekit, and so
grafting, by the L1 norm, see :mod:`grafting.merge.sparsify`). Elect and Fuse are TIES's sign election and
disjoint mean, and λ scales the result.

mergekit's parameterisation, which grafting follows: the keep probability runs linearly in the rank from
``density − epsilon`` (smallest) to ``density + epsilon`` (largest), so ``density`` is the mean kept fraction
and ``epsilon`` (default 0.15) the half-width; density ± epsilon must stay inside (0, 1). ``della`` defaults to
``normalize`` and ``rescale`` on; ``della_linear`` skips the election (plain task arithmetic of the pruned
vectors) with ``normalize`` off. Masks are drawn from ``group.generator`` in config order, with mergekit's draw.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..base import DENSITY, INT8_MASK, LAMBDA, NORMALIZE, RESCALE, WEIGHT, Param, TensorGroup, merge_method
from ..sparsify import drop_magprune
from .task_arithmetic import merge_task_vectors

EPSILON = Param("epsilon", float, 0.15, "model",
                "half-width of the keep probabilities around density, smallest to largest magnitude")


def _della(group: TensorGroup, params: dict, elect: str | None) -> torch.Tensor:
    return merge_task_vectors(
        group, params, elect=elect,
        trim=lambda tau, m: drop_magprune(tau, m.params["density"], m.params["epsilon"],
                                          generator=group.generator, rescale=params["rescale"]))


@merge_method("della", params=[WEIGHT, DENSITY, EPSILON, LAMBDA, NORMALIZE, RESCALE, INT8_MASK], needs_base=True,
              paper="Deep et al., arXiv 2406.11617 (DELLA: MAGPRUNE drop, elect, fuse)",
              summary="magnitude-ranked random drop and rescale, TIES sign election, disjoint mean")
def della(group: TensorGroup, params: dict) -> torch.Tensor:
    """DELLA: MAGPRUNE each τ_i, elect the sign by summed mass, average the agreeing entries."""
    return _della(group, params, elect="sum")


@merge_method("della_linear",
              params=[WEIGHT, DENSITY, EPSILON, LAMBDA, replace(NORMALIZE, default=False), RESCALE, INT8_MASK],
              needs_base=True,
              paper="Deep et al., arXiv 2406.11617 (MAGPRUNE drop, merged by task arithmetic)",
              summary="magnitude-ranked random drop and rescale, then task arithmetic")
def della_linear(group: TensorGroup, params: dict) -> torch.Tensor:
    """MAGPRUNE each τ_i, then θ_base + λ Σ_i w_i τ̂_i (no election)."""
    return _della(group, params, elect=None)
