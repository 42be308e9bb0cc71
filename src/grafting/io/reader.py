"""Adapters as plain tensors: read an adapter directory tensor by tensor, without building a model.

    reader = AdapterReader("out/math")
    for t in reader:                     # AdapterTensor(module, method, role, key), tensor loaded on access
        print(t.module, t.role, t.shape)
    A, B, scale = reader.factors("model.layers.0.self_attn.q_proj")      # ΔW = scale·B·A, (out, fan_in) view
    dW = reader.delta_weight("model.layers.0.self_attn.q_proj")          # dense, (out, fan_in) view

Only the safetensors header is read up front (``safe_open``); each tensor is read when asked for, so merging and
serving can stream adapters with bounded memory. Keys are PEFT's (``base_model.model.<module>.<suffix>``); the
method (from ``adapter_config.json`` through the registry) says which suffixes are its per-layer tensors and which
keys are shared; everything else is a full tensor of a module trained in full (``role="full"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..config import config_from_peft_dict
from ..errors import GraftingError
from ..registry import get_method

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SHARED = ""  # the module path of shared (model-level) tensors


def read_config(path, opened: dict | None = None):
    """The adapter config in directory ``path``; ``opened``: see :class:`AdapterReader`."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    source = (opened or {}).get(CONFIG_NAME)
    if source is None:
        if not path.is_dir():
            raise GraftingError(f"{path}: not an adapter directory")
        if not cfg_file.is_file():
            raise GraftingError(f"{cfg_file}: missing (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
        source = cfg_file
    try:
        raw = json.loads(Path(source).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraftingError(f"{cfg_file}: not valid JSON ({e})") from None
    except RecursionError:
        raise GraftingError(f"{cfg_file}: nested too deeply to be an adapter config") from None
    return config_from_peft_dict(raw, where=str(cfg_file))


def weights_file(path) -> Path:
    path = Path(path)
    f = path / WEIGHTS_NAME
    if not f.is_file():
        if (path / "adapter_model.bin").exists():
            raise GraftingError(f"{path / 'adapter_model.bin'}: pickle checkpoints are never loaded; convert it "
                                f"to {WEIGHTS_NAME}")
        raise GraftingError(f"{f}: missing")
    return f


@dataclass
class AdapterTensor:
    """One on-disk tensor: the module it belongs to ("" for shared tensors), its method, its role (the adapter
    attribute, e.g. ``lora_A``; ``full`` for modules trained in full) and its key. ``tensor`` reads it."""

    module: str
    method: str
    role: str
    key: str
    shape: tuple
    dtype: str
    _reader: "AdapterReader"

    @property
    def tensor(self) -> torch.Tensor:
        return self._reader.get(self.key)


class AdapterReader:
    """``opened``: file name -> the path to read it from instead (e.g. ``/proc/self/fd/N`` of a file opened and
    checked already, :func:`grafting.serve.host_tier.pinned`); messages still name ``path``'s files."""

    def __init__(self, path, opened: dict | None = None):
        self.path = Path(path)
        self.config = read_config(self.path, opened)
        self.method = get_method(self.config.method)
        source = (opened or {}).get(WEIGHTS_NAME)
        self.file = self.path / WEIGHTS_NAME if source is not None else weights_file(self.path)
        self._source = str(source if source is not None else self.file)
        try:
            with safe_open(self._source, framework="pt") as fh:
                self._header = {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
                self.metadata = dict(fh.metadata() or {})
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise GraftingError(f"{self.file}: not a readable safetensors file ({e})") from None
        self._entries = self._classify()

    def _classify(self) -> list[AdapterTensor]:
        suffixes: dict[str, str] = {}
        for kind in self.method.layer_kinds:
            try:
                suffixes.update(self.method.peft_keys(kind))
                suffixes.update(self.method.peft_optional_keys(kind))
            except NotImplementedError:
                pass
        shared = self.method.shared_keys(self.config)
        entries = []
        for key, (shape, dtype) in self._header.items():
            if key in shared:
                entries.append(AdapterTensor(SHARED, self.method.name, shared[key], key, shape, dtype, self))
                continue
            module = key[len(PREFIX):] if key.startswith(PREFIX) else key
            role = "full"
            for suffix in sorted(suffixes, key=len, reverse=True):
                if module.endswith("." + suffix):
                    module, role = module[: -len(suffix) - 1], suffixes[suffix]
                    break
            entries.append(AdapterTensor(module, self.method.name, role, key, shape, dtype, self))
        return entries

    # ---- tensors ----------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[AdapterTensor]:
        return iter(self._entries)

    def keys(self) -> list[str]:
        return list(self._header)

    def shapes(self) -> dict[str, tuple]:
        """key -> (shape, dtype name), from the header only."""
        return dict(self._header)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._header:
            raise GraftingError(f"{self.file}: no tensor '{key}'")
        try:
            with safe_open(self._source, framework="pt") as fh:
                return fh.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise GraftingError(f"{self.file}: tensor '{key}' unreadable ({e})") from None

    def read_all(self) -> dict[str, torch.Tensor]:
        try:
            with safe_open(self._source, framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise GraftingError(f"{self.file}: not a readable safetensors file ({e})") from None

    # ---- layers -----------------------------------------------------------------------------------------------
    def modules(self) -> list[str]:
        """Adapted modules (those holding the method's per-layer tensors), sorted."""
        return sorted({e.module for e in self._entries if e.role != "full" and e.module != SHARED})

    def layer_tensors(self, module: str) -> dict[str, torch.Tensor]:
        found = {e.role: e.tensor for e in self._entries if e.module == module and e.role != "full"}
        if not found:
            raise GraftingError(f"{self.file}: no adapter tensors for module '{module}'")
        return found

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        return {e.role: e.tensor for e in self._entries if e.module == SHARED}

    def _kind(self, module: str) -> str:
        roles = {e.key[len(PREFIX) + len(module) + 1:] for e in self._entries if e.module == module}
        if any("embedding" in r for r in roles):
            return "embedding"
        return "conv1d" if getattr(self.config, "fan_in_fan_out", False) else "linear"

    def factors(self, module: str):
        """(A, B, scale) with ΔW = scale·B·A in the (out, fan_in) view, or None for a method without factors."""
        return self.method.factors_from_tensors(self.layer_tensors(module), self.config, module, self._kind(module),
                                                self.shared_tensors())

    def delta_weight(self, module: str, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ΔW in the (out, fan_in) view; ``base_weight`` (same view) for methods that need it (DoRA)."""
        try:
            return self.method.delta_weight_from_tensors(self.layer_tensors(module), self.config, module,
                                                         self._kind(module), self.shared_tensors(), base_weight)
        except NotImplementedError as e:
            raise GraftingError(f"{self.path}: {e}") from None
