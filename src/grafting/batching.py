"""Mixed batches: one adapter per row, in one forward, without a Python loop over adapters per layer.

S-LoRA (Sheng et al., 2023, arXiv:2311.03285) and Punica (Chen et al., 2023, arXiv:2310.18547) serve many LoRA
adapters in one batch by gathering each row's low-rank factors. Here every host layer keeps a
:class:`~grafting.stacks.LowRankStack`: the factors of its adapters stacked along a slot axis, in rank buckets,
with the scale folded into B (:mod:`grafting.stacks`). A row's (bucket, slot) is model-wide (slot 0 of every
bucket = no adapter), so one routing, built once per call, serves every layer:

    delta[rows] = (x[rows] @ A_t[slot[rows]]) @ B_t[slot[rows]]                 (two batched matmuls per bucket)
    DoRA rows:    out = g·(base_out + low) + (1 − g)·b                           (g = 1 for plain LoRA)

Without grad, LoRA rows run through the compiled kernel (:mod:`grafting.kernels`), one call per layer that
reads every row's factors in place; otherwise through torch's batched matmuls over gathered factors
(:mod:`grafting.plans`). Which of a call's adapters a layer holds and runs through the store is worked out
once per call for all layers holding the same adapters (:class:`LayerCall`).

Stack entries are keyed by the adapter's content hash (config + tensors, computed once per call and cached on
tensor versions), so training between mixed forwards, or reloading a name with other weights, never serves stale
factors. A decode loop calls with the same rows step after step, so each layer keeps what it ran for the last
calls (plans keyed by the rows' adapters and their content hashes) and replays it without per-adapter checks,
unless grad is on or an adapter is in training mode. The stack follows ``.to()`` / ``.double()``. Methods
without low-rank factors, layers whose kind has no gathered kernel (Conv2d, Embedding) and differentiable
(training) forwards group rows by adapter instead.

Routing is per call (a context variable), so threads may run differently routed batches on one model, and
``generate`` expands names for beams / several return sequences as peft does (each name repeated per copy).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch

from .autodiff import transforms_active
from .errors import GraftingError
from .plans import apply_plans, run_of_slots, torch_rows
from .stacks import LowRankStack, bucket_of

__all__ = ["CallKey", "LowRankStack", "RowRouting", "Routing", "bucket_of", "mixed_forward"]

@dataclass
class RowRouting:
    """Per-row routing for one call (shared by every host layer during it)."""

    names: list  # adapter name (or None) per row
    groups: dict  # name -> row indices (a list; index() gives them as a tensor)
    bucket_names: dict  # bucket -> names of the call's adapters in it
    hashes: dict  # name -> content hash of the adapter (keys the stacks)
    slot_of: dict  # name -> (bucket, slot) at build time
    device: torch.device | None = None
    expandable: bool = False
    key: "CallKey | None" = None  # what a layer's cached plans for this call are keyed by; None: do not cache
    gathered: dict = field(default_factory=dict)  # (id(host), bucket) -> (stack version, plan)
    gatherable: dict = field(default_factory=dict)  # method class -> deterministic (no module trains)
    layers: dict = field(default_factory=dict)  # AdapterSet -> LayerCall: what layers holding these adapters run
    _stack_keys: dict | None = None
    _kernel: tuple = ()  # (the compiled kernel or None,) once looked up for this call
    _index: dict = field(default_factory=dict)
    _buckets: dict | None = None
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
        key = CallKey((tuple(names), tuple((n, slot_of.get(n), hashes.get(n)) for n in sorted(groups)))) \
            if cacheable else None
        return cls(names=list(names), groups=groups, bucket_names=by_bucket, hashes=hashes, slot_of=dict(slot_of),
                   device=device, expandable=expandable, key=key)

    def index(self, name: str) -> torch.Tensor:
        """The rows of adapter ``name`` as a LongTensor (built on first use: the kernel path never asks)."""
        idx = self._index.get(name)
        if idx is None:
            idx = self._index[name] = torch.tensor(self.groups[name], dtype=torch.long, device=self.device)
        return idx

    @property
    def buckets(self) -> dict:
        """bucket -> (row indices, or None for all rows; (rows,) slot per row; names in the bucket), for the
        torch path (built on first use)."""
        if self._buckets is None:
            names, slot_of, self._buckets = self.names, self.slot_of, {}
            for b, bnames in self.bucket_names.items():
                if len(self.bucket_names) == 1:  # every row in one batched matmul; base rows read the zero slot
                    slots = [slot_of[n][1] if n in bnames else 0 for n in names]
                    self._buckets[b] = (None, torch.tensor(slots, dtype=torch.long, device=self.device), bnames)
                else:
                    idx = [i for i, n in enumerate(names) if n in bnames]
                    self._buckets[b] = (torch.tensor(idx, dtype=torch.long, device=self.device),
                                        torch.tensor([slot_of[names[i]][1] for i in idx], dtype=torch.long,
                                                     device=self.device), bnames)
        return self._buckets

    @property
    def stack_keys(self) -> dict:
        """name -> (bucket, slot, content hash): what each layer's stack must hold for this call."""
        if self._stack_keys is None:
            self._stack_keys = {n: (*self.slot_of[n], self.hashes[n]) for n in self.groups
                                if self.slot_of.get(n) is not None}
        return self._stack_keys

    def kernel(self):
        """The compiled kernel (:func:`grafting.kernels.lora_rows`), looked up once per call."""
        if not self._kernel:
            from .kernels import lora_rows
            self._kernel = (lora_rows(),)
        return self._kernel[0]

    def kernel_entries(self, gathered: list) -> tuple:
        """(bucket order, (entries, 3) int64 of row, bucket position, slot) for the compiled kernel: every row
        whose adapter is in ``gathered``, heaviest rank first, so threads taking rows in turn end together."""
        order = tuple(sorted(self.bucket_names, reverse=True))
        position = {b: i for i, b in enumerate(order)}
        keep = set(gathered)
        entries = [(i, position[self.slot_of[n][0]], self.slot_of[n][1]) for i, n in enumerate(self.names)
                   if n in keep]
        entries.sort(key=lambda e: e[1])
        return order, torch.tensor(entries, dtype=torch.int64).view(-1, 3)

    def for_batch(self, n: int) -> "RowRouting":
        """This routing for a batch of ``n`` rows: ``generate`` may have expanded each row into k copies."""
        if n == len(self.names):
            return self
        k, rem = divmod(n, max(len(self.names), 1))
        if not self.expandable or rem or k < 1:
            raise GraftingError(f"adapter_names has {len(self.names)} entries but the batch has {n} rows")
        if k not in self._expanded:
            names = [name for name in self.names for _ in range(k)]  # HF expands inputs with repeat_interleave
            self._expanded[k] = RowRouting.build(names, self.slot_of, self.hashes, self.device,
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
        self.stack_dtype = None  # the mixed-batch store's dtype; None: the adapters' own
        self.reserved = None  # (adapters, rank): room every layer's stack gets when made (AdaptedModel.reserve)
        self.sealed: dict = {}  # adapter -> (stamp, content hash): hashing.seal; a copy starts with none
        self._rows = contextvars.ContextVar(f"grafting_rows_{id(self)}", default=None)
        self._enabled = contextvars.ContextVar(f"grafting_enabled_{id(self)}", default=True)

    def __getstate__(self):  # deepcopy / pickle: model state only; a copy starts with no call in flight
        return {"active": self.active, "slot_of": self.slot_of, "stack_dtype": self.stack_dtype,
                "reserved": self.reserved}

    def __setstate__(self, state):
        self.__init__()
        self.active, self.slot_of = state["active"], dict(state["slot_of"])
        self.stack_dtype, self.reserved = state.get("stack_dtype"), state.get("reserved")

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


def _needs_grad(host, names) -> bool:
    if transforms_active():
        return True
    if not torch.is_grad_enabled():  # checked before touching parameters: this runs on every layer
        return False
    return any(p.requires_grad for n in names for p in host.adapters[n].parameters())


def _gatherable(host, names, rows: RowRouting) -> list:
    """The adapters among ``names`` whose rows this layer may run through the store: in low-rank form, with a
    slot, and deterministic (a mixed call runs one fixed function per row: no active dropout or noise)."""
    if rows.key is None:  # some module of these adapters is in training mode: ask this layer's modules
        if not all(host.methods[n].deterministic(host.adapters[n]) for n in names):
            return []
        return [n for n in names if host.methods[n].low_rank_form and rows.slot_of.get(n) is not None]
    # No module of these adapters trains (a cacheable call), so every method answers `deterministic` by its
    # class alone (each one's answer depends on training flags only): asked once per method and call.
    known, slot_of, out = rows.gatherable, rows.slot_of, []
    for n in names:
        method = host.methods[n]
        fixed = known.get(type(method))
        if fixed is None:
            fixed = known[type(method)] = method.deterministic(host.adapters[n])
        if not fixed:
            return []
        if method.low_rank_form and slot_of.get(n) is not None:
            out.append(n)
    return out


@dataclass
class LayerCall:
    """What every host layer holding one set of adapters does in one call (see :func:`_layer_call`)."""

    present: list  # the call's adapters this layer holds
    gathered: list  # ... that run through the store
    grouped: list  # ... that run their own delta, rows grouped by adapter
    rescales: bool  # some gathered adapter rescales the output (DoRA)
    kernel: tuple | None = None  # (bucket order, entries) for the compiled kernel, built on first use


def _layer_call(host, rows: RowRouting) -> LayerCall:
    """This layer's split of the call's adapters, worked out once per call for all layers holding the same
    adapters (a decode step whose rows changed would otherwise redo it in each of a model's layers)."""
    cacheable = rows.key is not None and not torch.is_grad_enabled() and not transforms_active()
    sig = host.adapter_set() if cacheable else None
    hit = rows.layers.get(sig) if cacheable else None
    if hit is not None:
        return hit
    present = [name for name in rows.groups if name in host.adapters]
    gathered = _gatherable(host, present, rows) if present and host.kind.gathered \
        and not _needs_grad(host, present) else []
    call = LayerCall(present, gathered, [n for n in present if n not in gathered],
                     any(host.methods[n].rescales_output for n in gathered))
    if cacheable:
        rows.layers[sig] = call
    return call


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
            if hit is not None and hit[0] == "kernel":
                kernel = _rows_kernel(rows, x, base_out, stack, False)
                if kernel is not None:
                    return _run_kernel(kernel, x, base_out, stack.dtype, *hit[1])
            elif hit is not None:
                return apply_plans(x, base_out, *hit, host)
    layer = _layer_call(host, rows)
    if not layer.present:
        return base_out
    out = _gathered(host, x, base_out, rows, layer) if layer.gathered else base_out
    if not layer.grouped:
        return out
    # grouped: differentiable, and the path for methods and kinds without a gathered kernel
    delta = torch.zeros_like(base_out)
    for name in layer.grouped:
        idx = rows.index(name)
        d = host.methods[name].delta(host.adapters[name], host, x.index_select(0, idx), base_out.index_select(0, idx))
        delta = delta.index_add(0, idx, d)
    return out + delta


def stack_for(host, name):
    """The layer's stack, made at first need in the dtype of ``name``'s factors (or the store's) with the
    model's reserved room."""
    if host._stack is None:
        A = host.methods[name].low_rank(host.adapters[name])[0]
        host._stack = LowRankStack(host.in_features, host.out_features, host._routing.stack_dtype or A.dtype,
                                   A.device)
        if host._routing.reserved is not None:
            adapters, rank = host._routing.reserved
            host._stack.reserve(bucket_of(rank), adapters + 1)
    return host._stack


def _gathered(host, x, base_out, rows: RowRouting, layer: LayerCall) -> torch.Tensor:
    stack = stack_for(host, layer.gathered[0])
    present, rescales, cacheable = layer.gathered, layer.rescales, not layer.grouped
    with stack.lock:
        stack.sync(host, present, rows.stack_keys)
        kernel = _rows_kernel(rows, x, base_out, stack, rescales)
        if kernel is not None and stack.dtype == torch.float32 and len(rows.bucket_names) == 1 \
                and len(next(iter(rows.bucket_names.values()))) == len(present):
            if run_of_slots(next(iter(rows.buckets.values()))[1]):
                kernel = None  # rows in slot order: torch's batched matmul reads views, as fast as the kernel in fp32
        if kernel is not None:  # every row reads its factors in place: nothing gathered, nothing to plan
            if layer.kernel is None:
                layer.kernel = rows.kernel_entries(present)
            order, entries = layer.kernel
            run = (stack.kernel_table(order), entries)
            if cacheable and rows.key is not None:
                stack.remember(rows.key, ("kernel", run))
            return _run_kernel(kernel, x, base_out, stack.dtype, *run)
        return torch_rows(host, x, base_out, rows, stack, present, rescales, cacheable)


def _rows_kernel(rows: RowRouting, x, base_out, stack, rescales: bool):
    """The compiled kernel (:mod:`grafting.kernels`) when it can run this call: LoRA rows (no output factor),
    no autograd (it writes into the base output in place), fp32 activations, an fp32, bf16 or int8 store on the CPU."""
    if rescales or torch.is_grad_enabled() or not stack.buckets:
        return None
    kernel = rows.kernel()
    return kernel if kernel is not None and kernel.supports(x, base_out, stack.dtype, stack.device) else None


def _run_kernel(kernel, x, base_out, stack_dtype, table, entries) -> torch.Tensor:
    n = x.shape[0]
    xr = x.reshape(n, -1, x.shape[-1]).contiguous()
    kernel(xr, base_out.view(n, xr.shape[1], -1), table, entries, stack_dtype)
    return base_out
