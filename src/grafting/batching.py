"""Mixed batches: one adapter per row, in one forward, without a Python loop over adapters per layer.

S-LoRA (Sheng et al., 2023, arXiv:2311.03285) and Punica (Chen et al., 2023, arXiv:2310.18547) serve many LoRA
adapters in one batch by gathering each row's low-rank factors. Here every host layer keeps a
:class:`LowRankStack`: the factors of its adapters stacked along a slot axis, in **rank buckets** (padded ranks
4, 8, 16, ...), with the scale folded into B (and, for output-rescaling methods such as DoRA, a per-slot output
factor g). A row's (bucket, slot) is model-wide (slot 0 of every bucket = no adapter), so one routing, built once
per call, serves every layer:

    delta[rows] = (x[rows] @ A_t[slot[rows]]) @ B_t[slot[rows]]                 (two batched matmuls per bucket)
    DoRA rows:    out = g·(base_out + low) + (1 − g)·b                           (g = 1 for plain LoRA)

When rows share adapters, each adapter's factors are gathered once and its rows are batched behind them.
Buckets keep a rank-64 adapter from padding every rank-8 row to 64, and growth never reallocates other buckets:
a bucket's capacity doubles when full (or is reserved up front with ``AdaptedModel.reserve``).

Stack entries are keyed by the adapter's content hash (config + tensors, computed once per call and cached on
tensor versions), so training between mixed forwards, or reloading a name with other weights, never serves stale
factors. A decode loop calls with the same rows step after step, so each layer keeps what it ran for the last
calls (plans keyed by the rows' adapters and their content hashes) and replays it without per-adapter checks,
unless grad is on or an adapter is in training mode. The stack follows ``.to()`` / ``.double()``. Methods without low-rank factors, layers whose kind has no
gathered kernel (Conv2d, Embedding) and differentiable (training) forwards group rows by adapter instead.

Routing is per call (a context variable), so threads may run differently routed batches on one model, and
``generate`` expands names for beams / several return sequences as peft does (each name repeated per copy).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .autodiff import transforms_active
from .errors import GraftingError

MIN_BUCKET = 4  # 16-byte aligned fp32 rows
PLANS_KEPT = 2  # gathered-factor plans kept per bucket of a layer stack


def bucket_of(r: int) -> int:
    b = MIN_BUCKET
    while b < r:
        b *= 2
    return b


@dataclass
class RowRouting:
    """Per-row routing for one call (shared by every host layer during it)."""

    names: list  # adapter name (or None) per row
    groups: dict  # name -> LongTensor of row indices
    buckets: dict  # bucket -> (row indices or None for all rows, (rows,) slot per row, names in the bucket)
    hashes: dict  # name -> content hash of the adapter (keys the stacks)
    slot_of: dict  # name -> (bucket, slot) at build time
    expandable: bool = False
    key: "CallKey | None" = None  # what a layer's cached plans for this call are keyed by; None: do not cache
    gathered: dict = field(default_factory=dict)  # (id(host), bucket) -> (stack version, plan)
    _expanded: dict = field(default_factory=dict)

    @classmethod
    def build(cls, names: list, slot_of: dict, hashes: dict, device, expandable: bool = False,
              cacheable: bool = False) -> "RowRouting":
        groups: dict = {}
        for i, name in enumerate(names):
            if name is not None:
                groups.setdefault(name, []).append(i)
        by_bucket: dict = {}
        for name in groups:
            if slot_of.get(name) is not None:
                by_bucket.setdefault(slot_of[name][0], []).append(name)
        buckets = {}
        for b, bnames in by_bucket.items():
            if len(by_bucket) == 1:  # every row in one kernel call; base rows read the zero slot
                slots = [slot_of[n][1] if n in bnames else 0 for n in names]
                buckets[b] = (None, torch.tensor(slots, dtype=torch.long, device=device), bnames)
            else:
                idx = [i for i, n in enumerate(names) if n in bnames]
                slots = [slot_of[names[i]][1] for i in idx]
                buckets[b] = (torch.tensor(idx, dtype=torch.long, device=device),
                              torch.tensor(slots, dtype=torch.long, device=device), bnames)
        key = CallKey((tuple(names), tuple((n, slot_of.get(n), hashes.get(n)) for n in sorted(groups)))) \
            if cacheable else None
        return cls(names=list(names), groups={n: torch.tensor(ix, dtype=torch.long, device=device)
                                              for n, ix in groups.items()},
                   buckets=buckets, hashes=hashes, slot_of=dict(slot_of), expandable=expandable, key=key)

    def for_batch(self, n: int) -> "RowRouting":
        """This routing for a batch of ``n`` rows: ``generate`` may have expanded each row into k copies."""
        if n == len(self.names):
            return self
        k, rem = divmod(n, max(len(self.names), 1))
        if not self.expandable or rem or k < 1:
            raise GraftingError(f"adapter_names has {len(self.names)} entries but the batch has {n} rows")
        if k not in self._expanded:
            device = next(iter(self.groups.values())).device if self.groups else None
            names = [name for name in self.names for _ in range(k)]  # HF expands inputs with repeat_interleave
            self._expanded[k] = RowRouting.build(names, self.slot_of, self.hashes, device,
                                                 cacheable=self.key is not None)
        return self._expanded[k]


class CallKey:
    """A call's rows and their adapters' (slot, content hash), hashed once: every layer looks its plans up by it."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: tuple):
        self.value, self._hash = value, hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, CallKey) and self._hash == other._hash and self.value == other.value)


class Routing:
    """What the host layers of one model apply: model state (active adapters, slots) plus per-call context
    (row routing, disabled) held in context variables, so concurrent calls do not see each other's."""

    def __init__(self):
        self.active: tuple = ()
        self.slot_of: dict = {}  # adapter name -> (bucket, slot); None for methods without low-rank factors
        self._rows = contextvars.ContextVar(f"grafting_rows_{id(self)}", default=None)
        self._enabled = contextvars.ContextVar(f"grafting_enabled_{id(self)}", default=True)

    def __getstate__(self):  # deepcopy / pickle: model state only; a copy starts with no call in flight
        return {"active": self.active, "slot_of": self.slot_of}

    def __setstate__(self, state):
        self.__init__()
        self.active, self.slot_of = state["active"], dict(state["slot_of"])

    @property
    def rows(self) -> RowRouting | None:
        return self._rows.get()

    @property
    def enabled(self) -> bool:
        return self._enabled.get()

    def assign_slot(self, name: str, rank: int | None):
        if rank is None:
            self.slot_of[name] = None
            return None
        b = bucket_of(rank)
        used = {s for bb, s in filter(None, self.slot_of.values()) if bb == b}
        slot = next(s for s in range(1, len(used) + 2) if s not in used)
        self.slot_of[name] = (b, slot)
        return self.slot_of[name]


@contextlib.contextmanager
def _writable():
    """Plain tensors (not inference tensors) even under inference_mode, so slots update in place later, and no
    autograd history: ``inference_mode(False)`` turns grad mode back on, and a stack written with grad on keeps
    every adapter it ever held alive through its chain of CopySlices nodes (a leak a serving pool hit)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class _Bucket:
    def __init__(self, fan_in: int, out: int, rank: int, capacity: int, dtype, device):
        with _writable():
            self.A_t = torch.zeros(capacity, fan_in, rank, dtype=dtype, device=device)
            self.B_t = torch.zeros(capacity, rank, out, dtype=dtype, device=device)
            self.g = torch.ones(capacity, out, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.A_t.shape[0]

    def clear(self, slot: int) -> None:
        """Slot ``slot`` back to "no adapter": zero factors, output factor 1."""
        with _writable():
            self.A_t[slot].zero_()
            self.B_t[slot].zero_()
            self.g[slot].fill_(1.0)

    def grow(self, capacity: int) -> None:
        old = (self.A_t, self.B_t, self.g)
        with _writable():
            self.A_t = old[0].new_zeros(capacity, *old[0].shape[1:])
            self.B_t = old[1].new_zeros(capacity, *old[1].shape[1:])
            self.g = old[2].new_ones(capacity, old[2].shape[1])
            for new, prev in zip((self.A_t, self.B_t, self.g), old):
                new[: prev.shape[0]] = prev


class LowRankStack:
    """Stacked, rank-bucketed factors of one host layer's adapters, indexed by model-wide (bucket, slot)."""

    def __init__(self, fan_in: int, out: int, dtype: torch.dtype, device: torch.device):
        self.fan_in, self.out, self.dtype, self.device = fan_in, out, dtype, device
        self.buckets: dict[int, _Bucket] = {}
        self.version = 0  # bumped whenever a slot changes; keys the per-routing gathered factors
        self.keys: dict = {}  # adapter name -> (bucket, slot, content hash)
        self.lock = threading.Lock()
        # bucket -> gathered factors by row slots, reused across calls while no slot changes (a serving loop
        # calls with the same rows step after step); two per bucket, since each may hold a copy of many factors
        self.plans: dict = {}
        # CallKey -> (rescales, plans): what a call with the same rows and adapters runs, skipping per-adapter
        # checks (64 adapters x 24 layers of them cost more per decode step than the factors' extra reads)
        self.calls: OrderedDict = OrderedDict()

    def _changed(self) -> None:
        self.version += 1  # keys the per-call plans
        self.plans.clear()
        self.calls.clear()

    def __deepcopy__(self, memo):  # a cache: a copied model refills its own on first use
        return LowRankStack(self.fan_in, self.out, self.dtype, self.device)

    def __getstate__(self):
        return {"fan_in": self.fan_in, "out": self.out, "dtype": self.dtype, "device": self.device}

    def __setstate__(self, state):
        self.__init__(state["fan_in"], state["out"], state["dtype"], state["device"])

    def reserve(self, bucket: int, capacity: int) -> None:
        """Room for ``capacity`` slots (slot 0 included) in ``bucket``, allocated now."""
        with torch.no_grad():
            if bucket not in self.buckets:
                self.buckets[bucket] = _Bucket(self.fan_in, self.out, bucket, capacity, self.dtype, self.device)
            elif self.buckets[bucket].capacity < capacity:
                self.buckets[bucket].grow(capacity)
        self._changed()

    def apply(self, fn) -> None:
        for b in self.buckets.values():
            b.A_t, b.B_t, b.g = fn(b.A_t), fn(b.B_t), fn(b.g)
        if self.buckets:
            any_b = next(iter(self.buckets.values()))
            self.dtype, self.device = any_b.A_t.dtype, any_b.A_t.device
        self._changed()

    @torch.no_grad()
    def free(self, name: str) -> None:
        entry = self.keys.pop(name, None)
        if entry is not None:
            self.buckets[entry[0]].clear(entry[1])
            self._changed()

    @torch.no_grad()
    def sync(self, host, names, slot_of: dict, hashes: dict) -> bool:
        """Make the slots of ``names`` current. Returns whether any of them rescales the output."""
        rescales, stale = False, []
        for name in names:
            method = host.methods[name]
            rescales |= method.rescales_output
            key = (*slot_of[name], hashes[name])
            if self.keys.get(name) != key:
                stale.append((name, key))
        if not stale:
            return rescales
        with _writable():
            for name, key in stale:
                old = self.keys.pop(name, None)
                if old is not None and old[:2] != key[:2]:  # moved to another slot: clear the old one
                    self.buckets[old[0]].clear(old[1])
                A, B, scale = host.methods[name].low_rank(host.adapters[name])
                b, slot, _ = key
                if b not in self.buckets or self.buckets[b].capacity <= slot:
                    current = self.buckets[b].capacity if b in self.buckets else 0
                    self.reserve(b, max(slot + 1, 2 * current, 2))
                bucket, r = self.buckets[b], A.shape[0]
                bucket.clear(slot)
                bucket.A_t[slot, :, :r] = A.t().to(self.dtype)
                bucket.B_t[slot, :r] = (B.t() * scale).to(self.dtype)
                g = host.methods[name].output_scale(host.adapters[name], host)
                bucket.g[slot] = 1.0 if g is None else g.to(self.dtype)
                self.keys[name] = key
        self._changed()
        return rescales


def _needs_grad(host, names) -> bool:
    if transforms_active():
        return True
    if not torch.is_grad_enabled():  # checked before touching parameters: this runs on every layer
        return False
    return any(p.requires_grad for n in names for p in host.adapters[n].parameters())


def _dropout_active(host, names) -> bool:
    return not all(host.methods[n].deterministic(host.adapters[n]) for n in names)


def mixed_forward(host, x: torch.Tensor, rows: RowRouting, *args, **kwargs) -> torch.Tensor:
    if host.merged:
        raise GraftingError(f"adapters {sorted(host.merged)} are merged into the base weights; "
                            "unmerge() before running a mixed batch")
    rows = rows.for_batch(x.shape[0])
    base_out = host.base_layer(x, *args, **kwargs)
    stack = host._stack
    if rows.key is not None and stack is not None and not torch.is_grad_enabled() and not transforms_active():
        with stack.lock:
            hit = stack.calls.get(rows.key)
        if hit is not None:
            return _apply_plans(x, base_out, *hit, host)
    present = [name for name in rows.groups if name in host.adapters]
    if not present:
        return base_out
    gathered = []
    if host.kind.gathered and not _needs_grad(host, present) and not _dropout_active(host, present):
        gathered = [n for n in present if host.methods[n].low_rank_form and rows.slot_of.get(n) is not None]
    grouped = [n for n in present if n not in gathered]
    out = _gathered(host, x, base_out, rows, gathered, cacheable=not grouped) if gathered else base_out
    if not grouped:
        return out
    # grouped: differentiable, and the path for methods and kinds without a gathered kernel
    delta = torch.zeros_like(base_out)
    for name in grouped:
        idx = rows.groups[name]
        d = host.methods[name].delta(host.adapters[name], host, x.index_select(0, idx), base_out.index_select(0, idx))
        delta = delta.index_add(0, idx, d)
    return out + delta


def _stack_for(host, name):
    if host._stack is None:
        A = host.methods[name].low_rank(host.adapters[name])[0]
        host._stack = LowRankStack(host.in_features, host.out_features, A.dtype, A.device)
    return host._stack


def _gathered(host, x, base_out, rows: RowRouting, present, cacheable: bool) -> torch.Tensor:
    stack = _stack_for(host, present[0])
    with stack.lock:
        rescales = stack.sync(host, present, rows.slot_of, rows.hashes)
        plans = []
        for b, (row_idx, slots, bnames) in rows.buckets.items():
            here = [n for n in bnames if n in present]
            if not here:
                continue
            cached = rows.gathered.get((id(host), b))
            if cached is None or cached[0] != stack.version:
                absent = [n for n in bnames if n not in here]
                if absent:  # rows whose adapter does not touch this layer (or is grouped) read the zero slot
                    slots = slots.clone()
                    for name in absent:
                        pos = rows.groups[name] if row_idx is None else torch.nonzero(
                            torch.isin(row_idx, rows.groups[name])).flatten()
                        slots[pos] = 0
                key = slots.cpu().numpy().tobytes()
                kept = stack.plans.setdefault(b, OrderedDict())
                hit = kept.get(key)
                if hit is None or hit[0] != stack.version:
                    hit = kept[key] = (stack.version, _gather_plan(stack.buckets[b], slots))
                    while len(kept) > PLANS_KEPT:
                        kept.popitem(last=False)
                kept.move_to_end(key)
                cached = hit
                rows.gathered[(id(host), b)] = cached
            plans.append((row_idx, cached[1]))
        if cacheable and rows.key is not None:
            stack.calls[rows.key] = (rescales, plans)
            while len(stack.calls) > PLANS_KEPT:
                stack.calls.popitem(last=False)
    return _apply_plans(x, base_out, rescales, plans, host)


def _apply_plans(x, base_out, rescales: bool, plans: list, host) -> torch.Tensor:
    n = x.shape[0]
    A0 = plans[0][1][0]
    xr = x.reshape(n, -1, x.shape[-1]).to(A0.dtype)
    if len(plans) == 1 and plans[0][0] is None and plans[0][1][3] is None and not rescales \
            and base_out.dtype == A0.dtype:  # every row in one bucket, own factors: the add fused into the bmm
        _, (A, B, _, _) = plans[0]
        return torch.baddbmm(base_out.reshape(n, -1, base_out.shape[-1]), torch.bmm(xr, A), B).view(base_out.shape)
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


def _lowrank_rows(xr: torch.Tensor, A: torch.Tensor, B: torch.Tensor, groups) -> torch.Tensor:
    if groups is None:
        return torch.bmm(torch.bmm(xr, A), B)
    # rows share adapters: each adapter's factors once, its rows stacked (zero-padded) behind it
    inverse, pos, most = groups
    xg = xr.new_zeros(A.shape[0], most, *xr.shape[1:])
    xg[inverse, pos] = xr
    lowg = torch.bmm(torch.bmm(xg.view(A.shape[0], -1, xr.shape[-1]), A), B)
    return lowg.view(A.shape[0], most, xr.shape[1], -1)[inverse, pos]


def _gather_plan(bucket: _Bucket, slots: torch.Tensor):
    """(A, B, g, groups) for rows with these slots: per-row factors, or per-adapter factors plus row groups.

    Rows in slot order read views of the stack. Otherwise, when rows share adapters (at least two rows per
    adapter on average), each adapter's factors are gathered once and its rows are batched together; copying
    every row's own factors would move (in + out)·r values per row, as much as a whole base weight at 64 rows.
    """
    first = int(slots[0])
    if first > 0 and torch.equal(slots, torch.arange(first, first + len(slots), device=slots.device)):
        picked = slice(first, first + len(slots))
        return bucket.A_t[picked], bucket.B_t[picked], bucket.g[picked], None
    unique, inverse = torch.unique(slots, return_inverse=True)
    if 2 * len(unique) > len(slots):
        return (bucket.A_t.index_select(0, slots), bucket.B_t.index_select(0, slots),
                bucket.g.index_select(0, slots), None)
    counts = torch.bincount(inverse, minlength=len(unique))
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(inverse)
    pos[order] = torch.arange(len(slots), device=slots.device) - starts[inverse[order]]
    groups = (inverse, pos, int(counts.max()))
    return (bucket.A_t.index_select(0, unique), bucket.B_t.index_select(0, unique),
            bucket.g.index_select(0, unique), groups)
