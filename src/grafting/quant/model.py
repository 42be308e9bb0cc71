"""Quantize a model's linear layers to NF4 in place, and read off what a quantized model holds.

``quantize(model)`` follows transformers' bitsandbytes integration so a model quantized here and one quantized by
``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` hold the same layers: every
``nn.Linear`` and GPT-2 ``Conv1D`` (its weight transposed to (out, in) first, as transformers does) except the
output head, which QLoRA keeps in full precision.
"""

from __future__ import annotations

from torch import nn

from ..errors import GraftingError
from ..inject import name_matches
from ..layers import Conv1DKind, HostLayer
from .linear import NF4Linear
from .nf4 import BLOCK_SIZES

_CONV1D = Conv1DKind()


def _output_heads(model: nn.Module) -> set[int]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return set() if head is None else {id(head)}


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every plain linear layer a quantization can replace (Linear and GPT-2 Conv1D)."""
    return [(n, m) for n, m in model.named_modules()
            if n and (type(m) is nn.Linear or _CONV1D.matches(m))]


def quantize(model: nn.Module, targets=None, block_size: int = 64, double_quant: bool = True,
             skip=None, embeddings: bool = False) -> nn.Module:
    """Replace linear layers with :class:`NF4Linear`, in place; returns ``model``.

    ``targets``: None = every Linear / Conv1D but the output head; a list of module names (a name matches when
    equal to an entry or ending with "." + entry, as peft's ``target_modules``); or a regex matching the whole
    name. ``skip``: names (same rules) to keep in full precision. ``embeddings``: also the input embedding and
    the output head (grafting's extension, see quant/embedding.py; such a model cannot be saved as a
    bitsandbytes checkpoint). Quantize the base before adapting it.
    """
    if block_size not in BLOCK_SIZES:
        raise GraftingError(f"quantize: block_size must be one of {BLOCK_SIZES}, got {block_size}")
    if any(isinstance(m, HostLayer) for m in model.modules()):
        raise GraftingError("quantize: this model already holds adapters; quantize the base model first, then "
                            "adapt it (grafting.adapt) or load adapters onto it")
    chosen = quantizable(model, targets, skip)
    if not chosen:
        raise GraftingError(f"quantize: no linear layer matches targets={targets!r}"
                            + (f" (skip={skip!r})" if skip is not None else ""))
    for name, module in chosen:
        q = NF4Linear.from_linear(module, block_size, double_quant, transpose=not isinstance(module, nn.Linear))
        q.to(module.weight.device)
        q.compute_dtype = module.weight.dtype
        _replace(model, name, q)
    if embeddings:
        _quantize_embeddings(model, block_size, double_quant)
    return model


def _quantize_embeddings(model: nn.Module, block_size: int, double_quant: bool) -> None:
    from .embedding import NF4Embedding, tied_head

    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if not isinstance(emb, nn.Embedding):
        raise GraftingError("quantize(embeddings=True): the model has no nn.Embedding input embedding "
                            "(get_input_embeddings)")
    head = get_out() if callable(get_out) else None
    names = {id(m): n for n, m in model.named_modules()}
    new = NF4Embedding.from_embedding(emb, block_size, double_quant)
    new.compute_dtype = emb.weight.dtype
    _replace(model, names[id(emb)], new)
    if type(head) is nn.Linear:
        tied = head.weight is emb.weight
        q = tied_head(new, head.bias) if tied else NF4Linear.from_linear(head, block_size, double_quant)
        q.compute_dtype = head.weight.dtype
        _replace(model, names[id(head)], q)


def quantizable(model: nn.Module, targets=None, skip=None) -> list[tuple[str, nn.Module]]:
    """The layers ``quantize`` would replace (same arguments)."""
    heads = _output_heads(model)
    chosen = []
    for name, module in linear_modules(model):
        if targets is None and id(module) in heads:
            continue
        if targets is not None and not name_matches(targets, name):
            continue
        if skip is not None and name_matches(skip, name):
            continue
        chosen.append((name, module))
    return chosen


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def nf4_layers(model: nn.Module) -> list[tuple[str, NF4Linear]]:
    """(name, layer) of every NF4 layer, named as in the base model (host layers' ``base_layer`` step dropped)."""
    from ..model import AdaptedModel

    if isinstance(model, AdaptedModel):
        model = model.base_model
    out = []
    for name, m in model.named_modules():
        if isinstance(m, NF4Linear):
            out.append((name.replace(".base_layer", ""), m))
    return out


def quantized_nbytes(model: nn.Module) -> dict:
    """Bytes the model holds: its NF4 layers (codes and statistics; shared ones, as a tied head's, once), and
    every other parameter and buffer."""
    from .embedding import NF4Embedding

    quantized = [m for m in model.modules() if isinstance(m, (NF4Linear, NF4Embedding))]
    owned = {t.data_ptr(): t for m in quantized for t in m.buffers()}
    nf4 = sum(t.numel() * t.element_size() for t in owned.values())
    other = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                if t.data_ptr() not in owned)
    return {"nf4": nf4, "other": other, "total": nf4 + other}


def requantize_errors(model: nn.Module) -> dict[str, float]:
    """Relative error ||dequant(Q(W + ΔW)) - (W + ΔW)|| / ||W + ΔW|| of each NF4 layer a merge re-quantized."""
    return {n: m.requantize_error for n, m in nf4_layers(model) if m.requantize_error is not None}
