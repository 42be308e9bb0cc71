"""Bi-level optimization: outer parameters trained through the optimum of an inner problem.

``hypergradient`` and ``unrolled_hypergradient`` (in :mod:`grafting.blo.hypergrad`) are the functional core:
plain functions over tensors and loss callables, with no state, which the training engine builds on.
"""

from __future__ import annotations

from .hypergrad import METHODS, NonFiniteHypergradient, hypergradient, unrolled_hypergradient

__all__ = ["METHODS", "NonFiniteHypergradient", "hypergradient", "unrolled_hypergradient"]
