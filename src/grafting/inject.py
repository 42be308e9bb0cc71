"""Target matching, module replacement and adapter injection.

Matching follows PEFT so that configs mean the same thing in both libraries: a list of names matches a module
whose dotted name equals an entry or ends with ``"." + entry``; a string is a regex that must match the whole
module name; ``"all-linear"`` is every Linear / GPT-2 Conv1D except the model's output head.
"""

from __future__ import annotations

import copy
import itertools
import re

from torch import nn

from .errors import GraftingError
from .hashing import registrations, watch
from .init_stage import calibration_statistics, run_init
from .layers import HostLayer, kind_of

_UIDS = itertools.count(1)  # adapter modules get a uid: id() may be reused after an adapter is freed

# PEFT trains (and saves) the task head in full for these task types, whether or not modules_to_save names it
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}

ALL_LINEAR = "all-linear"


def name_matches(spec, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _output_head_names(model: nn.Module) -> set:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {n for n, m in model.named_modules() if m is head or (isinstance(m, HostLayer) and m.base_layer is head)}


def iter_candidates(model: nn.Module):
    """(name, module) for every module of the base model, seeing host layers as one module (not their insides)."""
    def walk(module: nn.Module, prefix: str):
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            yield name, child
            if not isinstance(child, (HostLayer, ModulesToSave)):
                yield from walk(child, name)
    yield from walk(model, "")


class AdaptedTree:
    """The host layers and modules_to_save wrappers of a model, listed once and listed again only when the tree
    changed: one install in a serving pool asked for them about twenty times, each a walk of the whole model.

    Two checks say "changed", both cheap: torch's global registration count (``hashing.registrations``: putting
    a host in or swapping a module is a setattr on a module listed here, each of which it watches), and, for
    every module on the path to a listed one, its children as they were, which catches what skips
    registration (``del``, ``ModuleList.pop``/``insert``)."""

    def __init__(self):
        self._key, self._paths, self.hosts, self.saved = None, [], [], []

    def get(self, model: nn.Module) -> tuple[list, list]:
        key = (id(model), registrations())
        if key != self._key or any(tuple(m._modules.values()) != kids for m, kids in self._paths):
            self._list(model)
            self._key = key
        return self.hosts, self.saved

    def _list(self, model: nn.Module) -> None:
        self.hosts, self.saved, ancestors = [], [], {"": model}
        listed = [model]
        for name, module in iter_candidates(model):  # does not descend into host layers
            listed.append(module)
            if isinstance(module, (HostLayer, ModulesToSave)):
                (self.hosts if isinstance(module, HostLayer) else self.saved).append((name, module))
                parts = name.split(".")
                for i in range(1, len(parts)):
                    prefix = ".".join(parts[:i])
                    if prefix not in ancestors:
                        ancestors[prefix] = model.get_submodule(prefix)
        self._paths = [(m, tuple(m._modules.values())) for m in ancestors.values()]
        watch(listed)


def find_targets(model: nn.Module, cfg, saved_in_full: list | None = None) -> list[tuple[str, nn.Module]]:
    """Modules the config targets: ``target_modules`` minus ``exclude_modules``, within ``layers_to_transform``.

    ``all-linear`` (as peft) never takes the output head, nor modules trained in full (``saved_in_full``: the
    config's modules_to_save and the task head, e.g. a classifier), so it combines with them."""
    target_modules = cfg.target_modules
    if target_modules is None:
        raise GraftingError("config field 'target_modules' is not set; give a list of module names, a regex, "
                            "or 'all-linear'")
    found = []
    if target_modules == ALL_LINEAR:
        heads = _output_head_names(model)
        for name, module in iter_candidates(model):
            base = module.base_layer if isinstance(module, HostLayer) else module
            k = kind_of(base)
            if k is not None and k.name in ("linear", "conv1d") and name not in heads \
                    and not (saved_in_full and name_matches(saved_in_full, name)):
                found.append((name, module))
    else:
        found = [(n, m) for n, m in iter_candidates(model) if name_matches(target_modules, n)]
    matched = len(found)
    if cfg.exclude_modules:
        found = [(n, m) for n, m in found if not name_matches(cfg.exclude_modules, n)]
    if cfg.layers_to_transform:
        found = [(n, m) for n, m in found if cfg.selects_layer(n)]
    if matched and not found:
        raise GraftingError(f"target_modules={target_modules!r} matched {matched} modules, but exclude_modules="
                            f"{cfg.exclude_modules!r} / layers_to_transform={cfg.layers_to_transform!r} "
                            f"(layers_pattern={cfg.layers_pattern!r}) left none")
    for name, module in found:
        base = module.base_layer if isinstance(module, HostLayer) else module
        if kind_of(base) is None:
            raise GraftingError(f"target module '{name}' is a {type(base).__name__}; grafting adapts "
                                "Linear, GPT-2 Conv1D, Conv2d and Embedding layers")
    if not found:
        names = [n for n, _ in iter_candidates(model)]
        shown = ", ".join(names[:60]) + (" ..." if len(names) > 60 else "")
        raise GraftingError(f"target_modules={target_modules!r} matched no module. Modules in the model: {shown}")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def host_for(model: nn.Module, name: str, module: nn.Module, routing) -> HostLayer:
    if isinstance(module, HostLayer):
        return module
    host = HostLayer(module, kind_of(module), routing, name)
    replace_module(model, name, host)
    return host


class ModulesToSave(nn.Module):
    """A module trained in full: the original plus one copy per adapter (PEFT's ``modules_to_save``)."""

    def __init__(self, original: nn.Module, routing):
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self._routing = routing

    def add(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original_module)

    def forward(self, x, *args, **kwargs):
        routing = self._routing
        rows = routing.rows
        if rows is not None:
            rows = rows.for_batch(x.shape[0])
            out = self.original_module(x, *args, **kwargs)
            for name in rows.groups:
                if name in self.copies:
                    idx = rows.index(name)
                    sub = self.copies[name](x.index_select(0, idx), *args, **kwargs)
                    out = out.index_copy(0, idx, sub)
            return out
        if routing.enabled:
            for name in routing.active:
                if name in self.copies:
                    return self.copies[name](x, *args, **kwargs)
        return self.original_module(x, *args, **kwargs)


def find_modules_to_save(model: nn.Module, names: list, routing, required: list | None = None
                         ) -> list[tuple[str, ModulesToSave]]:
    """Wrap the modules ``names`` matches; each of ``required`` (default: all names) must match one."""
    found = []
    for name, module in list(iter_candidates(model)):
        if not name_matches(names, name):
            continue
        if isinstance(module, HostLayer):
            raise GraftingError(f"module '{name}' is both an adapter target and in modules_to_save")
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module, routing)
            replace_module(model, name, module)
        found.append((name, module))
    for entry in names if required is None else required:
        if not any(name_matches([entry], n) for n, _ in found):
            raise GraftingError(f"modules_to_save entry {entry!r} matched no module")
    return found


def inject_adapter(model, name: str, config, method, calibration=None) -> tuple:
    """Build adapter ``name`` into ``model`` (an AdaptedModel): a host layer on every target, the method's
    modules in each, copies of the modules saved in full (``modules_to_save`` and the task type's head), then
    the method's init (data-aware ones read ``calibration``). On any error nothing of the adapter is left.
    Returns (config, ranks): the config after a data-aware method planned it, and each layer's rank (None where
    the method has no low-rank form)."""
    to_save = list(config.modules_to_save or [])
    task_heads = TASK_HEADS.get(config.task_type or "", ())
    # the base's own modules (not adapters' insides, which grow with every adapter loaded), listed only when
    # a name must be checked
    module_names = [n for n, _ in iter_candidates(model.base_model)] if to_save or task_heads else []
    exists = lambda m: any(name_matches([m], n) for n in module_names)  # noqa: E731
    heads = [h for h in task_heads if h not in to_save and exists(h)]
    targets = find_targets(model.base_model, config, to_save + heads)
    created, ranks = [], []
    try:
        hosts = []
        for module_name, module in targets:
            host = host_for(model.base_model, module_name, module, model._routing)
            if host.kind.name not in method.layer_kinds:
                raise GraftingError(f"method '{method.name}' does not support {host.kind.name} layers "
                                    f"(module '{module_name}')")
            hosts.append((module_name, host))
        statistics = None
        if method.needs_calibration(config):
            statistics = calibration_statistics(model, method, config, hosts, calibration)
            config, statistics = method.plan(config, statistics)
            config.validate()
            keep = {n for n, _ in find_targets(model.base_model, config, to_save + heads)}
            hosts = [(n, h) for n, h in hosts if n in keep]
        shared = method.create_shared(config, hosts)
        if shared is not None:
            model.shared_tensors[name] = shared
        for module_name, host in hosts:
            adapter = method.create(host, config, module_name, shared)
            adapter._graft_uid = next(_UIDS)
            host.add(name, method, adapter)
            created.append(host)
            factors = method.low_rank(adapter) if method.low_rank_form else None
            ranks.append(None if factors is None else factors[0].shape[0])
        if to_save or heads:
            # peft writes every task head name of the task type (classifier and score); one is enough
            present = [m for m in to_save + heads if m not in task_heads or exists(m)]
            for _, saved in find_modules_to_save(model.base_model, present, model._routing,
                                                 required=[m for m in to_save if m not in task_heads]):
                saved.add(name)
        run_init(model, name, method, config, hosts, statistics)
    except Exception:
        for host in created:
            host.remove(name)
        if name in model.shared_tensors:
            del model.shared_tensors[name]
        for _, saved in model.saved_modules():
            if name in saved.copies:
                del saved.copies[name]
        raise
    return config, ranks
