"""AdaptedModel: a base model plus named adapters; the object users train, save, merge and serve.

It is an ``nn.Module`` that holds the base model (so ``.to()``, ``.eval()``, ``.parameters()`` and
``state_dict()`` behave as usual) and forwards ``forward``, ``generate`` and ``config`` explicitly.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterable, Iterator

import torch
from torch import nn

from .autodiff import transforms_active
from . import store
from .batching import RowRouting, Routing
from .config import AdapterConfig
from .errors import GraftingError
from .hashing import call_state, content_hashes, seal, unseal
from .inject import AdaptedTree, ModulesToSave, inject_adapter, replace_module
from .layers import HostLayer
from .registry import fixed_flags, get_method, method_for_config

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

class AdaptedModel(nn.Module):
    def __init__(self, base_model: nn.Module, config: AdapterConfig | None = None, adapter_name: str = "default",
                 calibration: Iterable | None = None):
        super().__init__()
        if isinstance(base_model, AdaptedModel):
            raise GraftingError("the model is already adapted; use add_adapter() to add another adapter")
        self.base_model = base_model
        self.shared_tensors = nn.ModuleDict()  # adapter name -> its method's model-level tensors (if any)
        self._routing = Routing()
        self.peft_config: dict[str, AdapterConfig] = {}
        self._frozen: set = set()  # adapters loaded for inference only (is_trainable=False)
        self._initial: dict = {}  # adapter -> {module: tensors right after an init that changed the base}
        self._hashes: dict = {}  # adapter -> (version key, content hash)
        # adapter -> strings saved in its safetensors __metadata__ (e.g. the base fingerprint of a LoftQ init)
        self.adapter_metadata: dict[str, dict[str, str]] = {}
        if config is not None:
            self.add_adapter(adapter_name, config, calibration=calibration)
            self.set_active(adapter_name)

    # ---- what the base model offers ---------------------------------------------------------------------------
    @property
    def config(self):
        return getattr(self.base_model, "config", None)

    def forward(self, *args, adapter_names: list | None = None, **kwargs):
        with self._rows(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list | None = None, **kwargs):
        """The base model's ``generate``; with ``adapter_names`` one adapter per input row, expanded (as peft
        does) when beams or several return sequences copy each row."""
        with self._rows(adapter_names, expandable=True):
            return self.base_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _rows(self, adapter_names, expandable: bool = False):
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise GraftingError(f"adapter_names must be a list with one adapter name (or None) per row, "
                                f"got {adapter_names!r}")
        for name in adapter_names:
            if name is not None and name not in self.peft_config:
                raise GraftingError(f"adapter_names names unknown adapter '{name}'; loaded: {self.adapter_names()}")
        device = next(self.base_model.parameters()).device
        hashes, training = call_state(self, sorted({n for n in adapter_names if n is not None}))
        # layers may replay the plans of an earlier call with these rows, unless an adapter is in training mode
        # (dropout, or a method's stochastic forward, may decide per call which rows take the gathered kernel)
        if not training and not torch.is_grad_enabled() and not transforms_active():
            store.write_new(self, hashes)
        rows = RowRouting.build(list(adapter_names), self._routing.slot_of, hashes, device, expandable,
                                cacheable=not training)
        token = self._routing._rows.set(rows)
        try:
            yield
        finally:
            self._routing._rows.reset(token)

    def content_hash(self, name: str) -> str:
        """SHA-256 of the adapter's config and tensors (what ``save_adapter`` would write). Mixed-batch stacks key
        on it, so a name reloaded with other weights never serves stale factors; cached on tensor versions."""
        self._require(name)
        return content_hashes(self, [name])[name]

    def seal_adapters(self, names=None) -> list[str]:
        """Let mixed calls trust these adapters' content hashes instead of re-reading every tensor's version
        (:func:`grafting.hashing.seal`: what a serving pool does for what it installs; in-place edits from
        outside are then not seen). Adapters in training mode are skipped; returns the names sealed."""
        names = self.adapter_names() if names is None else list(names)
        for name in names:
            self._require(name)
        return seal(self, names)

    # ---- adapters ---------------------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.peft_config)

    @property
    def active_adapters(self) -> tuple:
        return self._routing.active

    def hosts(self) -> Iterator[tuple[str, HostLayer]]:
        """(module name relative to the base model, host layer) for every adapted layer."""
        return iter(self._tree()[0])

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        return iter(self._tree()[1])

    def _tree(self) -> tuple[list, list]:
        """(hosts, modules_to_save wrappers), listed again only when the module tree changed (AdaptedTree)."""
        tree = self.__dict__.get("_adapted_tree")
        if tree is None:
            tree = self.__dict__["_adapted_tree"] = AdaptedTree()
        return tree.get(self.base_model)

    def adapter_roots(self, name: str) -> list[nn.Module]:
        """The modules holding everything adapter ``name`` owns: its layers, saved heads, shared tensors."""
        roots = [h.adapters[name] for _, h in self.hosts() if name in h.adapters]
        roots += [s.copies[name] for _, s in self.saved_modules() if name in s.copies]
        if name in self.shared_tensors:
            roots.append(self.shared_tensors[name])
        return roots

    def train_adapter(self, name: str, mode: bool = True) -> None:
        """``train(mode)`` for adapter ``name``'s modules only: a serving pool's install would cost more as a
        walk of the whole model. New adapters start in training mode, as in torch and peft, unless this model
        is in eval mode."""
        self._require(name)
        unseal(self, [name])  # a seal vouches for eval mode
        for root in self.adapter_roots(name):
            root.train(mode)

    def add_adapter(self, name: str, config: AdapterConfig, calibration: Iterable | None = None) -> None:
        """Inject adapter ``name`` built by ``config`` (any registered method's config).

        ``calibration``: batches (dicts of model inputs, tuples, or tensors) whose activations a data-aware init
        reads; required when the method says so (``Method.needs_calibration``)."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise GraftingError(f"adapter name {name!r} must be non-empty letters, digits, '_' or '-'")
        if name in self.peft_config:
            raise GraftingError(f"adapter '{name}' already exists; delete_adapter('{name}') first")
        if not isinstance(config, AdapterConfig):
            raise GraftingError(f"config must be a grafting adapter config (e.g. gf.LoraConfig), "
                                f"got {type(config).__name__}")
        config.validate()
        method = method_for_config(config)
        if not isinstance(config, method.config_class):  # LoraConfig(use_dora=True) -> DoraConfig
            config = method.config_class.from_peft_dict({**config.to_peft_dict(), **fixed_flags(method)}, "config")
        if method.needs_calibration(config) and calibration is None:
            raise GraftingError(f"method '{method.name}' initialises from activations: pass "
                                "add_adapter(..., calibration=batches)")
        config, ranks = inject_adapter(self, name, config, method, calibration)
        self.peft_config[name] = config
        if not self.training:  # a model put in eval mode (serving, evaluation) keeps a new adapter there too
            self.train_adapter(name, False)
        low_rank = ranks and all(r is not None for r in ranks)
        self._routing.assign_slot(name, max(ranks) if low_rank else None)
        if not self._routing.active:
            self.set_active(name)
        else:  # a new adapter starts inactive, so frozen; no need to revisit every other adapter
            for _, host in self.hosts():
                if name in host.adapters:
                    host.adapters[name].requires_grad_(False)
            for _, saved in self.saved_modules():
                if name in saved.copies:
                    saved.copies[name].requires_grad_(False)
            if name in self.shared_tensors:
                self.shared_tensors[name].requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if any(name in h.merged for _, h in self.hosts()):
            raise GraftingError(f"adapter '{name}' is merged; unmerge it before deleting it")
        config = self.peft_config[name]
        method = get_method(config.method)
        for module_name, host in self.hosts():
            if name in host.adapters:
                if name in self._initial:  # the init changed this base weight: put the original back
                    method.undo_init(self._initial[name][module_name], host.adapters[name], host,
                                     self.peft_config[name])
                host.remove(name)
        for _, saved in self.saved_modules():
            if name in saved.copies:
                del saved.copies[name]
        if name in self.shared_tensors:
            del self.shared_tensors[name]
        del self.peft_config[name]
        self._initial.pop(name, None)
        self.adapter_metadata.pop(name, None)
        self._hashes.pop(name, None)
        unseal(self, [name])
        self.__dict__.get("_stacked", (None, {}))[1].pop(name, None)
        self.__dict__.get("_owners", {}).pop(name, None)  # hashing's module lists: they would keep it alive
        self._frozen.discard(name)
        self._routing.slot_of.pop(name, None)
        if name in self._routing.active:
            self._routing.active = tuple(a for a in self._routing.active if a != name)
            if getattr(config, "bias", "none") != "none":  # only its trainable biases change: walk the model
                self._set_trainable()

    def set_active(self, names) -> None:
        """Make ``names`` (one name or a list) the adapters applied to every row; only they are trainable."""
        names = (names,) if isinstance(names, str) else tuple(names)
        for n in names:
            self._require(n)
        self._routing.active = names
        self._set_trainable()

    def _require(self, name: str) -> None:
        if name not in self.peft_config:
            raise GraftingError(f"no adapter named '{name}'; loaded: {self.adapter_names()}")

    def _set_trainable(self) -> None:
        active = set(self._routing.active)
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for _, host in self.hosts():
            for name, adapter in host.adapters.items():
                adapter.requires_grad_(name in active and name not in self._frozen)
        for _, saved in self.saved_modules():
            for name, copy_ in saved.copies.items():
                copy_.requires_grad_(name in active and name not in self._frozen)
        for name, shared in self.shared_tensors.items():
            shared.requires_grad_(name in active and name not in self._frozen)
        for name in active - self._frozen:
            bias = getattr(self.peft_config[name], "bias", "none")
            if bias == "all":
                for pname, p in self.base_model.named_parameters():
                    if pname.endswith("bias") and ".copies." not in pname and "original_module" not in pname:
                        p.requires_grad_(True)
            elif isinstance(bias, str) and bias.endswith("_only"):  # the adapted layers' biases (lora_only, vera_only)
                for _, host in self.hosts():
                    if name in host.adapters and getattr(host.base_layer, "bias", None) is not None:
                        host.base_layer.bias.requires_grad_(True)

    @contextlib.contextmanager
    def disabled(self):
        """Run the base model alone inside this block (this thread / task only)."""
        token = self._routing._enabled.set(False)
        try:
            yield self
        finally:
            self._routing._enabled.reset(token)

    def param_groups(self, name: str | None = None) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters of adapter ``name`` (default: the active ones) by role.

        Roles come from each method's ``param_groups`` (``weights``, ``architecture``, ...), plus ``saved`` for
        modules trained in full (modules_to_save, task heads), ``shared`` for trainable model-level tensors and
        ``bias`` for base biases the config trains. Every trainable parameter is in exactly one group."""
        names = self._routing.active if name is None else (name,)
        for n in names:
            self._require(n)
        groups: dict[str, list] = {}
        seen: set = set()

        def put(role, p):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                groups.setdefault(role, []).append(p)

        for n in names:
            for _, host in self.hosts():
                if n in host.adapters:
                    adapter = host.adapters[n]
                    for role, pnames in host.methods[n].param_groups(adapter).items():
                        for pname in pnames:
                            put(role, adapter.get_parameter(pname))
                    for _, p in adapter.named_parameters():
                        put("weights", p)  # parameters a method's param_groups did not name
            for _, saved in self.saved_modules():
                if n in saved.copies:
                    for p in saved.copies[n].parameters():
                        put("saved", p)
            if n in self.shared_tensors:
                for p in self.shared_tensors[n].parameters():
                    put("shared", p)
        for pname, p in self.base_model.named_parameters():
            if ".adapters." not in pname and ".copies." not in pname:
                put("bias", p)  # base parameters the config trains (bias="all" / "lora_only")
        return {k: v for k, v in groups.items() if v}

    def on_step(self, step: int, total: int) -> None:
        """Per-step hooks of the active adapters' methods (rank budgets, rank sampling); the trainer calls this
        after every optimizer step."""
        unseal(self, self._routing.active)  # the hooks edit weights in place (masks, rank truncation)
        for n in self._routing.active:
            method = get_method(self.peft_config[n].method)
            layers = [(m, h, h.adapters[n]) for m, h in self.hosts() if n in h.adapters]
            method.on_step(layers, self.shared_tensors[n] if n in self.shared_tensors else None,
                           self.peft_config[n], step, total)

    def regularizer(self, name: str | None = None):
        """The methods' training penalties for adapter ``name`` (default: the active ones), summed; a zero
        tensor when no method has one. Trainers add it to the loss of the level that trains the weights."""
        total = None
        for n in (self._routing.active if name is None else (name,)):
            self._require(n)
            method = get_method(self.peft_config[n].method)
            layers = [(m, h, h.adapters[n]) for m, h in self.hosts() if n in h.adapters]
            term = method.regularizer(layers, self.shared_tensors[n] if n in self.shared_tensors else None,
                                      self.peft_config[n])
            if term is not None:
                total = term if total is None else total + term
        if total is None:
            p = next(iter(self.parameters()), None)
            return torch.zeros((), device=None if p is None else p.device)
        return total

    def reserve(self, adapters: int, rank: int) -> None:
        """Preallocate mixed-batch room for ``adapters`` low-rank adapters of rank <= ``rank`` in every layer,
        so loading them later never reallocates the stacks (serving keeps a fixed budget this way). Layers that
        get their first adapter later (a server starts with none) get the same room when their stack is made."""
        store.reserve(self, adapters, rank)

    def set_stack_dtype(self, dtype: torch.dtype | None) -> None:
        """Keep the mixed-batch store's factors in ``dtype`` (None: the adapters' own). ``torch.bfloat16``
        halves what a decode step with many distinct adapters reads; grafting's kernel widens them to fp32 in
        registers (logits move by about bf16's rounding of the factors, 2^-8 relative). ``torch.int8`` quarters
        it: each factor quantized symmetrically with one fp32 scale per rank (A's columns, B's rows), applied
        once per row by the kernel (the torch path reads dequantized copies); its error is reported in
        docs/benchmarks.md. The store is refilled from the adapters on the next mixed call (or
        :meth:`stack_adapters`); reserve room again if needed."""
        store.set_dtype(self, dtype)

    def stack_adapters(self, names=None) -> None:
        """Write adapters' factors (default: all) into the mixed-batch stacks now, as their first mixed call
        would: a server that preloads adapters then serves its first requests without that copy."""
        names = list(self.peft_config) if names is None else [names] if isinstance(names, str) else list(names)
        for n in names:
            self._require(n)
        store.write(self, names, call_state(self, names)[0])

    def trainable_summary(self) -> dict:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}

    # ---- merging ----------------------------------------------------------------------------------------------
    def merge(self, names=None) -> None:
        """Fold adapters (default: the active ones) into the base weights."""
        names = self._routing.active if names is None else ((names,) if isinstance(names, str) else tuple(names))
        for n in names:
            self._require(n)
            method = get_method(self.peft_config[n].method)
            if not method.mergeable:
                raise GraftingError(f"adapter '{n}' uses method '{method.name}', which cannot be merged")
        for module_name, host in self.hosts():  # refuse before touching any layer: no half-merged model
            why = host.can_write_weight()
            if why is not None and any(n in host.adapters for n in names):
                raise GraftingError(f"cannot merge into module '{module_name}': {why}")
        for _, host in self.hosts():
            for n in names:
                host.merge(n)

    def unmerge(self) -> None:
        for _, host in self.hosts():
            for n in list(host.merged)[::-1]:
                host.unmerge(n)

    def merge_and_unload(self, names=None) -> nn.Module:
        """Merge, then return the plain base model with host layers replaced by their (merged) base layers.

        The AdaptedModel is spent afterwards: its base model is returned to the caller."""
        names = self._routing.active if names is None else ((names,) if isinstance(names, str) else tuple(names))
        self.merge(names)
        for module_name, host in list(self.hosts()):
            replace_module(self.base_model, module_name, host.base_layer)
        for module_name, saved in list(self.saved_modules()):
            chosen = next((saved.copies[n] for n in names if n in saved.copies), saved.original_module)
            replace_module(self.base_model, module_name, chosen)
        base = self.base_model
        for p in base.parameters():
            p.requires_grad_(True)
        self.peft_config.clear()
        self._routing.active = ()
        return base

    # ---- I/O --------------------------------------------------------------------------------------------------
    def save_adapter(self, path, name: str | None = None, convert_init: bool = True, export: bool = True) -> None:
        """Write adapter ``name`` in PEFT's format. After an init that changed the base weight (PiSSA, OLoRA),
        the saved adapter applies to the *original* base (peft's conversion) unless ``convert_init=False``,
        which writes the adapter against the changed base with its init recorded (peft's native form).
        Training-time methods (AutoLoRA, BiLoRA, BiDoRA) are written as the standard method they export to
        (plain LoRA / DoRA, same outputs) unless ``export=False``, which keeps their own form (grafting reads
        it back; checkpoints use it). SoMA is written as a rank-2r LoRA against the original base unless
        ``export=False`` or ``convert_init=False``."""
        from .io.peft_format import save_adapter
        save_adapter(self, path, name or (self._routing.active[0] if self._routing.active else "default"),
                     convert_init=convert_init, export=export)

    def load_adapter(self, path, name: str = "default", is_trainable: bool = False) -> None:
        from .io.peft_format import load_adapter
        if not is_trainable:
            self._frozen.add(name)
        try:
            load_adapter(self, path, name)
        except Exception:
            self._frozen.discard(name)
            raise
        if name in self._routing.active:
            self._set_trainable()
        if not is_trainable:  # as peft's load_adapter: for inference, so no dropout is left active
            self.eval()


def adapt(model: nn.Module, config: AdapterConfig, adapter_name: str = "default",
          calibration: Iterable | None = None) -> AdaptedModel:
    """Wrap ``model`` and inject one adapter (any registered method's config), made active."""
    return AdaptedModel(model, config, adapter_name, calibration=calibration)


def load(model: nn.Module, path, adapter_name: str = "default", is_trainable: bool = False) -> AdaptedModel:
    """Adapt ``model`` with the adapter saved at ``path`` (PEFT or grafting directory)."""
    adapted = AdaptedModel(model)
    adapted.load_adapter(path, adapter_name, is_trainable=is_trainable)
    adapted.set_active(adapter_name)
    return adapted


