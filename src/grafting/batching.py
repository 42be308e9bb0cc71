"""Mixed batches: one adapter per row, in one forward, without a Python loop over adapters per layer.

S-LoRA (Sheng et al., 2023, arXiv:2311.03285) and Punica (Chen et al., 2023, arXiv:2310.18547) serve many LoRA
adapters in one batch by gathering each row's low-rank factors. Here every host layer keeps a
:class:`LowRankStack`: the factors of all its adapters stacked along a slot axis, rank-padded, with the scale
folded into B (and, for output-rescaling methods such as DoRA, a per-slot output factor g). A row's slot is
model-wide (slot 0 = no adapter), so one index tensor, built once per forward, serves every layer:

    delta[rows] = (x[rows] @ A_t[slot[rows]]) @ B_t[slot[rows]]                 (two batched matmuls)
    DoRA rows:    delta = (g - 1)·(base_out - b) + g·lowrank                     (g = 1 for plain LoRA)

When rows share adapters, each adapter's factors are gathered once and its rows are batched behind them
(rows grouped by slot, zero-padded to the largest group), so 64 rows over 8 adapters copy 8 sets of factors,
not 64.

Slots are filled and freed in place; a slot is refreshed when its adapter's parameters change (tracked by
tensor versions), so training between mixed forwards never serves stale factors. Layers whose kind has no
gathered kernel (Conv2d, Embedding) and differentiable (training) forwards group rows by adapter instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import GraftingError


@dataclass
class RowRouting:
    """Per-row routing for one forward, shared by every host layer."""

    names: list  # adapter name (or None) per row
    slots: torch.Tensor  # (rows,) int64, model-wide slot per row, 0 = base
    groups: dict = field(default_factory=dict)  # name -> LongTensor of row indices
    gathered: dict = field(default_factory=dict)  # id(host) -> (stack version, A, B, g, groups): see _gather_plan

    @classmethod
    def build(cls, names: list, slot_of: dict, device: torch.device) -> "RowRouting":
        slots, groups = [], {}
        for i, name in enumerate(names):
            slots.append(0 if name is None else slot_of[name])
            if name is not None:
                groups.setdefault(name, []).append(i)
        return cls(names=list(names),
                   slots=torch.tensor(slots, dtype=torch.long, device=device),
                   groups={n: torch.tensor(ix, dtype=torch.long, device=device) for n, ix in groups.items()})


class LowRankStack:
    """Stacked, rank-padded factors of one host layer's adapters, indexed by model-wide slot."""

    def __init__(self, fan_in: int, out: int, dtype: torch.dtype, device: torch.device):
        self.fan_in, self.out, self.dtype, self.device = fan_in, out, dtype, device
        self.capacity, self.rank = 0, 0
        self.version = 0  # bumped whenever a slot changes; keys the per-routing gathered factors
        with torch.inference_mode(False):
            self.A_t = torch.zeros(0, fan_in, 0, dtype=dtype, device=device)  # (slots, fan_in, r_pad)
            self.B_t = torch.zeros(0, 0, out, dtype=dtype, device=device)  # (slots, r_pad, out), scale folded in
            self.g = torch.ones(0, out, dtype=dtype, device=device)  # per-slot output factor
        self.keys: dict = {}  # adapter name -> (slot, version key)

    def _grow(self, capacity: int, rank: int) -> None:
        if capacity <= self.capacity and rank <= self.rank:
            return
        capacity = max(capacity, 2 * self.capacity if capacity > self.capacity else self.capacity)
        rank = max(rank, self.rank)
        # plain tensors even when the first mixed batch runs under inference_mode: slots are updated in place later
        with torch.inference_mode(False):
            A_t = torch.zeros(capacity, self.fan_in, rank, dtype=self.dtype, device=self.device)
            B_t = torch.zeros(capacity, rank, self.out, dtype=self.dtype, device=self.device)
            g = torch.ones(capacity, self.out, dtype=self.dtype, device=self.device)
            A_t[: self.capacity, :, : self.rank] = self.A_t
            B_t[: self.capacity, : self.rank] = self.B_t
            g[: self.capacity] = self.g
        self.A_t, self.B_t, self.g = A_t, B_t, g
        self.capacity, self.rank = capacity, rank
        self.version += 1

    @torch.no_grad()
    def free(self, name: str) -> None:
        entry = self.keys.pop(name, None)
        if entry is not None:
            slot = entry[0]
            with torch.inference_mode(False):
                self.A_t[slot].zero_()
                self.B_t[slot].zero_()
                self.g[slot].fill_(1.0)
            self.version += 1

    @torch.no_grad()
    def sync(self, host, names, slot_of: dict) -> bool:
        """Make the slots of ``names`` current. Returns whether any of them rescales the output."""
        rescales, stale = False, []
        for name in names:
            adapter, method = host.adapters[name], host.methods[name]
            rescales |= method.rescales_output
            key = (slot_of[name], _param_versions(adapter),
                   _param_versions(host.base_layer) if method.rescales_output else ())
            if self.keys.get(name) != key:
                stale.append((name, key))
        if not stale:
            return rescales
        factors = {name: host.methods[name].low_rank(host.adapters[name]) for name, _ in stale}
        self._grow(max(slot_of.values()) + 1, max(_padded(f[0].shape[0]) for f in factors.values()))
        with torch.inference_mode(False):
            for name, key in stale:
                A, B, scale = factors[name]
                slot, r = key[0], A.shape[0]
                self.A_t[slot].zero_()
                self.B_t[slot].zero_()
                self.A_t[slot, :, :r] = A.t().to(self.dtype)
                self.B_t[slot, :r] = (B.t() * scale).to(self.dtype)
                g = host.methods[name].output_scale(host.adapters[name], host)
                self.g[slot] = 1.0 if g is None else g.to(self.dtype)
                self.keys[name] = key
        self.version += 1
        return rescales


def _padded(r: int) -> int:
    return -(-r // 4) * 4  # 16-byte aligned rows for fp32 kernels


def _param_versions(module) -> tuple:
    out, todo = [], [module]
    while todo:  # a manual walk: named_parameters() is slow enough to show on every layer of every forward
        m = todo.pop()
        out.extend((id(p), p._version) for p in m._parameters.values() if p is not None)
        todo.extend(c for c in m._modules.values() if c is not None)
    return tuple(out)


def _needs_grad(host, names) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(p.requires_grad for n in names for p in host.adapters[n].parameters())


def _dropout_active(host, names) -> bool:
    return not all(host.methods[n].deterministic(host.adapters[n]) for n in names)


def mixed_forward(host, x: torch.Tensor, rows: RowRouting, *args, **kwargs) -> torch.Tensor:
    if host.merged:
        raise GraftingError(f"adapters {sorted(host.merged)} are merged into the base weights; "
                            "unmerge() before running a mixed batch")
    n = len(rows.names)
    if x.shape[0] != n:
        raise GraftingError(f"adapter_names has {n} entries but the batch has {x.shape[0]} rows")
    base_out = host.base_layer(x, *args, **kwargs)
    present = [name for name in rows.groups if name in host.adapters]
    if not present:
        return base_out
    low_rank = all(host.methods[name].low_rank_form for name in present)
    if host.kind.gathered and low_rank and not _needs_grad(host, present) and not _dropout_active(host, present):
        return _gathered(host, x, base_out, rows, present)
    # grouped: differentiable, and the path for kinds without a gathered kernel
    delta = torch.zeros_like(base_out)
    for name in present:
        idx = rows.groups[name]
        d = host.methods[name].delta(host.adapters[name], host, x.index_select(0, idx), base_out.index_select(0, idx))
        delta = delta.index_add(0, idx, d)
    return base_out + delta


def _gathered(host, x, base_out, rows: RowRouting, present) -> torch.Tensor:
    if host._stack is None:
        w = host.adapters[present[0]].lora_A
        host._stack = LowRankStack(host.in_features, host.out_features, w.dtype, w.device)
    stack = host._stack
    rescales = stack.sync(host, present, host._routing.slot_of)
    # one routing serves every decode step of a generate() call: gather each layer's factors once per routing
    cached = rows.gathered.get(id(host))
    if cached is None or cached[0] != stack.version:
        slots = rows.slots
        absent = [name for name in rows.groups if name not in host.adapters]
        if absent:  # rows whose adapter does not touch this layer read the zero slot
            slots = slots.clone()
            for name in absent:
                slots[rows.groups[name]] = 0
        cached = (stack.version, *_gather_plan(stack, slots))
        rows.gathered[id(host)] = cached
    _, A, B, g, groups = cached
    n = x.shape[0]
    xr = x.reshape(n, -1, x.shape[-1]).to(stack.dtype)
    if groups is None:
        low = torch.bmm(torch.bmm(xr, A), B)
    else:  # rows share adapters: each adapter's factors once, its rows stacked (zero-padded) behind it
        inverse, pos, most = groups
        xg = xr.new_zeros(A.shape[0], most, *xr.shape[1:])
        xg[inverse, pos] = xr
        lowg = torch.bmm(torch.bmm(xg.view(A.shape[0], -1, xr.shape[-1]), A), B)
        low = lowg.view(A.shape[0], most, xr.shape[1], -1)[inverse, pos]
    low = low.view(base_out.shape)
    if not rescales:
        return base_out + low.to(base_out.dtype)
    if groups is not None:
        g = g.index_select(0, groups[0])
    # out = g (W x + low) + b  =  g (base_out + low) + (1 - g) b
    g = g.view(n, *([1] * (base_out.dim() - 2)), -1).to(base_out.dtype)
    out = (base_out + low.to(base_out.dtype)) * g
    bias = host.kind.bias(host.base_layer)
    return out if bias is None else out + (1 - g) * bias


def _gather_plan(stack: LowRankStack, slots: torch.Tensor):
    """(A, B, g, groups) for rows with these slots: per-row factors, or per-adapter factors plus row groups.

    Rows in slot order read views of the stack. Otherwise, when rows share adapters (at least two rows per
    adapter on average), each adapter's factors are gathered once and its rows are batched together; copying
    every row's own factors would move (in + out)·r values per row, as much as a whole base weight at 64 rows.
    """
    first = int(slots[0])
    if first > 0 and torch.equal(slots, torch.arange(first, first + len(slots), device=slots.device)):
        picked = slice(first, first + len(slots))
        return stack.A_t[picked], stack.B_t[picked], stack.g[picked], None
    unique, inverse = torch.unique(slots, return_inverse=True)
    if 2 * len(unique) > len(slots):
        return stack.A_t.index_select(0, slots), stack.B_t.index_select(0, slots), stack.g.index_select(0, slots), None
    counts = torch.bincount(inverse, minlength=len(unique))
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(inverse)
    pos[order] = torch.arange(len(slots), device=slots.device) - starts[inverse[order]]
    groups = (inverse, pos, int(counts.max()))
    return stack.A_t.index_select(0, unique), stack.B_t.index_select(0, unique), stack.g.index_select(0, unique), groups


@dataclass
class Routing:
    """What the host layers of one model apply on this forward (shared object, one per AdaptedModel)."""

    active: tuple = ()
    enabled: bool = True
    rows: RowRouting | None = None
    slot_of: dict = field(default_factory=dict)  # adapter name -> model-wide slot (0 is the base)

    def assign_slot(self, name: str) -> int:
        used = set(self.slot_of.values())
        slot = next(s for s in range(1, len(used) + 2) if s not in used)
        self.slot_of[name] = slot
        return slot
