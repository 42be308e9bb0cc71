"""PEFT's on-disk adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (Linear, Conv1D, Conv2d),
``lora_embedding_A`` / ``lora_embedding_B`` (Embedding), ``lora_magnitude_vector`` (DoRA), full tensors of
``modules_to_save`` under the module's own name, and base biases for ``bias="all"`` / ``"lora_only"``.
Only JSON and safetensors are read; every tensor is checked against what the config implies before use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..config import LoraConfig
from ..errors import GraftingError
from .atomic import atomic_dir

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _slots(model, name: str) -> dict:
    """PEFT key -> (module, attribute, shape on disk, method or None) for adapter ``name``."""
    out = {}
    for module_name, host in model.hosts():
        if name not in host.adapters:
            continue
        method, adapter = host.methods[name], host.adapters[name]
        for suffix, attr in method.peft_keys(host).items():
            out[f"{PREFIX}{module_name}.{suffix}"] = (adapter, attr, method.peft_shape(adapter, host, attr), method, host)
    for module_name, saved in model.saved_modules():
        if name in saved.copies:
            for pname, p in saved.copies[name].named_parameters():
                out[f"{PREFIX}{module_name}.{pname}"] = (saved.copies[name], pname, tuple(p.shape), None, None)
    bias = model.peft_config[name].bias
    if bias != "none":
        for module_name, host in model.hosts():
            if (bias == "all" or name in host.adapters) and getattr(host.base_layer, "bias", None) is not None:
                out[f"{PREFIX}{module_name}.base_layer.bias"] = (host.base_layer, "bias", tuple(host.base_layer.bias.shape), None, None)
        if bias == "all":
            for pname, p in model.base_model.named_parameters():
                if pname.endswith("bias") and ".base_layer." not in pname and ".copies." not in pname \
                        and ".original_module." not in pname:
                    owner, _, attr = pname.rpartition(".")
                    module = model.base_model.get_submodule(owner) if owner else model.base_model
                    out[f"{PREFIX}{pname}"] = (module, attr, tuple(p.shape), None, None)
    return out


def _peft_aliases(model, name: str) -> dict:
    """Keys peft may also write, which we read but never require: with ``bias="all"`` peft saves the biases
    of a modules_to_save wrapper's original and copy under its wrapper names as well; when an embedding is a
    target, peft saves the full embedding matrix too (it may have been resized), which then replaces the base's."""
    out = {}
    for module_name, host in model.hosts():
        if host.kind.name == "embedding" and name in host.adapters:
            w = host.base_layer.weight
            out[f"{PREFIX}{module_name}.base_layer.weight"] = (host.base_layer, "weight", tuple(w.shape), None, None)
    if model.peft_config[name].bias == "all":
        for module_name, saved in model.saved_modules():
            if name in saved.copies:
                for owner, prefix in ((saved.copies[name], "modules_to_save"), (saved.original_module, "original_module")):
                    if getattr(owner, "bias", None) is not None:
                        out[f"{PREFIX}{module_name}.{prefix}.bias"] = (owner, "bias", tuple(owner.bias.shape), None, None)
    return out


def adapter_tensors(model, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (what ``save_adapter`` writes)."""
    tensors = {}
    for module_name, host in model.hosts():
        if name in host.adapters:
            for suffix, t in host.methods[name].to_peft(host.adapters[name], host).items():
                tensors[f"{PREFIX}{module_name}.{suffix}"] = t
    for key, (module, attr, _, method, _) in _slots(model, name).items():
        if method is None:
            tensors[key] = getattr(module, attr).detach()
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_adapter(model, path, name: str) -> None:
    if name not in model.peft_config:
        raise GraftingError(f"no adapter named '{name}'; loaded: {model.adapter_names()}")
    config = model.peft_config[name].to_peft_dict()
    if config.get("base_model_name_or_path") is None:
        config["base_model_name_or_path"] = getattr(getattr(model.base_model, "config", None), "_name_or_path", None) or None
    tensors = adapter_tensors(model, name)
    with atomic_dir(path) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(save(tensors, metadata={"format": "pt"}))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(path) -> LoraConfig:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        raise GraftingError(f"{path}: not an adapter directory")
    if not cfg_file.is_file():
        raise GraftingError(f"{cfg_file}: missing (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraftingError(f"{cfg_file}: not valid JSON ({e})") from None
    return LoraConfig.from_peft_dict(raw, where=str(cfg_file))


def weights_file(path) -> Path:
    path = Path(path)
    f = path / WEIGHTS_NAME
    if not f.is_file():
        if (path / "adapter_model.bin").exists():
            raise GraftingError(f"{path / 'adapter_model.bin'}: pickle checkpoints are never loaded; convert it "
                                f"to {WEIGHTS_NAME}")
        raise GraftingError(f"{f}: missing")
    return f


def read_tensors(path) -> dict[str, torch.Tensor]:
    f = weights_file(path)
    try:
        with safe_open(str(f), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise GraftingError(f"{f}: not a readable safetensors file ({e})") from None


def read_shapes(path) -> dict[str, tuple]:
    """Tensor shapes and dtypes from the safetensors header, without reading the data."""
    f = weights_file(path)
    try:
        with safe_open(str(f), framework="pt") as fh:
            return {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise GraftingError(f"{f}: not a readable safetensors file ({e})") from None


def load_adapter(model, path, name: str) -> None:
    path = Path(path)
    config = read_config(path)
    tensors = read_tensors(path)
    f = path / WEIGHTS_NAME
    try:
        model.add_adapter(name, config)
    except GraftingError as e:
        raise GraftingError(f"{path / CONFIG_NAME}: {e}") from None
    try:
        _fill(model, name, config, tensors, f)
    except Exception:
        model.delete_adapter(name)
        raise


def fill_adapter(model, path, name: str) -> None:
    """Overwrite the weights of existing adapter ``name`` with those saved at ``path`` (same config)."""
    path = Path(path)
    _fill(model, name, model.peft_config[name], read_tensors(path), path / WEIGHTS_NAME)


def _fill(model, name: str, config: LoraConfig, tensors: dict, f: Path) -> None:
    slots = _slots(model, name)
    missing = sorted(set(slots) - set(tensors))
    aliases = _peft_aliases(model, name)
    extra = sorted(set(tensors) - set(slots) - set(aliases))
    slots.update({k: v for k, v in aliases.items() if k in tensors})
    if extra:
        raise GraftingError(f"{f}: unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''} (the config's "
                            f"target_modules={config.target_modules!r} does not create them, or the target module "
                            "is absent from the base model)")
    if missing:
        raise GraftingError(f"{f}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for key, (module, attr, shape, method, host) in slots.items():
        t = tensors[key]
        if t.dtype not in _FLOAT_DTYPES:
            raise GraftingError(f"{f}: tensor '{key}' has dtype {t.dtype}; expected a floating dtype")
        if tuple(t.shape) != shape:
            hint = ""
            if method is not None and attr in ("lora_A", "lora_B"):
                hint = f" (the config gives this module r={module.r}; check r / rank_pattern)"
            raise GraftingError(f"{f}: tensor '{key}' has shape {tuple(t.shape)}, expected {shape}{hint}")
        if not torch.isfinite(t).all():
            raise GraftingError(f"{f}: tensor '{key}' holds NaN or infinite values")
    with torch.no_grad():
        for key, (module, attr, shape, method, host) in slots.items():
            if method is not None:
                method.from_peft(module, host, attr, tensors[key])
            else:
                getattr(module, attr).copy_(tensors[key].to(getattr(module, attr).dtype))


def inspect_adapter(path) -> dict:
    """What an adapter directory holds, read from its config and safetensors header only."""
    path = Path(path)
    config = read_config(path)
    shapes = read_shapes(path)
    ranks, targets, params = {}, [], 0
    for key, (shape, _) in shapes.items():
        params += int(torch.Size(shape).numel())
        module = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix in (".lora_A.weight", ".lora_embedding_A"):
            if module.endswith(suffix):
                mod = module[: -len(suffix)]
                ranks[mod] = shape[0]
                targets.append(mod)
    dtypes = sorted({dt for _, dt in shapes.values()})
    size = sum(p.stat().st_size for p in (path / CONFIG_NAME, path / WEIGHTS_NAME))
    rank_values = sorted(set(ranks.values()))
    return {
        "path": str(path),
        "method": config.method,
        "peft_type": "LORA",
        "r": config.r,
        "ranks": rank_values,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "target_modules": config.target_modules,
        "targets": sorted(targets),
        "modules_to_save": config.modules_to_save or [],
        "parameters": params,
        "dtypes": dtypes,
        "size_bytes": size,
        "base_model": config.base_model_name_or_path,
    }
