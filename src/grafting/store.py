"""The mixed-batch store of a whole model: every host layer's :class:`~grafting.stacks.LowRankStack` seen together.

A layer fills its own stack at its first mixed call (:mod:`grafting.batching`); what this module adds is what
only the model can do: reserve room in every layer ahead of serving, choose the store's dtype, and write a
call's new adapters into every layer before the call runs (:func:`write_new`). S-LoRA (arXiv:2311.03285,
section 4) preallocates its adapter memory the same way, so loading adapters while serving never reallocates.
:class:`~grafting.AdaptedModel`'s ``reserve``, ``set_stack_dtype`` and ``stack_adapters`` call these.
"""

from __future__ import annotations

import torch

from .batching import stack_for
from .errors import GraftingError
from .stacks import LowRankStack, bucket_of

STORE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8)


def reserve(model, adapters: int, rank: int) -> None:
    """Room for ``adapters`` adapters in ``rank``'s bucket of every layer's stack, and of stacks made later."""
    from .methods.lora import factor_dtype
    model._routing.reserved = (adapters, rank)
    for _, host in model.hosts():
        if host.kind.gathered:
            if host._stack is None:
                host._stack = LowRankStack(host.in_features, host.out_features,
                                           model._routing.stack_dtype or factor_dtype(host),
                                           host.dense_weight().device)
            host._stack.reserve(bucket_of(rank), adapters + 1)


def set_dtype(model, dtype: torch.dtype | None) -> None:
    """Keep the store's factors in ``dtype`` (None: the adapters' own); every stack is refilled on next use."""
    if dtype is not None and dtype not in STORE_DTYPES:
        raise GraftingError(f"set_stack_dtype: expected a floating-point dtype, torch.int8 or None, got {dtype!r}")
    model._routing.stack_dtype = dtype
    for _, host in model.hosts():  # refilled from the adapters themselves, not converted (lossless back)
        host._stack = None


@torch.no_grad()
def write(model, names: list, hashes: dict) -> None:
    """Every layer's stack holds the current factors of ``names`` (content ``hashes``)."""
    slot_of = model._routing.slot_of
    for _, host in model.hosts():
        present = [n for n in names if n in host.adapters and slot_of.get(n) is not None
                   and host.methods[n].low_rank_form]
        if host.kind.gathered and present:
            stack = stack_for(host, present[0])
            with stack.lock:
                stack.sync(host, present, {n: (*slot_of[n], hashes[n]) for n in present})


def write_new(model, hashes: dict) -> None:
    """Before a no-grad mixed call: write the call's adapters that the stacks do not hold yet into every
    layer's stack, one layer after another. Left to each layer's first call, the writes alternate with the
    layers' matmuls, which turn the caches over, and each ran about three times slower (measured: 50 against
    200 us per layer, a serving pool writing an adapter at each install). What was written is remembered per
    model (name -> slot and content hash); each layer still checks its own stack, so a stack emptied since (a
    deepcopy, a move) is refilled by its layer as before."""
    held = model.__dict__.get("_stacked")
    if held is None or held[0] != id(model):
        held = model.__dict__["_stacked"] = (id(model), {})
    slot_of, done = model._routing.slot_of, held[1]
    new = [n for n, h in hashes.items() if slot_of.get(n) is not None and done.get(n) != (slot_of[n], h)]
    if new:
        write(model, new, hashes)
        for n in new:
            done[n] = (slot_of[n], hashes[n])
