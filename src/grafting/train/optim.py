"""Optimizer groups from the adapter's parameter roles (``AdaptedModel.param_groups``).

Each role (``weights``, ``architecture`` such as DoRA's magnitudes, ``saved`` for modules trained in full,
``shared``, ``bias``) becomes one AdamW group; ``optim.group_lr`` sets a role's learning rate (``optim.head_lr``
is the older name for ``saved``). The schedule scales every group by the same factor, so the ratios between
groups hold throughout training. Bi-level recipes place these same groups at different levels.
"""

from __future__ import annotations

import torch

from ..errors import GraftingError


def build_optimizer(model, adapter: str, optim) -> tuple[torch.optim.Optimizer, list[float]]:
    """AdamW over the adapter's trainable parameters, one group per role; returns it and each group's lr ratio."""
    roles = model.param_groups(adapter)
    unknown = sorted(set(optim.group_lr) - set(roles))
    if unknown:
        raise GraftingError(f"recipe: optim.group_lr names role(s) {unknown} this adapter does not have; its "
                            f"trainable roles: {sorted(roles)}")
    groups, ratios = [], []
    for role, params in roles.items():
        lr = optim.group_lr.get(role) or (optim.head_lr if role == "saved" else None) or optim.lr
        groups.append({"params": params, "lr": lr, "role": role})
        ratios.append(lr / optim.lr)
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    return optimizer, ratios


def set_lr(optimizer: torch.optim.Optimizer, lr: float, ratios: list[float]) -> None:
    for group, ratio in zip(optimizer.param_groups, ratios):
        group["lr"] = lr * ratio
