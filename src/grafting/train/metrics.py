"""Task metrics (accuracy, macro-F1, perplexity) and which direction is better."""

from __future__ import annotations

import math

import torch

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "loss": False, "perplexity": False}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, loss_sum: float) -> dict:
    pred = logits.argmax(-1)
    n = labels.numel()
    num_classes = logits.shape[-1]
    f1s = []
    for c in range(num_classes):
        tp = ((pred == c) & (labels == c)).sum().item()
        fp = ((pred == c) & (labels != c)).sum().item()
        fn = ((pred != c) & (labels == c)).sum().item()
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": (pred == labels).float().mean().item(), "f1": sum(f1s) / max(len(f1s), 1),
            "loss": loss_sum / max(n, 1)}


def lm_metrics(loss_sum: float, tokens: int) -> dict:
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def improved(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new > best if HIGHER_IS_BETTER[metric] else new < best
