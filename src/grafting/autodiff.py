"""Is anything differentiating through this forward? One question asked by every shortcut that drops derivatives.

Shortcuts (the per-call fold of ΔW into the weight, cached DoRA norms) are exact in value but not in
derivatives. They must never engage when reverse mode records a graph, when forward mode (``torch.func.jvp``,
``torch.autograd.forward_ad``) carries tangents, or inside any functorch transform (``grad``, ``vmap``,
``hessian``), where ``requires_grad`` reads False on the wrapped tensors.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD


def transforms_active() -> bool:
    """A functorch transform or a forward-mode dual level is active."""
    return torch._C._functorch.maybe_current_level() is not None or fwAD._current_level >= 0


def tracking_derivatives(*tensors: torch.Tensor) -> bool:
    """Some derivative (reverse, forward or higher order) of these tensors is being built right now."""
    if transforms_active():
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
