"""AdaptedModel: a base model plus named adapters; the object users train, save, merge and serve.

It is an ``nn.Module`` that holds the base model (so ``.to()``, ``.eval()``, ``.parameters()`` and
``state_dict()`` behave as usual) and forwards ``forward``, ``generate`` and ``config`` explicitly.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

from torch import nn

from .batching import RowRouting, Routing
from .config import LoraConfig
from .errors import GraftingError
from .inject import ModulesToSave, find_modules_to_save, find_targets, host_for, iter_candidates, replace_module
from .layers import HostLayer
from .registry import get_method

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

# PEFT trains (and saves) the task head in full for these task types, whether or not modules_to_save names it
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


class AdaptedModel(nn.Module):
    def __init__(self, base_model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        if isinstance(base_model, AdaptedModel):
            raise GraftingError("the model is already adapted; use add_adapter() to add another adapter")
        self.base_model = base_model
        self._routing = Routing()
        self.peft_config: dict[str, LoraConfig] = {}
        self._frozen: set = set()  # adapters loaded for inference only (is_trainable=False)
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_active(adapter_name)

    # ---- what the base model offers ---------------------------------------------------------------------------
    @property
    def config(self):
        return getattr(self.base_model, "config", None)

    def forward(self, *args, adapter_names: list | None = None, **kwargs):
        with self._rows(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list | None = None, **kwargs):
        with self._rows(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _rows(self, adapter_names):
        if adapter_names is None:
            yield
            return
        for name in adapter_names:
            if name is not None and name not in self.peft_config:
                raise GraftingError(f"adapter_names names unknown adapter '{name}'; loaded: {self.adapter_names()}")
        device = next(self.base_model.parameters()).device
        self._routing.rows = RowRouting.build(list(adapter_names), self._routing.slot_of, device)
        try:
            yield
        finally:
            self._routing.rows = None

    # ---- adapters ---------------------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.peft_config)

    @property
    def active_adapters(self) -> tuple:
        return self._routing.active

    def hosts(self) -> Iterator[tuple[str, HostLayer]]:
        """(module name relative to the base model, host layer) for every adapted layer."""
        for name, module in iter_candidates(self.base_model):  # does not descend into host layers
            if isinstance(module, HostLayer):
                yield name, module

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        for name, module in iter_candidates(self.base_model):
            if isinstance(module, ModulesToSave):
                yield name, module

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise GraftingError(f"adapter name {name!r} must be non-empty letters, digits, '_' or '-'")
        if name in self.peft_config:
            raise GraftingError(f"adapter '{name}' already exists; delete_adapter('{name}') first")
        if not isinstance(config, LoraConfig):
            raise GraftingError(f"config must be a grafting LoraConfig, got {type(config).__name__}")
        config.validate()
        method = get_method(config.method)
        targets = find_targets(self.base_model, config.target_modules)
        created = []
        try:
            for module_name, module in targets:
                host = host_for(self.base_model, module_name, module, self._routing)
                if host.kind.name not in method.layer_kinds:
                    raise GraftingError(f"method '{method.name}' does not support {host.kind.name} layers "
                                        f"(module '{module_name}')")
                r, alpha = config.rank_and_alpha(module_name)
                host.add(name, method, method.create(host, config, r, alpha))
                created.append(host)
            to_save = list(config.modules_to_save or [])
            heads = [h for h in _TASK_HEADS.get(config.task_type or "", ()) if h not in to_save
                     and any(n == h or n.endswith("." + h) for n, _ in self.base_model.named_modules())]
            if to_save or heads:
                for _, saved in find_modules_to_save(self.base_model, to_save + heads, self._routing):
                    saved.add(name)
        except Exception:
            for host in created:
                host.remove(name)
            for _, saved in self.saved_modules():
                if name in saved.copies:
                    del saved.copies[name]
            raise
        self.peft_config[name] = config
        self._routing.assign_slot(name)
        if not self._routing.active:
            self.set_active(name)
        else:  # a new adapter starts inactive, so frozen; no need to revisit every other adapter
            for _, host in self.hosts():
                if name in host.adapters:
                    host.adapters[name].requires_grad_(False)
            for _, saved in self.saved_modules():
                if name in saved.copies:
                    saved.copies[name].requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        for _, host in self.hosts():
            if name in host.adapters:
                host.remove(name)
        for _, saved in self.saved_modules():
            if name in saved.copies:
                del saved.copies[name]
        del self.peft_config[name]
        self._frozen.discard(name)
        self._routing.slot_of.pop(name, None)
        self._routing.active = tuple(a for a in self._routing.active if a != name)
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
        for name in active - self._frozen:
            bias = self.peft_config[name].bias
            if bias == "all":
                for pname, p in self.base_model.named_parameters():
                    if pname.endswith("bias") and ".copies." not in pname and "original_module" not in pname:
                        p.requires_grad_(True)
            elif bias == "lora_only":
                for _, host in self.hosts():
                    if name in host.adapters and getattr(host.base_layer, "bias", None) is not None:
                        host.base_layer.bias.requires_grad_(True)

    @contextlib.contextmanager
    def disabled(self):
        """Run the base model alone inside this block."""
        previous = self._routing.enabled
        self._routing.enabled = False
        try:
            yield self
        finally:
            self._routing.enabled = previous

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
    def save_adapter(self, path, name: str | None = None) -> None:
        from .io.peft_format import save_adapter
        save_adapter(self, path, name or (self._routing.active[0] if self._routing.active else "default"))

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


def adapt(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> AdaptedModel:
    """Wrap ``model`` and inject one adapter, made active."""
    return AdaptedModel(model, config, adapter_name)


def load(model: nn.Module, path, adapter_name: str = "default", is_trainable: bool = False) -> AdaptedModel:
    """Adapt ``model`` with the adapter saved at ``path`` (PEFT or grafting directory)."""
    adapted = AdaptedModel(model)
    adapted.load_adapter(path, adapter_name, is_trainable=is_trainable)
    adapted.set_active(adapter_name)
    return adapted


