"""ties: TIES-Merging (Yadav et al., "Resolving Interference When Merging Models", arXiv 2306.01708).

Algorithm 1 of the paper, per parameter tensor:
1. Trim: keep the top ``density`` fraction of each τ_i by magnitude (the paper's k%), zero the rest;
2. Elect: γ = sgn(Σ_i τ̂_i), the sign carrying the most total mass;
3. Disjoint merge: average, per entry, only the τ̂_i whose sign is γ; θ = θ_base + λ τ_m.

As in mergekit's ``ties``: the weights w_i scale τ̂_i before the election, ``normalize`` (default on) makes the
average a weighted mean over the agreeing models (so with w_i = 1 it is the paper's disjoint mean, and with it
off the agreeing vectors are summed), and ``rescale`` (default off) may L1-rescale the trimmed vectors.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..base import DENSITY, INT8_MASK, LAMBDA, NORMALIZE, RESCALE, WEIGHT, TensorGroup, merge_method
from ..sparsify import trim_magnitude
from .task_arithmetic import merge_task_vectors


@merge_method(
    "ties",
    params=[WEIGHT, DENSITY, LAMBDA, NORMALIZE, replace(RESCALE, default=False), INT8_MASK],
    needs_base=True,
    paper="Yadav et al., arXiv 2306.01708, Algorithm 1",
    summary="top-k trim, sign election by summed mass, disjoint mean",
)
def ties(group: TensorGroup, params: dict) -> torch.Tensor:
    """TIES-Merging: trim by magnitude, elect the sign by summed mass, average the agreeing entries."""
    return merge_task_vectors(
        group, params, elect="sum",
        trim=lambda tau, m: trim_magnitude(tau, m.params["density"], rescale=params["rescale"], inplace=True))
