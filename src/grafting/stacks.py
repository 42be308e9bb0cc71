"""The mixed-batch store: each host layer's adapters' low-rank factors, stacked in rank buckets, and row banks.

A :class:`LowRankStack` holds the factors of a layer's adapters along a slot axis, in **rank buckets** (padded
ranks 4, 8, 16, ...), with the scale folded into B (and, for output-rescaling methods such as DoRA, a per-slot
output factor g); slot 0 of every bucket is "no adapter". Buckets keep a rank-64 adapter from padding every
rank-8 row to 64, and growth never reallocates other buckets: a bucket's capacity doubles when full (or is
reserved up front with ``AdaptedModel.reserve``). Entries are keyed by the adapter's content hash, so a name
reloaded with other weights is written anew. :class:`RowBank` keeps one copy of each decode row's factors at a
position of its own (see there). :mod:`grafting.batching` routes rows to slots and runs the kernel.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

import numpy
import torch

MIN_BUCKET = 4  # 16-byte aligned fp32 rows
PLANS_KEPT = 2  # gathered-factor plans kept per bucket of a layer stack


def bucket_of(r: int) -> int:
    b = MIN_BUCKET
    while b < r:
        b *= 2
    return b


@contextlib.contextmanager
def _writable():
    """Plain tensors (not inference tensors) even under inference_mode, so slots update in place later, and no
    autograd history: ``inference_mode(False)`` turns grad mode back on, and a stack written with grad on keeps
    every adapter it ever held alive through its chain of CopySlices nodes (a leak a serving pool hit)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class _Bucket:
    """One rank bucket of a layer's stack. An int8 store (``dtype`` torch.int8) keeps each slot's factors as int8
    with one fp32 scale per rank (A's columns, B's rows: symmetric absmax), which the kernel applies once per
    row to ``x @ A`` (so the scales cost no work per element); the torch path reads dequantized copies."""

    def __init__(self, fan_in: int, out: int, rank: int, capacity: int, dtype, device):
        self.quantized = dtype == torch.int8
        with _writable():
            self.A_t = torch.zeros(capacity, fan_in, rank, dtype=dtype, device=device)
            self.B_t = torch.zeros(capacity, rank, out, dtype=dtype, device=device)
            compute = torch.float32 if self.quantized else dtype
            self.g = torch.ones(capacity, out, dtype=compute, device=device)
            # per slot and rank: A's column scales, B's row scales (the LoRA scale folded in); None unless int8
            self.a_scale = torch.zeros(capacity, rank, dtype=compute, device=device) if self.quantized else None
            self.b_scale = torch.zeros(capacity, rank, dtype=compute, device=device) if self.quantized else None
        self.stamps = [0] * capacity  # bumped whenever a slot is rewritten: row banks copy from slots by stamp
        self.rescaled: set = set()  # slots whose output factor g is not all ones
        self._views = None

    @property
    def capacity(self) -> int:
        return self.A_t.shape[0]

    def tensors(self) -> list:
        return [t for t in (self.A_t, self.B_t, self.g, self.a_scale, self.b_scale) if t is not None]

    def clear(self, slot: int) -> None:
        """Slot ``slot`` back to "no adapter": zero factors, output factor 1."""
        self.stamps[slot] += 1
        with _writable():
            self.A_t[slot].zero_()
            self.B_t[slot].zero_()
            self.g[slot].fill_(1.0)
            self.rescaled.discard(slot)
            if self.quantized:
                self.a_scale[slot].zero_()
                self.b_scale[slot].zero_()

    def views(self) -> list:
        """The bucket's tensors (A_t, B_t, g, and for int8 the scales) as NumPy arrays for a CPU fp32 or int8 store,
        else as themselves: slicing an array costs a fraction of slicing a tensor, and a serving pool writes about
        twenty layers' slots per install. Dropped wherever the tensors are replaced (grow, .to())."""
        if self._views is None:
            arrays = self.A_t.device.type == "cpu" and self.A_t.dtype in (torch.float32, torch.int8)
            self._views = [t.numpy() if arrays else t for t in self.tensors()]
        return self._views

    def write(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale, g) -> None:
        """Slot ``slot`` holds factors A (r, fan_in), B (out, r) with ``scale`` folded into B, output factor g
        (None: 1). Only the rank padding is zeroed; a serving pool rewrites slots at every install."""
        self.stamps[slot] += 1
        r, width = A.shape[0], self.A_t.shape[2]
        unscaled = isinstance(scale, (int, float)) and scale == 1
        A_v, B_v, g_v, *scales = views = self.views()
        if self.quantized and g is None and isinstance(A_v, numpy.ndarray) and isinstance(scale, (int, float)) \
                and slot not in self.rescaled:
            qa, qb = prequantized(A), prequantized(B)
            if qa is not None and qb is not None:
                self._copy_int8(views, slot, r, qa, qb, scale)
                return
        with _writable():
            A_t, B_t = A.t(), B.t()
            if self.quantized:  # quantized on a serving pool's loader thread already, or here
                qa, qb, b_times = prequantized(A) or int8_rows(A_t, dim=0), prequantized(B), None
                if qb is None or (isinstance(scale, torch.Tensor) and scale.dim() > 0):
                    # a scale per output feature is folded into B's values before quantizing
                    qb = int8_rows(B_t if unscaled else B_t * scale, dim=1)
                elif not unscaled:
                    b_times = scale  # one number: it goes into B's row scales
                put(A_v[slot, :, :r], qa[0])
                put(B_v[slot, :r], qb[0])
                put(scales[0][slot, :r], qa[1])
                put(scales[1][slot, :r], qb[1], b_times)
                if r < width:
                    put(scales[0][slot, r:], 0)
                    put(scales[1][slot, r:], 0)
            else:
                # factors as trained are transposed here: converting in memory order first, then a narrower
                # transposing copy, beats torch's one-pass converting copy; factors laid out for the store
                # (serve.host_tier.stack_layout) are contiguous and copy straight in, scaled on the way (a
                # scaled temporary of B was a fresh allocation at every install)
                put(A_v[slot, :, :r], A_t if A_t.is_contiguous() else A_t.to(self.A_t.dtype))
                if unscaled and not B_t.is_contiguous():
                    B_t = B_t.to(self.B_t.dtype)
                put(B_v[slot, :r], B_t, None if unscaled else scale)
            if r < width:
                put(A_v[slot, :, r:], 0)
                put(B_v[slot, r:], 0)
            if g is not None:
                put(g_v[slot], g)
                self.rescaled.add(slot)
            elif slot in self.rescaled:  # g is 1 in every slot no output-rescaling adapter held
                put(g_v[slot], 1.0)
                self.rescaled.discard(slot)

    @staticmethod
    def _copy_int8(views, slot: int, r: int, qa, qb, scale) -> None:
        """A serving pool's install into an int8 store: the factors' int8 forms (quantized on its loader thread)
        copied in with NumPy, no torch op and no grad-mode switch (a SmolLM2 adapter writes 120 layers' slots per
        install; the general path cost about three times as much per layer)."""
        A_v, B_v, _, a_s, b_s = views
        if r == A_v.shape[2]:
            a, b, sa, sb = A_v[slot], B_v[slot], a_s[slot], b_s[slot]
        else:
            a, b, sa, sb = A_v[slot, :, :r], B_v[slot, :r], a_s[slot, :r], b_s[slot, :r]
            A_v[slot, :, r:] = 0
            B_v[slot, r:] = 0
            a_s[slot, r:] = 0
            b_s[slot, r:] = 0
        numpy.copyto(a, qa[0].numpy())
        numpy.copyto(b, qb[0].numpy())
        numpy.copyto(sa, qa[1].numpy())
        if scale == 1:
            numpy.copyto(sb, qb[1].numpy())
        else:  # the LoRA scale goes into B's row scales, in fp32 as torch's product would round it
            numpy.multiply(qb[1].numpy(), scale, out=sb)

    def factors(self, index) -> tuple:
        """(A, B, g) of slots ``index`` (a slice or a LongTensor) as the torch path reads them: the stack's own
        tensors (views for a slice), or for an int8 store fp32 copies, dequantized."""
        pick = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t.index_select(0, index))
        A, B, g = pick(self.A_t), pick(self.B_t), pick(self.g)
        if self.quantized:
            A = A.to(self.g.dtype) * pick(self.a_scale)[:, None, :]
            B = B.to(self.g.dtype) * pick(self.b_scale)[:, :, None]
        return A, B, g

    def grow(self, capacity: int) -> None:
        old = self.tensors()
        with _writable():
            grown = [t.new_ones(capacity, *t.shape[1:]) if t is self.g else t.new_zeros(capacity, *t.shape[1:])
                     for t in old]
            for new, prev in zip(grown, old):
                new[: prev.shape[0]] = prev
        self.A_t, self.B_t, self.g = grown[:3]
        self._views = None
        if self.quantized:
            self.a_scale, self.b_scale = grown[3:]
        self.stamps += [0] * (capacity - len(self.stamps))


SERIAL = 32767  # elements: torch runs an elementwise op below its grain size (32,768) on the calling thread
_NUMPY = (torch.float32, torch.float64, torch.float16, torch.int8)  # dtypes whose tensors .numpy() shares


def put(dst, src, scale=None) -> None:
    """``dst[:] = src`` (a tensor times ``scale``, a number or a tensor broadcasting against ``dst``; or a number
    to fill with) on the calling thread, without a temporary. ``dst``: a torch view, or a NumPy view of a CPU
    bucket (:meth:`_Bucket.views`). A slot is a few hundred KB, which torch splits across its threads, and
    waking the other one, asleep between a serving loop's steps, costs more than the copy (a 512-adapter
    replay on 2 cores spent 0.32-0.40 s writing slots with torch's copies, 0.24-0.27 s with NumPy's); what
    NumPy cannot take (bf16) goes through torch in pieces below its grain size."""
    if isinstance(src, (int, float)):
        dst.fill(src) if isinstance(dst, numpy.ndarray) else dst.fill_(src)
        return
    src = src.detach()
    scale = scale.detach() if isinstance(scale, torch.Tensor) else scale
    if isinstance(dst, numpy.ndarray):
        values = src.numpy() if src.device.type == "cpu" and src.dtype in _NUMPY else None
        plain = scale is None or isinstance(scale, (int, float)) or (
            scale.device.type == "cpu" and scale.dtype == src.dtype)
        if values is not None and values.dtype == dst.dtype and plain:
            if scale is None:
                numpy.copyto(dst, values)
            else:  # same dtypes as torch's product, so the same values
                numpy.multiply(values, scale if isinstance(scale, (int, float)) else scale.numpy(), out=dst)
            return
        dst = torch.from_numpy(dst)
    rows = max(1, SERIAL // max(1, dst[0].numel())) if dst.device.type == "cpu" and len(dst) else max(len(dst), 1)
    for i in range(0, len(dst), rows):
        if scale is None:
            dst[i:i + rows].copy_(src[i:i + rows])
        else:
            torch.mul(src[i:i + rows], scale, out=dst[i:i + rows])


def int8_rows(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scales) of a factor laid out as the store keeps it (A as (fan_in, r), reduced over
    ``dim`` 0; B as (r, out), over ``dim`` 1): one symmetric absmax scale per rank, values round(t / scale)."""
    t = t.float()
    scales = t.abs().amax(dim=dim).div_(127.0)
    q = (t / scales.clamp_min(1e-30).unsqueeze(dim)).round_().to(torch.int8)
    return q, scales


def prequantized(factor: torch.Tensor) -> tuple | None:
    """The (int8 values, scales) a serving pool attached to this factor's parameter (:func:`share_int8`), if they
    are still its values: same storage, not written since (its version)."""
    source = factor._base if factor._base is not None else factor
    held = getattr(source, "grafting_int8", None)
    if held is None or held[0] != factor.data_ptr() or held[1] != source._version \
            or held[2].shape != factor.t().shape:  # a slice of the parameter (a truncated rank) is not it
        return None
    return held[2], held[3]


def share_int8(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """``param`` now holds ``tensor``'s storage: carry the int8 form a loader thread computed for it
    (``tensor.grafting_int8``, see :func:`grafting.serve.host_tier.stack_layout`), or drop a stale one."""
    held = getattr(tensor, "grafting_int8", None)
    if held is None:
        param.__dict__.pop("grafting_int8", None)
    else:
        param.grafting_int8 = (param.data_ptr(), param._version, *held)


class RowBank:
    """One copy of each row's factors, for one-token-per-row (decode) calls whose rows are not in slot order:
    bank positions 0..k-1 hold the k rows' adapters, so the kernel reads views, and a new batch composition
    copies only the adapters that were not in the bank already (a continuous batch changes a few rows per step;
    gathering every row's factors anew each step moved as many bytes as the base weights).

    Positions remember the (slot, stamp) they copied, so a slot rewritten with another adapter is copied anew.
    Calls that read a bank hold the stack's lock until their kernel ran (the next call may rewrite positions)."""

    def __init__(self):
        self.A = self.B = self.g = None
        self.owner: list = []  # position -> (slot, stamp) it holds, or None

    def rows(self, bucket: _Bucket, slots: list) -> tuple:
        """(order, (A, B, g, None)): bank position p serves row ``order[p]`` of ``slots``."""
        k = len(slots)
        want = [(s, bucket.stamps[s]) for s in slots]
        held: dict = {}
        for p, w in enumerate(self.owner[:k]):
            held.setdefault(w, []).append(p)
        order = [-1] * k
        missing = []
        for i, w in enumerate(want):
            if held.get(w):
                order[held[w].pop()] = i
            else:
                missing.append(i)
        holes = [p for p in range(k) if order[p] < 0]
        with _writable():
            self._reserve(bucket, k)
            if missing:
                pos = torch.tensor(holes, dtype=torch.long, device=self.A.device)
                src = torch.tensor([slots[i] for i in missing], dtype=torch.long, device=self.A.device)
                A, B, g = bucket.factors(src)
                self.A.index_copy_(0, pos, A)
                self.B.index_copy_(0, pos, B)
                self.g.index_copy_(0, pos, g)
                for p, i in zip(holes, missing):
                    order[p] = i
                    self.owner[p] = want[i]
        return order, (self.A[:k], self.B[:k], self.g[:k], None)

    def _reserve(self, bucket: _Bucket, k: int) -> None:
        if self.A is not None and self.A.shape[0] >= k:
            return
        cap = max(k, 2 * (0 if self.A is None else self.A.shape[0]))
        # the factors as the torch path reads them: an int8 store's are dequantized (to g's dtype) on the way in
        grown = (bucket.g.new_zeros(cap, *bucket.A_t.shape[1:]), bucket.g.new_zeros(cap, *bucket.B_t.shape[1:]),
                 bucket.g.new_ones(cap, bucket.g.shape[1]))
        if self.A is not None:
            for new, prev in zip(grown, (self.A, self.B, self.g)):
                new[: prev.shape[0]] = prev
        self.A, self.B, self.g = grown
        self.owner += [None] * (cap - len(self.owner))


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
        self.banks: dict = {}  # bucket -> RowBank
        self.tables: dict = {}  # bucket order -> the kernel's table of this layer's buckets (see kernel_table)

    def remember(self, key, plans) -> None:
        """What a call keyed ``key`` ran, for the next call with the same rows (the last PLANS_KEPT kept)."""
        self.calls[key] = plans
        while len(self.calls) > PLANS_KEPT:
            self.calls.popitem(last=False)

    def _changed(self, moved: bool = False) -> None:
        self.version += 1  # keys the per-call plans
        self.plans.clear()
        self.calls.clear()
        if moved:  # a reserve or .to() moved the buckets; a slot written in place leaves the kernel's table valid
            self.tables.clear()

    def __deepcopy__(self, memo):  # a cache: a copied model refills its own on first use
        return LowRankStack(self.fan_in, self.out, self.dtype, self.device)

    def __getstate__(self):
        return {"fan_in": self.fan_in, "out": self.out, "dtype": self.dtype, "device": self.device}

    def __setstate__(self, state):
        self.__init__(state["fan_in"], state["out"], state["dtype"], state["device"])

    def kernel_table(self, order: tuple) -> torch.Tensor:
        """(len(order), 5) int64: each bucket's A and B addresses, rank, and an int8 store's scale addresses (0
        otherwise), as the compiled kernel reads them (zeros for a bucket this layer lacks: no row of this layer
        reads it). Kept until a slot changes."""
        table = self.tables.get(order)
        if table is None:
            from .kernels import LoraRows
            table = self.tables[order] = LoraRows.table([
                (self.buckets[b].A_t, self.buckets[b].B_t, self.buckets[b].a_scale, self.buckets[b].b_scale)
                if b in self.buckets else None for b in order])
        return table

    def reserve(self, bucket: int, capacity: int) -> None:
        """Room for ``capacity`` slots (slot 0 included) in ``bucket``, allocated now."""
        with torch.no_grad():
            if bucket not in self.buckets:
                self.buckets[bucket] = _Bucket(self.fan_in, self.out, bucket, capacity, self.dtype, self.device)
            elif self.buckets[bucket].capacity < capacity:
                self.buckets[bucket].grow(capacity)
        self._changed(moved=True)

    def apply(self, fn) -> None:
        for b in self.buckets.values():
            b.A_t, b.B_t, b.g, b._views = fn(b.A_t), fn(b.B_t), fn(b.g), None
            if b.quantized:
                b.a_scale, b.b_scale = fn(b.a_scale), fn(b.b_scale)
        self.banks.clear()
        if self.buckets:
            any_b = next(iter(self.buckets.values()))
            self.dtype, self.device = any_b.A_t.dtype, any_b.A_t.device
        self._changed(moved=True)

    @torch.no_grad()
    def free(self, name: str) -> None:
        entry = self.keys.pop(name, None)
        if entry is not None:
            # no row reads a free slot (absent adapters route to slot 0) and the next adapter given it rewrites
            # it whole: zeroing it cost a serving pool a tenth of each eviction
            self.buckets[entry[0]].stamps[entry[1]] += 1
            self._changed()

    def sync(self, host, names, keys: dict) -> None:
        """Make the slots of ``names`` current: ``keys`` maps each to its (bucket, slot, content hash)."""
        held = self.keys
        stale = [(name, keys[name]) for name in names if held.get(name) != keys[name]]
        if not stale:  # checked without entering no_grad: this runs in every layer of every mixed call
            return
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
                g = host.methods[name].output_scale(host.adapters[name], host)
                self.buckets[b].write(slot, A, B, scale, g)
                self.keys[name] = key
        self._changed()
