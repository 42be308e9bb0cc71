"""The torch path of mixed batches: each rank bucket's rows run two batched matmuls over gathered factors.

Where the compiled kernel (:mod:`grafting.kernels`) cannot run a mixed call (gradients on, DoRA's output
factor, no C compiler, activations other than fp32), :mod:`grafting.batching` hands it here. Per bucket, a
*plan* says where the rows' factors come from, following S-LoRA's gather (arXiv:2311.03285): views of the
stack when rows are in slot order, one copy per adapter with its rows stacked behind it when rows share
adapters, a :class:`~grafting.stacks.RowBank` for decode rows with mostly distinct adapters, a copy per row
otherwise. Plans are kept per stack and slot pattern while no slot changes, so a decode loop re-gathers only
when its batch changes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .stacks import PLANS_KEPT, RowBank, _Bucket


@dataclass(frozen=True)
class BankPlan:
    """Rows read their factors from a row bank, filled when the call runs (see :class:`RowBank`)."""

    bank: RowBank
    bucket: _Bucket
    slots: list


def torch_rows(host, x, base_out, rows, stack, present: list, rescales: bool, cacheable: bool) -> torch.Tensor:
    """The low-rank part of a mixed call through torch's batched matmuls, for the rows of ``present``: per
    rank bucket, a plan of gathered factors (kept per stack across calls) applied to the bucket's rows. Runs
    under the stack's lock (row banks change)."""
    one_token = x.dim() > 1 and x[0].numel() == x.shape[-1]  # decode: a row bank beats re-gathering per call
    plans = []
    for b, (row_idx, slots, bnames) in rows.buckets.items():
        here = [n for n in bnames if n in present]
        if not here:
            continue
        cached = rows.gathered.get((id(host), b))
        if cached is None or cached[0] != stack.version:
            slots = layer_slots(rows, row_idx, slots, bnames, present)
            key = (one_token, slots.cpu().numpy().tobytes())
            kept = stack.plans.setdefault(b, OrderedDict())
            hit = kept.get(key)
            if hit is None or hit[0] != stack.version:
                bank = stack.banks.setdefault(b, RowBank()) if one_token else None
                hit = kept[key] = (stack.version, _gather_plan(stack.buckets[b], slots, bank))
                while len(kept) > PLANS_KEPT:
                    kept.popitem(last=False)
            kept.move_to_end(key)
            cached = hit
            rows.gathered[(id(host), b)] = cached
        plans.append((row_idx, cached[1]))
    if cacheable and rows.key is not None:
        stack.remember(rows.key, (rescales, plans))
    return apply_plans(x, base_out, rescales, plans, host)


def layer_slots(rows, row_idx, slots: torch.Tensor, bnames: list, present: list) -> torch.Tensor:
    """The bucket's slots for this layer: rows whose adapter does not touch it (or is grouped) read slot 0."""
    absent = [n for n in bnames if n not in present]
    if not absent:
        return slots
    slots = slots.clone()
    for name in absent:
        pos = rows.index(name) if row_idx is None else torch.nonzero(torch.isin(row_idx, rows.index(name))).flatten()
        slots[pos] = 0
    return slots


def run_of_slots(slots: torch.Tensor) -> bool:
    """Rows whose slots run consecutively from a real one: they read a view of the stack."""
    first = int(slots[0])
    return first > 0 and torch.equal(slots, torch.arange(first, first + len(slots), device=slots.device))


def apply_plans(x, base_out, rescales: bool, plans: list, host) -> torch.Tensor:
    """The low-rank part of a mixed call from its plans; runs under the stack's lock (row banks change)."""
    n = x.shape[0]
    plans = [_bank_rows(row_idx, p, n, x.device) if isinstance(p, BankPlan) else (row_idx, p) for row_idx, p in plans]
    A0 = plans[0][1][0]
    xr = x.reshape(n, -1, x.shape[-1]).to(A0.dtype)
    if len(plans) == 1 and plans[0][0] is None and plans[0][1][3] is None and not rescales \
            and base_out.dtype == A0.dtype:  # every row in one bucket, own factors: the add fused into the bmm
        _, (A, B, _, _) = plans[0]
        return torch.baddbmm(base_out.reshape(n, -1, base_out.shape[-1]), torch.bmm(xr, A), B).view(base_out.shape)
    if not rescales and not torch.is_grad_enabled():  # each bucket's rows added into the fresh base output
        out = base_out.reshape(n, xr.shape[1], -1)
        for row_idx, (A, B, _, groups) in plans:
            low = _lowrank_rows(xr if row_idx is None else xr.index_select(0, row_idx), A, B, groups)
            out = out.add_(low.to(out.dtype)) if row_idx is None else out.index_add_(0, row_idx, low.to(out.dtype))
        return out.view(base_out.shape)
    low_all, g_all = None, None
    for row_idx, (A, B, g, groups) in plans:
        xb = xr if row_idx is None else xr.index_select(0, row_idx)
        low = _lowrank_rows(xb, A, B, groups)
        if groups is not None and rescales:
            g = g.index_select(0, groups[0])
        if row_idx is None:
            low_all, g_all = low, g
            continue
        if low_all is None:
            low_all = xr.new_zeros(n, xr.shape[1], low.shape[-1])
            g_all = xr.new_ones(n, low.shape[-1]) if rescales else None
        low_all.index_copy_(0, row_idx, low)
        if rescales:
            g_all.index_copy_(0, row_idx, g)
    low = low_all.view(base_out.shape)
    if not rescales:
        return base_out + low.to(base_out.dtype)
    # out = g (W x + low) + b  =  g (base_out + low) + (1 - g) b
    g = g_all.view(n, *([1] * (base_out.dim() - 2)), -1).to(base_out.dtype)
    out = (base_out + low.to(base_out.dtype)) * g
    bias = host.kind.bias(host.base_layer)
    return out if bias is None else out + (1 - g) * bias


def _bank_rows(row_idx, plan: BankPlan, n: int, device) -> tuple:
    """(rows in bank order, factors): the bank decides which position serves which row."""
    order, factors = plan.bank.rows(plan.bucket, plan.slots)
    if row_idx is None and order == list(range(n)):
        return None, factors
    base = list(range(n)) if row_idx is None else row_idx.tolist()
    return torch.tensor([base[i] for i in order], dtype=torch.long, device=device), factors


def _lowrank_rows(xr: torch.Tensor, A: torch.Tensor, B: torch.Tensor, groups) -> torch.Tensor:
    if groups is None:
        return torch.bmm(torch.bmm(xr, A), B)
    # rows share adapters: each adapter's factors once, its rows stacked (zero-padded) behind it
    inverse, pos, most = groups
    xg = xr.new_zeros(A.shape[0], most, *xr.shape[1:])
    xg[inverse, pos] = xr
    lowg = torch.bmm(torch.bmm(xg.view(A.shape[0], -1, xr.shape[-1]), A), B)
    return lowg.view(A.shape[0], most, xr.shape[1], -1)[inverse, pos]


def _gather_plan(bucket: _Bucket, slots: torch.Tensor, bank: RowBank | None = None):
    """(A, B, g, groups) for rows with these slots: per-row factors, or per-adapter factors plus row groups.

    Rows in slot order read views of the stack. Otherwise, when rows share adapters (at least two rows per
    adapter on average), each adapter's factors are gathered once and its rows are batched together; copying
    every row's own factors would move (in + out)·r values per row, as much as a whole base weight at 64 rows.
    Mostly distinct adapters: the row bank when one is given (decode), else a copy per row (prefill, where
    many tokens per row share the copy).
    """
    if run_of_slots(slots):
        first = int(slots[0])
        picked = slice(first, first + len(slots))
        return (*bucket.factors(picked), None)
    unique, inverse = torch.unique(slots, return_inverse=True)
    if 2 * len(unique) > len(slots):
        if bank is not None:
            return BankPlan(bank, bucket, slots.tolist())
        return (*bucket.factors(slots), None)
    counts = torch.bincount(inverse, minlength=len(unique))
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(inverse)
    pos[order] = torch.arange(len(slots), device=slots.device) - starts[inverse[order]]
    groups = (inverse, pos, int(counts.max()))
    return (*bucket.factors(unique), groups)
