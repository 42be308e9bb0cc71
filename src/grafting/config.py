"""Typed adapter configs, validated at the edge.

Field names follow PEFT's ``adapter_config.json`` so configs round-trip: a PEFT LoRA config loads as a
:class:`LoraConfig`, and :meth:`LoraConfig.to_peft_dict` writes one that ``peft`` reads back.
DoRA and rsLoRA are switches on the LoRA config, as in PEFT, but each resolves to its own registered method
(:attr:`LoraConfig.method`), so variants compose with LoRA instead of branching inside it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import GraftingError

TargetSpec = Union[list, str, None]

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "kaiming")

# PEFT config fields we read and ignore when they hold these (default) values. Anything else set to a
# non-default value is a feature we do not implement, and loading it silently would give wrong outputs.
_PEFT_IGNORED_DEFAULTS: dict[str, tuple] = {
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "auto_mapping": None,  # any value
    "corda_config": (None,),
    "ensure_weight_tying": (False, None),
    "eva_config": (None,),
    "inference_mode": None,
    "kasa_config": (None,),
    "layer_replication": (None,),
    "layers_pattern": (None, [], ""),
    "layers_to_transform": (None, []),
    "loftq_config": ({}, None),
    "lora_bias": (False, None),
    "lora_ga_config": (None,),
    "megatron_config": (None,),
    "megatron_core": None,
    "monteclora_config": (None,),
    "peft_type": None,
    "peft_version": None,
    "qalora_group_size": None,
    "revision": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_bdlora": (None, False),
    "use_qalora": (False, None),
    "velora_config": (None,),
    "exclude_modules": (None, [], ""),
}


@dataclass
class LoraConfig:
    """Configuration of a LoRA-family adapter (LoRA, rsLoRA, DoRA).

    r: rank. lora_alpha: scale numerator; ``scaling = lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``).
    target_modules: list of names (suffix match, as PEFT), a regex string (full match), or ``"all-linear"``.
    rank_pattern / alpha_pattern: per-module overrides, keys matched like PEFT (regex searched at the end of the
    module name). modules_to_save: modules trained and saved in full. bias: ``none``, ``all`` or ``lora_only``.
    init_lora_weights: ``True``/``"kaiming"`` (A kaiming-uniform, B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0),
    ``False`` (random non-zero B: the adapter changes the output from the start; for tests).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: TargetSpec = None
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Any = True
    fan_in_fan_out: bool = False
    modules_to_save: list | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def method(self) -> str:
        """The registered method this config builds."""
        return "dora" if self.use_dora else "lora"

    def validate(self, where: str = "LoraConfig") -> None:
        def bad(field_name: str, expected: str, got: Any) -> GraftingError:
            return GraftingError(f"{where}: field '{field_name}' must be {expected}, got {got!r}")

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise bad("r", "a positive integer", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise bad("lora_alpha", "a number", self.lora_alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "a number in [0, 1)", self.lora_dropout)
        if self.bias not in BIAS_MODES:
            raise bad("bias", f"one of {BIAS_MODES}", self.bias)
        if self.init_lora_weights not in INIT_MODES:
            raise bad("init_lora_weights", f"one of {INIT_MODES}", self.init_lora_weights)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list)):
            raise bad("target_modules", "a list of names, a regex string or 'all-linear'", self.target_modules)
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise bad("target_modules", f"a valid regex ({e})", self.target_modules) from None
        if isinstance(self.target_modules, list) and not all(isinstance(t, str) for t in self.target_modules):
            raise bad("target_modules", "a list of strings", self.target_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, (set, tuple)):
                self.modules_to_save = list(self.modules_to_save)
            if not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise bad("modules_to_save", "a list of module names", self.modules_to_save)
        for name, pattern, kind in (("rank_pattern", self.rank_pattern, int), ("alpha_pattern", self.alpha_pattern, (int, float))):
            if not isinstance(pattern, dict):
                raise bad(name, "a mapping of module-name pattern to value", pattern)
            for key, value in pattern.items():
                if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                    raise bad(f"{name}[{key!r}]", "a positive number", value)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha for one module, after rank_pattern / alpha_pattern (PEFT's matching rule)."""
        return (_pattern_value(self.rank_pattern, module_name, self.r),
                _pattern_value(self.alpha_pattern, module_name, self.lora_alpha))

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r

    # --- PEFT on-disk form -------------------------------------------------------------------------------------
    def to_peft_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["peft_type"] = "LORA"
        d["lora_bias"] = False
        d["layers_to_transform"] = None
        d["layers_pattern"] = None
        d["inference_mode"] = True
        if isinstance(self.target_modules, list):
            d["target_modules"] = sorted(self.target_modules)
        if d["init_lora_weights"] == "kaiming":
            d["init_lora_weights"] = True
        return d

    @classmethod
    def from_peft_dict(cls, d: dict, where: str = "adapter_config.json") -> "LoraConfig":
        if not isinstance(d, dict):
            raise GraftingError(f"{where}: expected a JSON object, got {type(d).__name__}")
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            from .registry import method_names
            raise GraftingError(f"{where}: field 'peft_type' is {peft_type!r}; grafting reads LORA adapters "
                                f"(methods: {', '.join(method_names())})")
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in own:
                kwargs[key] = value
            elif key in _PEFT_IGNORED_DEFAULTS:
                allowed = _PEFT_IGNORED_DEFAULTS[key]
                if allowed is not None and value not in allowed:
                    raise GraftingError(f"{where}: field '{key}' = {value!r} is a PEFT feature grafting does not "
                                        f"support (expected one of {list(allowed)})")
            else:
                close = difflib.get_close_matches(key, sorted(own | set(_PEFT_IGNORED_DEFAULTS)), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise GraftingError(f"{where}: unknown field '{key}'{hint}")
        if kwargs.get("init_lora_weights") not in (None, *INIT_MODES):
            kwargs["init_lora_weights"] = True  # PEFT init schemes (pissa, olora, ...) only matter before training
        cfg = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.name in kwargs:
                value = kwargs[f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()  # type: ignore[misc]
            if f.name in ("rank_pattern", "alpha_pattern") and value is None:
                value = {}
            setattr(cfg, f.name, value)
        cfg.validate(where)
        return cfg


def _pattern_value(pattern: dict, module_name: str, default):
    # PEFT: a key matches when it equals the module name or matches (as a regex) a dotted suffix of it
    for key, value in pattern.items():
        if key == module_name or re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
