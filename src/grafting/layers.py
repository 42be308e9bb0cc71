"""Host layers: wrap one base layer, hold its named adapters, dispatch the forward.

A host layer never knows which method an adapter uses; it asks the method (``delta``) and routes rows. What
differs between base-layer types (how a low-rank pair acts on the input, where the output axis is, how the
dense weight is read) lives in a small :class:`LayerKind` per type, so every method works on every layer type
it declares without a class per (method x layer) pair.

The host protocol: any base module that computes its own output can host every low-rank method. A linear base
that is not a plain float ``weight`` (a quantized one: packed integer storage, its own forward) offers
``in_features``, ``out_features`` and ``dequantize()`` returning the dense (out, in) weight; to accept merges
(and inits that rewrite the base, such as PiSSA) it also offers ``quantize_(weight)``, which re-quantizes a
dense weight in place. Without it, a merge is refused; grafting never writes into packed storage.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .autodiff import tracking_derivatives
from .errors import GraftingError


class LayerKind:
    """How one base-layer type maps to the canonical ``(out, fan_in)`` view adapters work in."""

    name = ""
    gathered = False  # mixed batches use the stacked-factor kernel (rows x tokens x features inputs)

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def weight(self, base: nn.Module) -> torch.Tensor:
        """The dense base weight in the base layer's own layout (quantized bases dequantize here)."""
        return base.dequantize() if hasattr(base, "dequantize") else base.weight

    def to_out_in(self, w: torch.Tensor) -> torch.Tensor:
        """A weight in the base layout, viewed as (out_features, fan_in)."""
        return w.reshape(w.shape[0], -1)

    def from_out_in(self, m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return m.reshape(like.shape)

    def factor_shapes(self, base: nn.Module, r: int) -> tuple[tuple, tuple]:
        fan_in, out = self.in_out(base)
        return (r, fan_in), (out, r)

    def lowrank(self, base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """B(A(x)) in the layer's output layout (no scaling)."""
        return F.linear(F.linear(x, A), B)

    def apply_weight(self, base: nn.Module, x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
        """The base transform with weight ``w`` (in the base layout) and ``bias`` (None: no bias)."""
        return F.linear(x, w, bias)

    def add_lowrank_weight(self, w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        """A new tensor w + scale·B·A in the base layout, from factors in the (out, fan_in) view."""
        if w.dtype != A.dtype:
            return w + self.from_out_in((B @ A) * scale, w).to(w.dtype)
        return self.from_out_in(torch.addmm(self.to_out_in(w), B, A, alpha=scale), w)

    def out_view(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A per-output-feature vector shaped to broadcast against an output tensor."""
        return v

    def plain_types(self) -> tuple[type, ...]:
        """Base-layer classes whose forward is exactly ``apply_weight`` with their weight and bias."""
        return ()

    def bias(self, base: nn.Module) -> torch.Tensor | None:
        return getattr(base, "bias", None)


class LinearKind(LayerKind):
    name = "linear"
    gathered = True

    def matches(self, module):
        return isinstance(module, nn.Linear) or computes_own_linear(module)

    def in_out(self, base):
        return base.in_features, base.out_features

    def plain_types(self):
        return (nn.Linear,)


def computes_own_linear(module: nn.Module) -> bool:
    """A linear base that computes its own output from non-float storage (the host protocol above)."""
    return callable(getattr(module, "dequantize", None)) and isinstance(getattr(module, "in_features", None), int) \
        and isinstance(getattr(module, "out_features", None), int)


def stores_plain_weight(base: nn.Module) -> bool:
    """The base's ``weight`` is the dense float weight itself (safe to write a merged weight into)."""
    w = getattr(base, "weight", None)
    return not callable(getattr(base, "dequantize", None)) and isinstance(w, torch.Tensor) and w.is_floating_point()


class Conv1DKind(LayerKind):
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored (in, out) (fan_in_fan_out)."""

    name = "conv1d"
    gathered = True

    def matches(self, module):
        return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
            and module.weight.dim() == 2

    def in_out(self, base):
        return base.weight.shape[0], base.weight.shape[1]

    def plain_types(self):
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # a Conv1D from elsewhere: not known to be plain
            return ()
        return (Conv1D,)

    def to_out_in(self, w):
        return w.t()

    def from_out_in(self, m, like):
        return m.t()

    def apply_weight(self, base, x, w, bias=None):
        return x @ w if bias is None else torch.addmm(bias, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], -1)

    def add_lowrank_weight(self, w, A, B, scale):
        # in the stored (in, out) layout: reading w transposed would make this twice as slow
        if w.dtype != A.dtype:
            return super().add_lowrank_weight(w, A, B, scale)
        return torch.addmm(w, A.t(), B.t(), alpha=scale)


class Conv2dKind(LayerKind):
    name = "conv2d"

    def matches(self, module):
        return isinstance(module, nn.Conv2d)

    def in_out(self, base):
        if base.groups != 1 or tuple(base.dilation) != (1, 1):
            raise GraftingError("Conv2d targets must have groups=1 and dilation=1 "
                                f"(got groups={base.groups}, dilation={tuple(base.dilation)})")
        return base.in_channels, base.out_channels

    def factor_shapes(self, base, r):
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)

    def lowrank(self, base, x, A, B):
        return F.conv2d(F.conv2d(x, A, stride=base.stride, padding=base.padding), B)

    def apply_weight(self, base, x, w, bias=None):
        return F.conv2d(x, w, bias, base.stride, base.padding, base.dilation, base.groups)

    def out_view(self, v, out):
        return v.view(1, -1, *([1] * (out.dim() - 2)))


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: weight (num_embeddings, dim). PEFT's factors: A (r, num_embeddings), B (dim, r)."""

    name = "embedding"

    def matches(self, module):
        return isinstance(module, nn.Embedding)

    def in_out(self, base):
        return base.num_embeddings, base.embedding_dim

    def to_out_in(self, w):
        return w.t()

    def from_out_in(self, m, like):
        return m.t()

    def _embed(self, base, x, w):
        return F.embedding(x, w, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def lowrank(self, base, x, A, B):
        return self._embed(base, x, A.t()) @ B.t()

    def apply_weight(self, base, x, w, bias=None):
        return self._embed(base, x, w)

    def bias(self, base):
        return None


KINDS: tuple[LayerKind, ...] = (LinearKind(), Conv1DKind(), Conv2dKind(), EmbeddingKind())


class AdapterSet:
    """Identity of a set of adapters on a layer (see :meth:`HostLayer.adapter_set`); gone with its last layer."""

    __slots__ = ("__weakref__",)


_ADAPTER_SETS: "weakref.WeakValueDictionary[tuple, AdapterSet]" = weakref.WeakValueDictionary()


def kind_of(module: nn.Module) -> LayerKind | None:
    for kind in KINDS:
        if kind.matches(module):
            return kind
    return None


class HostLayer(nn.Module):
    """Wraps ``base_layer`` and adds the deltas of its adapters.

    ``routing`` is shared by every host layer of one model: it says which adapters are active, whether
    adapters are disabled, and, for mixed batches, which adapter each row uses.
    """

    def __init__(self, base_layer: nn.Module, kind: LayerKind, routing: Any, name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.methods: dict[str, Any] = {}
        self.merged: dict[str, Any] = {}  # adapter name -> what its method needs to unmerge
        self._routing = routing
        self._stack = None  # batching.LowRankStack, built on the first mixed batch
        self._adapter_set = None  # see adapter_set()
        kind.in_out(base_layer)  # validates the base layer
        w = kind.weight(base_layer)
        if not (isinstance(w, torch.Tensor) and w.is_floating_point()):
            got = type(w).__name__ if not isinstance(w, torch.Tensor) else f"a {w.dtype} tensor"
            raise GraftingError(f"module '{name}' ({type(base_layer).__name__}) has weight {got}; a base layer "
                                "with packed or integer storage must offer dequantize() returning the dense float "
                                "weight (see docs/concepts.md, 'Any base')")

    # Sealed adapters (hashing.seal) are trusted to be unchanged: every torch Module path that can change them
    # in place below this layer drops every seal of the model
    def train(self, mode: bool = True):
        if mode:
            self._routing.sealed.clear()  # a seal vouches for eval mode
        return super().train(mode)

    def apply(self, fn):
        self._routing.sealed.clear()  # fn may initialise weights in place (nn.init)
        return super().apply(fn)

    def _load_from_state_dict(self, *args, **kwargs):
        self._routing.sealed.clear()  # load_state_dict copies into the parameters in place
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # the mixed-batch stack is a cache of adapter tensors: it follows .to() / .double() like they do
        super()._apply(fn, recurse)
        self._routing.sealed.clear()  # `.data =` swaps keep tensor versions
        if self._stack is not None:
            keep = self._routing.stack_dtype  # a store dtype set on purpose survives .float() / .double()
            self._stack.apply(fn if keep is None else (lambda t: fn(t).to(keep)))
        return self

    @property
    def in_features(self) -> int:
        return self.kind.in_out(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return self.kind.in_out(self.base_layer)[1]

    def dense_weight(self) -> torch.Tensor:
        return self.kind.weight(self.base_layer)

    def add(self, name: str, method: Any, adapter: nn.Module) -> None:
        self.adapters[name] = adapter
        self.methods[name] = method
        self._adapter_set = None

    def adapter_set(self) -> "AdapterSet":
        """This layer's kind and (adapter name, method) pairs, interned: every layer holding the same adapters
        returns the same object, so a mixed call works out their split once for all of them."""
        if self._adapter_set is None:
            value = (self.kind, tuple(self.methods.items()))
            self._adapter_set = _ADAPTER_SETS.get(value)
            if self._adapter_set is None:
                self._adapter_set = _ADAPTER_SETS[value] = AdapterSet()
        return self._adapter_set

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise GraftingError(f"adapter '{name}' is merged; unmerge it before deleting it")
        if self._stack is not None:
            self._stack.free(name)
        del self.adapters[name]
        del self.methods[name]
        self._adapter_set = None

    # ---- merging ----------------------------------------------------------------------------------------------
    def can_write_weight(self) -> str | None:
        """None when a dense weight can be written into the base; otherwise why not."""
        base = self.base_layer
        if stores_plain_weight(base) or callable(getattr(base, "quantize_", None)):
            return None
        return (f"{type(base).__name__} stores its weight packed ({'dequantize()' if hasattr(base, 'dequantize') else 'no float weight'}) "
                "and offers no quantize_(weight) to re-quantize a merged weight")

    def write_weight(self, weight: torch.Tensor) -> None:
        """Replace the base's dense weight: copied into a plain float weight, or re-quantized by the base."""
        why = self.can_write_weight()
        if why is not None:
            raise GraftingError(f"cannot write a merged weight into this layer: {why}")
        base = self.base_layer
        with torch.no_grad():
            if stores_plain_weight(base):
                base.weight.copy_(weight.to(base.weight.dtype))
            else:
                base.quantize_(weight.detach())

    def merge(self, name: str) -> None:
        if name in self.merged or name not in self.adapters:
            return
        method = self.methods[name]
        plain = stores_plain_weight(self.base_layer)
        # a re-quantized merge cannot be undone by subtraction: keep the packed state to restore it exactly
        saved = None if plain else {k: v.clone() for k, v in self.base_layer.state_dict().items()}
        with torch.no_grad():
            new_weight, token = method.merge(self.adapters[name], self)
            self.write_weight(new_weight)
        self.merged[name] = (token, saved)

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        token, saved = self.merged.pop(name)
        if saved is not None:
            self.base_layer.load_state_dict(saved)
            return
        with torch.no_grad():
            self.write_weight(self.methods[name].unmerge(self.adapters[name], self, token))

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = self._routing
        if routing.sealed and torch.is_grad_enabled():
            routing.sealed.clear()  # a forward with grad may be a training step's, even in eval mode
        rows = routing.rows
        if rows is not None:
            from .batching import mixed_forward
            return mixed_forward(self, x, rows, *args, **kwargs)
        if not routing.enabled:
            if self.merged:
                raise GraftingError(f"adapters {sorted(self.merged)} are merged into the base weights; "
                                    "call unmerge() before disabling adapters")
            return self.base_layer(x, *args, **kwargs)
        active = [n for n in routing.active if n in self.adapters and n not in self.merged]
        if len(active) == 1 and not args and not kwargs and self._fold_pays(active[0], x):
            weight, _ = self.methods[active[0]].merge(self.adapters[active[0]], self)
            return self.kind.apply_weight(self.base_layer, x, weight, self.kind.bias(self.base_layer))
        out = self.base_layer(x, *args, **kwargs)
        for name in active:
            out = self.methods[name].add_delta(self.adapters[name], self, x, out)
        return out

    def _fold_pays(self, name: str, x: torch.Tensor) -> bool:
        """Whether to run this input through W + ΔW, folded for this call only, instead of W plus the adapter.

        Folding s·B·A into a temporary weight costs in·out·r multiply-adds; the adapter's two thin matmuls cost
        tokens·(in + out)·r and run far below the GEMM's speed. Past in·out / (in + out) tokens (prefill,
        evaluation) one GEMM with the folded weight is cheaper. Only without gradients: backward through a
        folded weight would compute a full in x out weight gradient. Nothing is stored.
        """
        base = self.base_layer
        if not (self.kind.gathered and x.is_floating_point()):
            return False
        fan_in, out = self.kind.in_out(base)
        if (x.numel() // fan_in) * (fan_in + out) < fan_in * out:  # checked first: decode steps stop here
            return False
        method, adapter = self.methods[name], self.adapters[name]
        if not (method.mergeable and method.low_rank_form and method.deterministic(adapter)):
            return False
        if not _runs_as_matmul(base, self.kind):
            return False
        params = list(adapter.parameters())
        if not params or not x.dtype == params[0].dtype == base.weight.dtype:
            return False
        # the folded weight is detached: never while any derivative (reverse, forward, higher order) is built
        return not tracking_derivatives(x, base.weight, *params)

    def extra_repr(self) -> str:
        return f"kind={self.kind.name}, adapters={list(self.adapters)}, merged={list(self.merged)}"


def _runs_as_matmul(base: nn.Module, kind: LayerKind) -> bool:
    """The base layer's forward is exactly its kind's matmul with ``base.weight``: a folded weight can replace it.

    Not so for subclasses with their own forward, quantized layers (their kernels may also quantize the input),
    instance-level forwards (accelerate's offload hooks), forward hooks, and weights not materialised yet.
    """
    if type(base) not in kind.plain_types() or "forward" in base.__dict__ or hasattr(base, "dequantize"):
        return False
    if base._forward_hooks or base._forward_pre_hooks or _module._global_forward_hooks \
            or _module._global_forward_pre_hooks:
        return False
    weight = getattr(base, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.device.type != "meta"
