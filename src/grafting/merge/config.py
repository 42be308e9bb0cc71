"""Merge configs: mergekit's YAML (the ``models:`` form), validated at the edge and bound to a merge method.

What a config may say, as mergekit says it: ``merge_method``, ``models`` (each ``model`` with optional
``parameters``), ``base_model``, global ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` (``base`` or
a model; ``union`` is refused) and ``chat_template`` (``auto`` or a Jinja template). Parameter settings
(scalars, gradients over layers, filtered branches) are :mod:`.settings`; a model's own setting comes first,
then the global one, then the method's default.

Everything else mergekit knows (``slices``, ``modules``, ``tokenizer``, LoRA references, Hub revisions) is
refused by name, as is any key it does not know, before a tensor is read. Values are converted to the types the
method declares here, once, so neither the driver nor the methods check them again.
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

from ..errors import GraftingError
from .base import MergeMethod, get_merge_method
from .settings import Setting, parse_setting, resolve

# pydantic is not a dependency of ``import grafting``; the [train] extra carries it (and tqdm, for the bar)
MERGE_EXTRA = "merge"
try:
    from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError
except ModuleNotFoundError:  # pragma: no cover - exercised only without the extra
    raise GraftingError(f"merging from a config needs pydantic: pip install 'grafting[{MERGE_EXTRA}]'") from None

TOP_KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "chat_template", "output")
MODEL_KEYS = ("model", "parameters")
UNSUPPORTED = {
    "slices": "layer slicing (slices:) is not supported; list whole models under models:",
    "modules": "per-module merges (modules:) are not supported; list whole models under models:",
    "tokenizer": "vocabulary surgery (tokenizer:) is not supported; use tokenizer_source: base or a model path",
    "layer_range": "layer ranges belong to mergekit's slices:, which are not supported",
    "lora": "LoRA references are not supported; merge the adapter into its model first and list the result",
    "revision": "Hub revisions are not supported; models are local paths",
    "override_architecture": "not supported; the architecture is the base model's",
}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)


class ModelEntry(_Strict):
    model: Union[str, dict]
    parameters: Optional[dict[str, Any]] = None


class OutputSpec(_Strict):
    """grafting's extension for adapter merges (mergekit has none): what to write and, for weight-space adapter
    merges, how many singular components to keep per module (``rank``) or what fraction of ΔW's energy."""

    kind: Optional[str] = None  # "adapter" | "model"; default: adapter when every model entry is an adapter
    rank: Optional[int] = None
    energy: Optional[float] = None


class MergeConfig(_Strict):
    """A validated merge config. Build it with :func:`load_config`, which also binds it to its method."""

    merge_method: str
    models: list[ModelEntry]
    base_model: Union[str, dict, None] = None
    parameters: Optional[dict[str, Any]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Union[str, dict, None] = None
    chat_template: Optional[str] = None
    output: Optional[OutputSpec] = None

    _source: str = PrivateAttr("<config>")
    _base_dir: Optional[Path] = PrivateAttr(None)
    _text: Optional[str] = PrivateAttr(None)
    _bound: Optional["BoundConfig"] = PrivateAttr(None)

    @property
    def source(self) -> str:
        """The file this config came from (or ``<config>``), for error messages."""
        return self._source

    @property
    def text(self) -> str:
        """The config as YAML: the file's own text where there was a file."""
        return self._text or yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)

    def bound(self) -> "BoundConfig":
        if self._bound is None:
            self._bound = _bind(self)
        return self._bound


@dataclass
class BoundConfig:
    """A config resolved against its method: local input paths in merge order, parsed settings, dtypes.

    ``base``: the model the method sees as ``group.base`` (None for a method that gives the base no role: then
    the base is an ordinary input, appended when not listed, as mergekit does). ``inputs``: the models the
    method sees in ``group.models``, in config order. ``donor``: where config.json, the tokenizer and the
    default output dtype come from (base_model, else the first model). ``settings[i]``: input i's own parameter
    settings; ``global_settings``: the top level's."""

    config: MergeConfig
    method: MergeMethod
    base: Optional[Path]
    donor: Path
    inputs: list[Path]
    labels: list[str]
    settings: list[dict[str, Setting]]
    global_settings: dict[str, Setting]
    dtype: Optional[torch.dtype]
    out_dtype: Optional[torch.dtype]
    tokenizer_source: Optional[Path]
    chat_template: Optional[str]

    def global_params(self, name: str, t: float) -> dict:
        """The method's global parameters for tensor ``name`` at depth ``t``."""
        return {p.name: resolve(p, (self.global_settings,), name, t, "parameters", self.config.source)
                for p in self.method.global_params()}

    def model_params(self, i: int, name: str, t: float) -> dict:
        """Input ``i``'s model parameters for tensor ``name``: its own setting, else the global one, else default."""
        where = f"models entry '{self.labels[i]}'"
        return {p.name: resolve(p, (self.settings[i], self.global_settings), name, t, where, self.config.source)
                for p in self.method.model_params()}


def _unknown(key: str, known, where: str, source: str) -> GraftingError:
    if key in UNSUPPORTED:
        return GraftingError(f"{source}: {where}{key}: {UNSUPPORTED[key]}")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return GraftingError(f"{source}: {where}{key}: unknown key{hint}; expected one of {', '.join(known)}")


def _check_keys(raw: dict, source: str) -> None:
    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown(str(key), TOP_KEYS, "", source)
    models = raw.get("models")
    if isinstance(models, list):
        for i, entry in enumerate(models):
            if isinstance(entry, dict):
                for key in entry:
                    if key not in MODEL_KEYS:
                        raise _unknown(str(key), MODEL_KEYS, f"models[{i}].", source)


def _validation_error(e: ValidationError, source: str) -> GraftingError:
    first = e.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    return GraftingError(f"{source}: {loc or 'config'}: {first['msg']}")


def load_config(source, *, base_dir=None) -> MergeConfig:
    """Read and check a merge config: a YAML path, a dict (parsed YAML), or a :class:`MergeConfig`.

    Relative model paths are looked up in the working directory (as mergekit does), then beside the YAML file
    (or in ``base_dir``). Every check that does not need a tensor runs here."""
    if isinstance(source, MergeConfig):
        source.bound()
        return source
    text, label = None, "<config>"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise GraftingError(f"{path}: no such merge config file")
        text, label = path.read_text(encoding="utf-8"), str(path)
        base_dir = base_dir or path.parent
        try:
            source = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise GraftingError(f"{label}: not valid YAML ({e})") from None
    if not isinstance(source, dict):
        raise GraftingError(f"{label}: a merge config is a mapping with merge_method and models, "
                            f"got {type(source).__name__}")
    _check_keys(source, label)
    try:
        config = MergeConfig.model_validate(source)
    except ValidationError as e:
        raise _validation_error(e, label) from None
    config._source, config._text = label, text
    config._base_dir = Path(base_dir) if base_dir is not None else None
    config.bound()
    return config


def _model_path(ref, where: str, config: MergeConfig) -> Path:
    """A model reference as a local path; mergekit's Hub, revision and LoRA forms are refused by name."""
    source = config.source
    if isinstance(ref, dict):  # mergekit's long form: {model: path or {path, revision}, lora, ...}
        inner = ref.get("model")
        keys = [(k, f"{where}.") for k in ref if k != "model" and ref[k] is not None]
        if isinstance(inner, dict):
            keys += [(k, f"{where}.model.") for k in inner if k != "path" and inner[k] is not None]
            inner = inner.get("path")
        for key, at in keys:
            raise _unknown(str(key), ("model", "path"), at, source)
        ref = inner
    if not isinstance(ref, str) or not ref:
        raise GraftingError(f"{source}: {where}: expected a model path, got {ref!r}")
    candidates = [Path(ref).expanduser()]
    if config._base_dir is not None and not candidates[0].is_absolute():
        candidates.append(config._base_dir / ref)
    for c in candidates:
        if c.exists():
            return c.resolve()
    if "+" in ref:
        raise GraftingError(f"{source}: {where}: '{ref}' is not a local path; model+lora references are not "
                            f"supported (merge the adapter into its model first)")
    if "@" in ref:
        raise GraftingError(f"{source}: {where}: '{ref}' is not a local path; Hub revisions are not supported")
    raise GraftingError(f"{source}: {where}: model '{ref}' not found (models must be local paths; download Hub "
                        f"models first)")


def _dtype(name, field: str, source: str) -> Optional[torch.dtype]:
    if name is None:
        return None
    key = str(name).removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise GraftingError(f"{source}: {field}: unknown dtype '{name}'; expected one of "
                            f"float32, float16, bfloat16, float64")
    return DTYPE_NAMES[key]


def _settings(raw: Optional[dict], method: MergeMethod, where: str, source: str, *, model_level: bool) -> dict:
    out = {}
    for key, value in (raw or {}).items():
        param = method.param(str(key))
        at = f"{source}: {where}.{key}"
        if param is None:
            names = [p.name for p in method.params]
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise GraftingError(f"{at}: merge_method '{method.name}' has no parameter '{key}'{hint}; its "
                                f"parameters: {', '.join(names) or 'none'}")
        if model_level and param.scope == "global":
            raise GraftingError(f"{at}: '{key}' is a global parameter of '{method.name}' (one value for the "
                                f"whole merge); set it under the top-level parameters")
        out[param.name] = parse_setting(value, param.type, at)
    return out


def _only_adapters(config: MergeConfig) -> bool:
    return all((_model_path(e.model, f"models[{i}].model", config) / "adapter_config.json").is_file()
               for i, e in enumerate(config.models))


def _bind(config: MergeConfig) -> BoundConfig:
    source = config.source
    try:
        method = get_merge_method(config.merge_method)
    except GraftingError as e:
        raise GraftingError(f"{source}: merge_method: {e}") from None
    if not config.models:
        raise GraftingError(f"{source}: models: at least one model is needed")
    base = _model_path(config.base_model, "base_model", config) if config.base_model is not None else None
    if method.needs_base and base is None and not _only_adapters(config):
        # adapters merged into an adapter need none: their task vectors are their own ΔW
        raise GraftingError(f"{source}: base_model: merge_method '{method.name}' needs a base_model (its task "
                            f"vectors are differences from it)")
    paths, labels, raw_settings, seen = [], [], [], {}
    for i, entry in enumerate(config.models):
        path = _model_path(entry.model, f"models[{i}].model", config)
        if path in seen:
            raise GraftingError(f"{source}: models[{i}]: the same model as models[{seen[path]}] ({path})")
        seen[path] = i
        label = entry.model if isinstance(entry.model, str) else str(path)
        if method.needs_base and path == base:
            if entry.parameters:
                warnings.warn(f"{source}: models[{i}]: parameters of the base model are not used by "
                              f"'{method.name}'", stacklevel=3)
            continue
        paths.append(path)
        labels.append(label)
        raw_settings.append((entry.parameters, f"models[{i}].parameters"))
    if base is not None and not method.needs_base and base not in paths:
        # mergekit merges an unlisted base as one more input when the method gives the base no role
        paths.append(base)
        labels.append(config.base_model if isinstance(config.base_model, str) else str(base))
        raw_settings.append((None, "base_model"))
    n, lo, hi = len(paths), method.min_models, method.max_models
    what = "models besides the base" if method.needs_base else "models"
    if n < lo or (hi is not None and n > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        raise GraftingError(f"{source}: models: merge_method '{method.name}' takes {want} {what}, got {n}")
    settings = [_settings(raw, method, where, source, model_level=True) for raw, where in raw_settings]
    global_settings = _settings(config.parameters, method, "parameters", source, model_level=False)
    for p in method.params:  # a required parameter set nowhere fails here, not after half the tensors
        if not p.required:
            continue
        if p.scope == "global" and p.name not in global_settings:
            raise GraftingError(f"{source}: parameters.{p.name}: required by '{method.name}' and not set")
        if p.scope == "model":
            for s, lab in zip(settings, labels):
                if p.name not in s and p.name not in global_settings:
                    raise GraftingError(f"{source}: parameter '{p.name}' is required by '{method.name}' and not set "
                                        f"for model '{lab}' (set it under that model's parameters or the global ones)")
    tok = config.tokenizer_source
    if tok == "union":
        raise GraftingError(f"{source}: tokenizer_source: 'union' (building a merged vocabulary) is not supported; "
                            f"use 'base' or a model path")
    if tok == "base":
        if base is None:
            raise GraftingError(f"{source}: tokenizer_source: 'base' needs a base_model")
        tok_path = base
    else:
        tok_path = _model_path(tok, "tokenizer_source", config) if tok is not None else None
    chat = config.chat_template
    if chat is not None and chat != "auto" and "{" not in chat:
        raise GraftingError(f"{source}: chat_template: '{chat}' is not a Jinja template; give the template text "
                            f"or 'auto' (mergekit's named templates are not bundled)")
    donor = base if base is not None else _model_path(config.models[0].model, "models[0].model", config)
    return BoundConfig(config, method, base if method.needs_base else None, donor, paths, labels, settings,
                       global_settings, _dtype(config.dtype, "dtype", source),
                       _dtype(config.out_dtype, "out_dtype", source), tok_path, chat)
