"""Mixed batches: one adapter per row, in one forward, without a Python loop over adapters per layer.

S-LoRA (Sheng et al., 2023, arXiv:2311.03285) and Punica (Chen et al., 2023, arXiv:2310.18547) serve many LoRA
adapters in one batch by gathering each row's low-rank factors. Here every host layer keeps a
:class:`LowRankStack`: the factors of all its adapters stacked along a slot axis, rank-padded, with the scale
folded into B (and, for output-rescaling methods such as DoRA, a per-slot output factor g). A row's slot is
model-wide (slot 0 = no adapter), so one index tensor, built once per forward, serves every layer:

    delta[rows] = (x[rows] @ A_t[slot[rows]]) @ B_t[slot[rows]]                 (two batched matmuls)
    DoRA rows:    delta = (g - 1)·(base_out - b) + g·lowrank                     (g = 1 for plain LoRA)

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
        self.A_t = torch.zeros(0, fan_in, 0, dtype=dtype, device=device)  # (slots, fan_in, r_pad)
        self.B_t = torch.zeros(0, 0, out, dtype=dtype, device=device)  # (slots, r_pad, out), scale folded in
        self.g = torch.ones(0, out, dtype=dtype, device=device)  # per-slot output factor
        self.keys: dict = {}  # adapter name -> (slot, version key)

    def _grow(self, capacity: int, rank: int) -> None:
        capacity = max(capacity, self.capacity)
        rank = max(rank, self.rank)
        if capacity == self.capacity and rank == self.rank:
            return
        A_t = torch.zeros(capacity, self.fan_in, rank, dtype=self.dtype, device=self.device)
        B_t = torch.zeros(capacity, rank, self.out, dtype=self.dtype, device=self.device)
        g = torch.ones(capacity, self.out, dtype=self.dtype, device=self.device)
        A_t[: self.capacity, :, : self.rank] = self.A_t
        B_t[: self.capacity, : self.rank] = self.B_t
        g[: self.capacity] = self.g
        self.A_t, self.B_t, self.g = A_t, B_t, g
        self.capacity, self.rank = capacity, rank

    def free(self, name: str) -> None:
        entry = self.keys.pop(name, None)
        if entry is not None:
            slot = entry[0]
            self.A_t[slot].zero_()
            self.B_t[slot].zero_()
            self.g[slot].fill_(1.0)

    @torch.no_grad()
    def sync(self, host, names, slot_of: dict) -> bool:
        """Make the slots of ``names`` current. Returns whether any of them rescales the output."""
        rescales = False
        for name in names:
            adapter, method = host.adapters[name], host.methods[name]
            slot = slot_of[name]
            rescales |= method.rescales_output
            key = (slot, _param_versions(adapter), _param_versions(host.base_layer) if method.rescales_output else ())
            if self.keys.get(name) == key:
                continue
            A, B, scale = method.low_rank(adapter)
            r = A.shape[0]
            self._grow(max(slot + 1, self.capacity), _padded(r))
            self.A_t[slot].zero_()
            self.B_t[slot].zero_()
            self.A_t[slot, :, :r] = A.t().to(self.dtype)
            self.B_t[slot, :r] = (B.t() * scale).to(self.dtype)
            g = method.output_scale(adapter, host)
            self.g[slot] = 1.0 if g is None else g.to(self.dtype)
            self.keys[name] = key
        return rescales


def _padded(r: int) -> int:
    return -(-r // 4) * 4  # 16-byte aligned rows for fp32 kernels


def _param_versions(module) -> tuple:
    return tuple((id(p), p._version) for p in module.parameters())


def _needs_grad(host, names) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(p.requires_grad for n in names for p in host.adapters[n].parameters())


def _dropout_active(host, names) -> bool:
    return host.training and any(getattr(host.adapters[n], "lora_dropout", None) is not None
                                 and not isinstance(host.adapters[n].lora_dropout, torch.nn.Identity)
                                 for n in names)


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
    low_rank = all(host.methods[name].low_rank(host.adapters[name]) is not None for name in present)
    if host.kind.gathered and low_rank and not _needs_grad(host, present) and not _dropout_active(host, present):
        return base_out + _gathered_delta(host, x, base_out, rows, present)
    # grouped: differentiable, and the path for kinds without a gathered kernel
    delta = torch.zeros_like(base_out)
    for name in present:
        idx = rows.groups[name]
        d = host.methods[name].delta(host.adapters[name], host, x.index_select(0, idx), base_out.index_select(0, idx))
        delta = delta.index_add(0, idx, d)
    return base_out + delta


def _gathered_delta(host, x, base_out, rows: RowRouting, present) -> torch.Tensor:
    routing = host._routing
    if host._stack is None:
        w = host.adapters[present[0]].lora_A
        host._stack = LowRankStack(host.in_features, host.out_features, w.dtype, w.device)
    stack = host._stack
    # rows whose adapter does not touch this layer must read a zero slot
    slots = rows.slots
    absent = [name for name in rows.groups if name not in host.adapters]
    if absent:
        slots = slots.clone()
        for name in absent:
            slots[rows.groups[name]] = 0
    rescales = stack.sync(host, present, routing.slot_of)
    n = x.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1]).to(stack.dtype)
    low = torch.bmm(torch.bmm(x3, stack.A_t.index_select(0, slots)), stack.B_t.index_select(0, slots))
    low = low.view(base_out.shape)
    if not rescales:
        return low.to(base_out.dtype)
    g = stack.g.index_select(0, slots).view(n, *([1] * (base_out.dim() - 2)), -1)
    bias = host.kind.bias(host.base_layer)
    plain = base_out if bias is None else base_out - bias
    return ((g - 1) * plain + g * low).to(base_out.dtype)


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
