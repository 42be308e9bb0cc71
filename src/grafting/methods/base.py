"""The method interface every adapter method implements (docs/concepts.md walks through a new one).

A method is stateless. For one host layer it builds an adapter module (the adapter's own parameters and frozen
buffers) and says what that adapter changes; it may own model-level tensors shared by all its layers
(:meth:`create_shared`), run an initialisation stage that reads the base weight or calibration activations and
may change the base weight (:meth:`init`), and act once per training step (:meth:`on_step`). Capabilities are
class attributes, so the model, the contract tests and later consumers (merging, serving, bi-level recipes) read
declarations instead of special-casing methods. ``name``, ``config_class`` and ``flags`` are set by
:func:`grafting.register`.

The minimum for a new method: :meth:`create`, :meth:`delta_weight` (dense ΔW) and :meth:`peft_keys`; the
default :meth:`delta` applies ΔW through the layer's own transform, so forward, mixed batches (grouped rows),
merge/unmerge and save/load all work. A low-rank method also returns its factors from :meth:`low_rank` and
:meth:`factors_from_tensors` and gets the gathered mixed-batch kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Method:
    name: str = ""
    config_class: type = None  # set by register()
    flags: dict = {}  # set by register()
    #: host-layer kinds this method supports (see layers.KINDS)
    layer_kinds: frozenset = frozenset({"linear", "conv1d", "conv2d", "embedding"})
    #: ΔW can be folded into the base weight
    mergeable: bool = True
    #: rescales the whole output per feature (DoRA-like); mixed batches then need ``output_scale``
    rescales_output: bool = False
    #: ``low_rank`` returns factors (ΔW = scale·B·A): mixed batches use the gathered kernel
    low_rank_form: bool = False
    #: config fields for tiny layers (the contract tests adapt 12 -> 10 layers) where a default sized for real
    #: models cannot fit them (a block size that must divide the layer's widths)
    tiny_fields: dict = {}
    #: a freshly initialised adapter leaves the model's output unchanged (a zero update, or an init that
    #: compensates its change of the base, as PiSSA). False for a method whose init changes the function on
    #: purpose (e.g. one that drops part of the base weight's spectrum); the contract tests then check that it does
    starts_at_base: bool = True
    #: the export (:meth:`export_config`) is what writes the adapter against the original base, the role
    #: ``save_adapter``'s conversion plays for base-changing inits, so ``convert_init=False`` keeps the native
    #: form as ``export=False`` does (SoMA, whose native form that keyword has always selected)
    export_converts_base: bool = False

    @property
    def description(self) -> str:
        """One line: the first line of the method class's docstring."""
        doc = (type(self).__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @property
    def paper(self) -> str:
        """The paper the method implements: the first line of its module's docstring, which by convention names
        it with its arXiv id (``"VeRA: ... (Kopiczko et al., 2024, arXiv:2310.11454)."``)."""
        import sys
        doc = (getattr(sys.modules.get(type(self).__module__), "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""

    def make_config(self, **fields):
        """A config of this method (the registered config class with this method's flags)."""
        from ..registry import fixed_flags
        return self.config_class(**{**fields, **fixed_flags(self)})

    # ---- building ---------------------------------------------------------------------------------------------
    def create_shared(self, cfg, targets: list) -> nn.Module | None:
        """Model-level tensors shared by all layers of one adapter (VeRA's projections), or None.

        ``targets``: (module name, host layer) pairs the adapter will be created on. Parameters are trained
        with the adapter; buffers are frozen. Saved once, under :meth:`shared_keys`."""
        return None

    def create(self, host: nn.Module, cfg, module_name: str, shared: nn.Module | None) -> nn.Module:
        """Build the adapter's parameters (and frozen buffers) for one host layer."""
        raise NotImplementedError

    def needs_calibration(self, cfg) -> bool:
        """:meth:`init` needs activations: ``add_adapter(..., calibration=batches)`` must provide them."""
        return False

    def calibration_statistic(self, cfg, inputs: list):
        """What :meth:`init` receives as ``activations`` from one layer's inputs over the calibration batches
        (``inputs``: one (rows, fan_in) float tensor per forward call). Default: the rows concatenated; a method
        whose statistic is per call (CorDA's per-batch normalised covariance) reduces them here."""
        return torch.cat(inputs)

    def calibration_mask(self, cfg, batch) -> torch.Tensor | None:
        """A boolean mask over one calibration batch's leading dimensions choosing the rows whose layer inputs
        count (EVA: non-padding, labelled tokens), or None for every row."""
        return None

    def plan(self, cfg, statistics: dict):
        """Revise the config from every target layer's calibration statistic before the adapters are built
        (EVA redistributes ranks across layers): returns ``(config, statistics)``; a module the revised config
        no longer targets gets no adapter, and :meth:`init` receives the returned statistic of its layer."""
        return cfg, statistics

    def changes_base(self, cfg) -> bool:
        """:meth:`init` changes the base weight (PiSSA, OLoRA): the model records the initial adapter so that
        saving can write a delta against the original base, and deleting the adapter restores the base."""
        return False

    def init(self, adapter: nn.Module, host: nn.Module, cfg, activations: torch.Tensor | None) -> None:
        """The initialisation stage, after every layer's adapter exists. ``activations``: (rows, fan_in) inputs of
        this layer over the calibration batches, when :meth:`needs_calibration`. May write the base weight."""

    def undo_init(self, initial: dict, adapter: nn.Module, host: nn.Module, cfg) -> None:
        """Restore the base weight that :meth:`init` changed, given the adapter's tensors right after init."""
        raise NotImplementedError

    def to_original_base(self, now: dict, initial: dict, cfg) -> dict:
        """On-disk tensors of an adapter that applies to the original base (before :meth:`init` changed it)."""
        raise NotImplementedError

    def original_base_config(self, cfg):
        """The config saved with :meth:`to_original_base`'s tensors."""
        raise NotImplementedError

    def export_config(self, cfg):
        """The config of the standard method this adapter is saved as, or None (saved as itself). Training-time
        methods (AutoLoRA, BiLoRA, BiDoRA) export as plain LoRA / DoRA, so peft and any PEFT-compatible
        server load their output; ``save_adapter(..., export=False)`` keeps the native form (checkpoints)."""
        return None

    def export_tensors(self, now: dict, cfg, module_name: str) -> dict:
        """One layer's tensors (attribute -> tensor, as :meth:`peft_keys` names them, plus the adapter's own
        buffers, which the native file does not hold) as the exported method's attributes, exactly the same ΔW."""
        raise NotImplementedError

    def on_step(self, layers: list, shared: nn.Module | None, cfg, step: int, total: int) -> None:
        """Called by the trainer after each optimizer step (rank budgets, rank sampling), before the gradients
        are cleared: parameters' ``.grad`` still hold this step's gradients. ``step``: optimizer steps done
        (1 after the first). ``layers``: (module name, host, adapter) triples of this adapter."""

    def regularizer(self, layers: list, shared: nn.Module | None, cfg) -> torch.Tensor | None:
        """A penalty the training loss adds for this adapter (BiLoRA's and BiDoRA's orthogonality terms, weighted
        by the config), or None. ``layers``: (module name, host, adapter) triples, as for :meth:`on_step`."""
        return None

    # ---- forward ----------------------------------------------------------------------------------------------
    def delta(self, adapter: nn.Module, host: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the host's current output ``base_out`` for input ``x``. Default: ΔW applied
        through the layer's own transform (exact for every linear-in-W layer kind)."""
        dw = self.delta_weight(adapter, host)
        xin = x.to(dw.dtype) if x.is_floating_point() else x
        return host.kind.apply_weight(host.base_layer, xin, dw).to(base_out.dtype)

    def add_delta(self, adapter: nn.Module, host: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + delta(...)``; methods may fuse the two (one pass over the output instead of three)."""
        return out + self.delta(adapter, host, x, out)

    def deterministic(self, adapter: nn.Module) -> bool:
        """The adapter's forward is a fixed function of its input right now (no active dropout or noise), so a
        forward through the merged weight equals the unmerged one. Host layers then may fold ΔW per call."""
        return False

    def delta_weight(self, adapter: nn.Module, host: nn.Module) -> torch.Tensor:
        """Dense ΔW in the base weight's layout: merged weight minus base weight."""
        raise NotImplementedError

    def low_rank(self, adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A, B, scale)`` with ΔW = scale·B·A in the (out, fan_in) view, or None when not low-rank."""
        return None

    def output_scale(self, adapter: nn.Module, host: nn.Module) -> torch.Tensor | None:
        """Per-output-feature factor g with out = g·(W + ΔW)x + b, for methods that rescale the output."""
        return None

    def merge(self, adapter: nn.Module, host: nn.Module):
        """Returns (merged weight in the base layout, token for unmerge)."""
        return host.dense_weight() + self.delta_weight(adapter, host), None

    def unmerge(self, adapter: nn.Module, host: nn.Module, token) -> torch.Tensor:
        return host.dense_weight() - self.delta_weight(adapter, host)

    def param_groups(self, adapter: nn.Module) -> dict[str, list[str]]:
        """Parameter names of the adapter by role, so bi-level recipes and the trainer can place groups."""
        return {"weights": [n for n, _ in adapter.named_parameters()], "architecture": []}

    # ---- on disk ----------------------------------------------------------------------------------------------
    def peft_keys(self, kind: str) -> dict[str, str]:
        """PEFT checkpoint key suffix -> adapter attribute (a parameter or buffer) for a layer of ``kind``."""
        raise NotImplementedError

    def peft_optional_keys(self, kind: str) -> dict[str, str]:
        """Per-layer key suffix -> adapter attribute for tensors a PEFT file may also hold under every layer but
        that are never required and never written: copies of shared tensors some peft tuners save per layer as
        well as once under :meth:`shared_keys`. Read (shape-checked) into that attribute when present."""
        return {}

    def shared_keys(self, cfg) -> dict[str, str]:
        """Full checkpoint key -> attribute of the :meth:`create_shared` module (e.g. ``base_model.vera_A``)."""
        return {}

    def to_peft(self, adapter: nn.Module, host: nn.Module) -> dict[str, torch.Tensor]:
        return {k: getattr(adapter, a).detach() for k, a in self.peft_keys(host.kind.name).items()}

    def peft_shape(self, adapter: nn.Module, host: nn.Module, attr: str) -> tuple:
        """The shape a tensor has on disk (PEFT's layout)."""
        return tuple(getattr(adapter, attr).shape)

    def from_peft(self, adapter: nn.Module, host: nn.Module, attr: str, tensor: torch.Tensor) -> None:
        target = getattr(adapter, attr)
        with torch.no_grad():
            target.copy_(tensor.reshape(target.shape).to(target.dtype))

    # ---- plain tensors (no model): the adapter reader, merging, serving --------------------------------------
    def factors_from_tensors(self, tensors: dict, cfg, module_name: str, kind: str,
                             shared: dict) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, scale) in the (out, fan_in) view from one layer's on-disk tensors (by attribute), or None."""
        return None

    def rank_from_shapes(self, shapes: dict) -> int | None:
        """A layer's rank from its tensors' shapes (attribute -> shape), for header-only inspection."""
        return None

    def delta_weight_from_tensors(self, tensors: dict, cfg, module_name: str, kind: str, shared: dict,
                                  base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ΔW in the (out, fan_in) view from one layer's on-disk tensors. ``base_weight`` (same view) for
        methods whose ΔW depends on it (DoRA)."""
        f = self.factors_from_tensors(tensors, cfg, module_name, kind, shared)
        if f is None:
            raise NotImplementedError(f"method '{self.name}' does not compute ΔW from tensors")
        A, B, scale = f
        return (B.float() @ A.float()) * scale


class FactorMethod(Method):
    """A method whose adapter assembles ΔW = scaling·B·A from its own tensors (VeRA, RandLoRA, NOLA, MoS).

    The adapter provides ``factors()`` -> (A, B) in the (out, fan_in) view, a float ``scaling`` and, under the
    attribute named by ``dropout``, the dropout on the layer input. Forward (two thin matmuls, never a dense ΔW),
    ΔW, the determinism check and the gathered mixed-batch kernel follow from those."""

    low_rank_form = True
    dropout: str = "lora_dropout"

    def delta(self, adapter, host, x, base_out):
        A, B = adapter.factors()
        h = getattr(adapter, self.dropout)(x.to(A.dtype))
        return (F.linear(F.linear(h, A), B) * adapter.scaling).to(base_out.dtype)

    def delta_weight(self, adapter, host):
        A, B = adapter.factors()
        w = host.dense_weight()
        return host.kind.from_out_in((B @ A) * adapter.scaling, w).to(w.dtype)

    def deterministic(self, adapter):
        drop = getattr(adapter, self.dropout)
        return isinstance(drop, nn.Identity) or not drop.training

    def low_rank(self, adapter):
        A, B = adapter.factors()
        return A, B, adapter.scaling
