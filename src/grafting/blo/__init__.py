"""Bi-level optimization: outer parameters trained through the optimum of an inner problem.

``hypergradient`` and ``unrolled_hypergradient`` (in :mod:`grafting.blo.hypergrad`) are the functional core:
plain functions over tensors and loss callables, with no state. :class:`Engine` (in :mod:`grafting.blo.engine`)
trains :class:`Level` s with them: inner steps on one data stream, outer steps through the inner problem on
another.
"""

from __future__ import annotations

from .engine import ENGINE_METHODS, Engine, Level, fused_attention_has_double_backward
from .hypergrad import METHODS, NonFiniteHypergradient, hypergradient, unrolled_hypergradient

__all__ = ["ENGINE_METHODS", "METHODS", "Engine", "Level", "NonFiniteHypergradient", "fused_attention_has_double_backward",
           "hypergradient", "unrolled_hypergradient"]
