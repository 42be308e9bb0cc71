"""Typed adapter configs, validated at the edge: the base every method's config extends.

A method's config is a dataclass in the method's own file (``LoraConfig`` in methods/lora.py, ...). Field names
follow PEFT's ``adapter_config.json`` where PEFT has the method, so configs round-trip: :meth:`to_peft_dict`
writes what ``peft`` reads, and :func:`config_from_peft_dict` dispatches a file on its ``peft_type`` (and flags
such as ``use_dora``) through the registry. Nothing here names a method.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from .errors import GraftingError

TargetSpec = Union[list, str, None]

# PEFT's default layer-container names for layers_to_transform (peft.tuners.tuners_utils.COMMON_LAYERS_PATTERN)
COMMON_LAYERS_PATTERN = ("layers", "h", "block", "blocks", "layer")


class _ConfigMeta(type):
    """Unknown constructor fields become a GraftingError with a did-you-mean, not a bare TypeError."""

    def __call__(cls, *args, **kwargs):
        if dataclasses.is_dataclass(cls):
            own = [f.name for f in dataclasses.fields(cls) if f.init]
            for key in kwargs:
                if key not in own:
                    close = difflib.get_close_matches(key, own, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise GraftingError(f"{cls.__name__}: unknown field '{key}'{hint}; fields: {', '.join(own)}")
        return super().__call__(*args, **kwargs)


@dataclass
class AdapterConfig(metaclass=_ConfigMeta):
    """Fields every method shares. Subclasses add theirs (all with defaults) and override :meth:`check`.

    target_modules: list of names (suffix match, as PEFT), a regex string (full match), or ``"all-linear"``.
    exclude_modules: the same forms; matching modules are never targets. layers_to_transform / layers_pattern:
    only layers with these indices inside a ``<layers_pattern>.<index>.`` container (PEFT's rule).
    modules_to_save: modules trained and saved in full.
    """

    #: PEFT's ``peft_type`` for this config's family; the registry maps (peft_type, flags) to a method
    peft_type: ClassVar[str] = ""
    #: PEFT fields this config reads but does not implement: field -> accepted values (None: any value).
    #: Any other value changes the maths, so loading it would be wrong: it is refused by name.
    peft_ignored: ClassVar[dict] = {}
    #: grafting-only fields: kept in memory, not written to adapter_config.json (peft would not know them)
    grafting_only: ClassVar[tuple] = ()

    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: list | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def method(self) -> str:
        """The registered method this config builds (by ``peft_type`` and variant flags)."""
        from .registry import method_for_config
        return method_for_config(self).name

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self, where: str | None = None) -> None:
        where = where or type(self).__name__

        def bad(field_name: str, expected: str, got: Any) -> GraftingError:
            return GraftingError(f"{where}: field '{field_name}' must be {expected}, got {got!r}")

        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, (str, list)):
                raise bad(name, "a list of names, a regex string or 'all-linear'", value)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as e:
                    raise bad(name, f"a valid regex ({e})", value) from None
            if isinstance(value, list) and not all(isinstance(t, str) for t in value):
                raise bad(name, "a list of strings", value)
        layers = self.layers_to_transform
        if isinstance(layers, bool) or not (layers is None or isinstance(layers, int) or (
                isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))):
            raise bad("layers_to_transform", "a layer index or a list of layer indices", layers)
        if isinstance(layers, int):
            self.layers_to_transform = layers = [layers]
        if layers and (not isinstance(self.target_modules, list)):
            raise bad("layers_to_transform", "used with a list of target_modules (PEFT ignores it for a regex)",
                      layers)
        pattern = self.layers_pattern
        if pattern not in (None, "", []) and not (isinstance(pattern, str) or (
                isinstance(pattern, list) and all(isinstance(p, str) for p in pattern))):
            raise bad("layers_pattern", "a name or a list of names", pattern)
        if pattern not in (None, "", []) and not layers:
            raise bad("layers_pattern", "used together with layers_to_transform", pattern)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, (set, tuple)):
                self.modules_to_save = list(self.modules_to_save)
            if not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise bad("modules_to_save", "a list of module names", self.modules_to_save)
        for name in ("base_model_name_or_path", "task_type"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise bad(name, "a string", getattr(self, name))
        self.check(bad)

    def check(self, bad) -> None:
        """Method-specific checks; ``bad(field, expected, got)`` builds the error to raise."""

    def selects_layer(self, module_name: str) -> bool:
        """PEFT's layers_to_transform rule: the module sits inside ``<pattern>.<index>.`` with a chosen index."""
        if not self.layers_to_transform:
            return True
        patterns = self.layers_pattern or COMMON_LAYERS_PATTERN
        patterns = [patterns] if isinstance(patterns, str) else patterns
        for p in patterns:
            m = re.match(rf".*\.{re.escape(p)}\.(\d+)\.", module_name) or re.match(rf"^{re.escape(p)}\.(\d+)\.",
                                                                                  module_name)
            if m:
                return int(m.group(1)) in self.layers_to_transform
        return False

    # ---- PEFT on-disk form ------------------------------------------------------------------------------------
    def to_peft_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.grafting_only}
        d["peft_type"] = self.peft_type
        d["inference_mode"] = True
        for key in ("target_modules", "exclude_modules"):
            if isinstance(d.get(key), list):
                d[key] = sorted(d[key])
        return d

    @classmethod
    def from_peft_dict(cls, d: dict, where: str = "adapter_config.json") -> "AdapterConfig":
        """A config from a PEFT-style dict: own fields read, harmless PEFT fields ignored, the rest refused."""
        if not isinstance(d, dict):
            raise GraftingError(f"{where}: expected a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        own = set(fields) - set(cls.grafting_only)
        common_ignored = {"peft_type": None, "peft_version": None, "inference_mode": None, "auto_mapping": None,
                          "revision": (None,)}
        ignored = {**common_ignored, **cls.peft_ignored}
        kwargs = {}
        for key, value in d.items():
            if key in own or key in cls.grafting_only:
                kwargs[key] = value
            elif key in ignored:
                allowed = ignored[key]
                if allowed is not None and value not in allowed:
                    raise GraftingError(f"{where}: field '{key}' = {value!r} is a PEFT feature grafting does not "
                                        f"support (expected one of {list(allowed)})")
            else:
                close = difflib.get_close_matches(key, sorted(own | set(ignored)), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise GraftingError(f"{where}: unknown field '{key}'{hint}")
        cfg = cls.__new__(cls)
        for name, f in fields.items():
            if f.default is dataclasses.MISSING:  # a mutable default: peft writes null for an empty mapping
                value = kwargs.get(name) if kwargs.get(name) is not None else f.default_factory()  # type: ignore[misc]
            else:
                value = kwargs.get(name, f.default)
            setattr(cfg, name, value)
        cfg.validate(where)
        return cfg


def config_from_peft_dict(d: Any, where: str = "adapter_config.json") -> AdapterConfig:
    """The registered config an ``adapter_config.json`` describes, chosen by its ``peft_type`` and flags."""
    from .registry import method_for_peft_dict
    if not isinstance(d, dict):
        raise GraftingError(f"{where}: expected a JSON object, got {type(d).__name__}")
    return method_for_peft_dict(d, where).config_class.from_peft_dict(d, where)


def config_from_fields(fields: dict, where: str = "adapter") -> AdapterConfig:
    """A config from ``{method: NAME, ...fields}`` (recipes); ``method`` defaults to ``lora``."""
    from .registry import fixed_flags, get_method
    if not isinstance(fields, dict):
        raise GraftingError(f"{where}: expected a mapping of adapter fields, got {type(fields).__name__}")
    fields = dict(fields)
    name = fields.pop("method", "lora")
    try:
        method = get_method(name)
    except GraftingError as e:
        raise GraftingError(f"{where}: field 'method': {e}") from None
    if "peft_type" in fields and fields["peft_type"] != method.config_class.peft_type:
        raise GraftingError(f"{where}: field 'peft_type' is {fields['peft_type']!r} but method '{name}' is "
                            f"{method.config_class.peft_type!r}")
    cfg = method.config_class.from_peft_dict({**fields, **fixed_flags(method)}, where)
    if cfg.method != name:
        raise GraftingError(f"{where}: these fields build method '{cfg.method}', not '{name}'")
    return cfg


def pattern_value(pattern: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: a key matches when it equals the module name or matches (as a
    regex) a dotted suffix of it."""
    for key, value in pattern.items():
        if key == module_name or re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


__all__ = ["AdapterConfig", "config_from_fields", "config_from_peft_dict", "pattern_value"]
