"""Name -> adapter method. Adding a method is one new file and one ``@register`` line.

``@register("dora", config=DoraConfig, flags={"use_dora": True})`` records everything the rest of grafting
needs: the method's config class (and so its PEFT ``peft_type``), the variant flags that select it among methods
sharing a ``peft_type``, and the method's capabilities (class attributes of :class:`~grafting.methods.base.Method`).
Configs, PEFT I/O, the CLI and the contract tests read these declarations instead of naming methods. A method
defined outside the package registers the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .errors import GraftingError

_METHODS: dict = {}


class _Given:
    """A flag value meaning "the field holds any value but None": a variant that peft enables by giving a
    sub-config (``{"some_config": GIVEN}``) rather than by a fixed value such as ``use_dora: True``."""

    def __repr__(self) -> str:
        return "<given>"


GIVEN = _Given()


def register(name: str, config: type | None = None, flags: dict | None = None) -> Callable:
    """Class decorator: ``@register("lora", config=LoraConfig) class Lora(Method): ...`` registers one instance.

    ``config``: the method's config dataclass (a subclass of :class:`~grafting.config.AdapterConfig`; its
    ``peft_type`` names the PEFT family). ``flags``: config field values that select this method among those
    with the same ``peft_type`` (``{"use_dora": True}``, or :data:`GIVEN` for "set to anything but None"); the
    method with the most matching flags wins."""
    from .config import AdapterConfig

    def deco(cls):
        if name in _METHODS:
            raise GraftingError(f"method '{name}' is registered twice")
        if config is None or not (isinstance(config, type) and issubclass(config, AdapterConfig)):
            raise GraftingError(f"method '{name}': register(config=...) must be an AdapterConfig subclass")
        if not config.peft_type:
            raise GraftingError(f"method '{name}': {config.__name__}.peft_type is empty")
        own = {f.name for f in dataclasses.fields(config)}
        for key in flags or {}:
            if key not in own:
                raise GraftingError(f"method '{name}': flag '{key}' is not a field of {config.__name__}")
        inst = cls()
        inst.name = name
        inst.config_class = config
        inst.flags = dict(flags or {})
        _METHODS[name] = inst
        return cls

    return deco


def unregister(name: str) -> None:
    """Remove a method (for tests and plug-ins that replace one)."""
    _METHODS.pop(name, None)


def get_method(name: str):
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise GraftingError(f"unknown adapter method '{name}'; registered: {', '.join(sorted(_METHODS))}") from None


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def methods() -> list:
    _load_builtin()
    return [_METHODS[n] for n in sorted(_METHODS)]


def _flags_match(method, get: Callable[[str], Any]) -> bool:
    return all(get(k) is not None if v is GIVEN else get(k) == v for k, v in method.flags.items())


def fixed_flags(method) -> dict:
    """The flags with a fixed value: the fields to set when building the method's config from other fields
    (a :data:`GIVEN` flag keeps the config's own value or default)."""
    return {k: v for k, v in method.flags.items() if v is not GIVEN}


def _best(candidates: list):
    # the most specific variant wins: DoRA (use_dora=True) over plain LoRA for a config with use_dora=True
    return max(candidates, key=lambda m: len(m.flags)) if candidates else None


def method_for_config(cfg):
    """The method a config object builds: same ``peft_type`` family, flags matching the config's fields."""
    _load_builtin()
    found = _best([m for m in _METHODS.values() if m.config_class.peft_type == cfg.peft_type
                   and isinstance(cfg, _family_root(m.config_class)) and _flags_match(m, lambda k: getattr(cfg, k, None))])
    if found is None:
        raise GraftingError(f"{type(cfg).__name__} (peft_type {cfg.peft_type!r}) builds no registered method; "
                            f"registered: {', '.join(sorted(_METHODS))}")
    return found


def method_for_peft_dict(d: dict, where: str):
    """The method an ``adapter_config.json`` describes."""
    _load_builtin()
    peft_type = d.get("peft_type")
    if peft_type is None:
        raise GraftingError(f"{where}: field 'peft_type' is missing")
    family = [m for m in _METHODS.values() if m.config_class.peft_type == peft_type]
    if not family:
        known = sorted({m.config_class.peft_type for m in _METHODS.values()})
        raise GraftingError(f"{where}: field 'peft_type' is {peft_type!r}; grafting reads {', '.join(known)} "
                            f"adapters (methods: {', '.join(sorted(_METHODS))})")
    # a flag the file leaves out takes the family root's default (LoraConfig's use_dora=False), never a
    # variant's own (DoraConfig's use_dora=True would read every such file as that variant); absent: None
    defaults = {}
    for root in {_family_root(m.config_class) for m in family}:
        defaults.update({f.name: f.default for f in dataclasses.fields(root) if f.default is not dataclasses.MISSING})
    found = _best([m for m in family if _flags_match(m, lambda k: d.get(k, defaults.get(k)))])
    if found is None:
        raise GraftingError(f"{where}: no registered {peft_type} method matches its flags")
    return found


def _family_root(config_class: type) -> type:
    """The topmost registered-family ancestor with the same peft_type (DoraConfig -> LoraConfig)."""
    root = config_class
    for base in config_class.__mro__[1:]:
        if getattr(base, "peft_type", None) == config_class.peft_type and dataclasses.is_dataclass(base):
            root = base
    return root


def config_class_named(name: str) -> type | None:
    """A registered config class by its class name (``gf.VeraConfig`` resolves through this)."""
    _load_builtin()
    for m in _METHODS.values():
        if m.config_class.__name__ == name:
            return m.config_class
    return None


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (importing registers the built-in methods)
