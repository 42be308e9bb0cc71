"""Causal-LM loss straight from the last hidden states, without materialising the logits.

A language model's output layer is the largest tensor of a fine-tuning step: 16 x 128 tokens over GPT-2's
50,257-word vocabulary are 412 MB of fp32 logits, and the usual loss then writes log-probabilities, their
gradient and the logits' gradient, each as large again. Like torchtune's chunked cross-entropy and Liger-Kernel's
fused linear cross-entropy (arXiv:2410.10989, Sec. 3.3), :func:`linear_cross_entropy` runs the output layer and
the loss a chunk of tokens at a time and, when a gradient will be needed, computes the gradient with respect to
the hidden states in the same pass: for a summed loss, d loss / d logits = softmax(logits) - onehot(target). Only
one chunk of logits exists at a time and no log-probabilities are stored for the backward pass, so the step
needs far less memory and makes fewer passes over it (numbers in docs/benchmarks.md).

:func:`hidden_and_head` gets the hidden states out of a Hugging Face causal LM without running its output
layer; :func:`head_is_plain` checks once per model that the model's logits really are ``head(hidden)`` (no
soft-capping or scaling after the head), so the trainer falls back to the plain loss where they are not.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GraftingError

IGNORE = -100
# logits per chunk (256 MB of fp32): the chunk's two output-layer GEMMs need many rows to run at full speed (at
# 4 M the GPT-2 benchmark step was 16% slower than the unchunked loss, at 64 M 4% faster), and memory still
# drops by ~1 GB there. 1,300 GPT-2 or 500 Llama-3 tokens per chunk.
CHUNK_ELEMENTS = 64 * 1024 * 1024


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``; gradients made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = _rows_per_chunk(vocab)
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden)
        w = weight.to(hidden.dtype)  # once, not per chunk (a no-op unless autocast made them differ)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=1)
            valid = t != IGNORE
            safe = torch.where(valid, t, 0)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, 0).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs.scatter_add_(1, safe[:, None], torch.full_like(picked[:, None], -1.0))
            probs.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)  # ignored tokens: no gradient
            d_logits = probs.to(hidden.dtype)
            grad_hidden[start:start + rows] = d_logits @ w
            if need_w:
                grad_weight.addmm_(probs.t(), h.float())
            if need_b:
                grad_bias += probs.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        _, need_w, need_b, _ = ctx.needs_input_grad
        w_dtype, b_dtype = ctx.dtypes
        return (grad_hidden * grad_out.to(grad_hidden.dtype),
                (grad_weight * grad_out).to(w_dtype) if need_w else None,
                (grad_bias * grad_out).to(b_dtype) if need_b else None,
                None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """sum over tokens of cross_entropy(hidden @ weight.T + bias, targets), ignoring targets equal to -100.

    ``hidden`` is (tokens, dim), ``weight`` (vocab, dim), ``targets`` (tokens,). Equal to
    ``F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")`` in value and gradients.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = _rows_per_chunk(weight.shape[0])
    for start in range(0, hidden.shape[0], rows):
        logits = F.linear(hidden[start:start + rows], weight, bias).float()
        total += F.cross_entropy(logits, targets[start:start + rows], ignore_index=IGNORE, reduction="sum")
    return total


@contextmanager
def _capture_input(head: nn.Module):
    """While active, ``head`` records its input and returns an empty tensor instead of running."""
    captured = {}

    def capture(x):
        captured["hidden"] = x
        return x.new_empty(*x.shape[:-1], 0)

    previous = head.__dict__.get("forward")  # an instance-level forward (accelerate's hooks) is put back
    head.forward = capture
    try:
        yield captured
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when it is a plain Linear (not adapted, not a trainable copy), else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    return head if type(head) is nn.Linear else None


def hidden_and_head(model: nn.Module, hf_model: nn.Module, **inputs) -> tuple[torch.Tensor, nn.Linear]:
    """Run ``model`` (the HF causal LM ``hf_model``, possibly wrapped) and return the output layer's input."""
    head = output_head(hf_model)
    with _capture_input(head) as captured:
        model(**inputs)
    if "hidden" not in captured:
        raise GraftingError(f"{type(hf_model).__name__} never called its output layer; use the plain loss")
    return captured["hidden"], head


@torch.no_grad()
def head_is_plain(model: nn.Module, hf_model: nn.Module, **inputs) -> bool:
    """Whether the model's logits equal ``head(hidden)`` on this input (no transform after the output layer).

    Runs in eval mode (dropout would make two forwards differ) and restores the training flags after.
    """
    if output_head(hf_model) is None:
        return False
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        logits = model(**inputs).logits
        hidden, head = hidden_and_head(model, hf_model, **inputs)
    except GraftingError:
        return False
    finally:
        for m, mode in modes.items():
            m.training = mode
    return logits.shape[:-1] == hidden.shape[:-1] and torch.allclose(
        head(hidden).float(), logits.float(), atol=1e-4, rtol=1e-4)
