"""PEFT's on-disk adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module>.<suffix>`` with each method's suffixes (LoRA: ``lora_A.weight`` /
``lora_B.weight``, or ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings; DoRA adds
``lora_magnitude_vector``), model-level tensors shared by all layers under the method's ``shared_keys``, full
tensors of ``modules_to_save`` under the module's own name, and base biases for ``bias="all"`` / ``"lora_only"``.
The method comes from the config's ``peft_type`` and flags through the registry (see io/reader.py).
Only JSON and safetensors are read; every tensor is checked against what the config implies before use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save
from torch.autograd.graph import increment_version

from ..errors import GraftingError
from ..hashing import same_config, unseal
from ..init_stage import filling_from_disk
from ..layers import stores_plain_weight
from ..methods.base import Method
from ..registry import get_method
from ..stacks import share_int8
from .atomic import atomic_dir
from .reader import CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterReader, read_config, weights_file

__all__ = ["CONFIG_NAME", "PREFIX", "WEIGHTS_NAME", "adapter_tensors", "inspect_adapter", "load_adapter",
           "read_config", "read_shapes", "read_tensors", "save_adapter", "weights_file"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PEFT_EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES


def _slots(model, name: str) -> dict:
    """PEFT key -> (module, attribute, shape on disk, method or None, host) for adapter ``name``."""
    out = {}
    for module_name, host in model.hosts():
        if name not in host.adapters:
            continue
        method, adapter = host.methods[name], host.adapters[name]
        for suffix, attr in method.peft_keys(host.kind.name).items():
            out[f"{PREFIX}{module_name}.{suffix}"] = (adapter, attr, method.peft_shape(adapter, host, attr), method, host)
    if name in model.shared_tensors:
        shared = model.shared_tensors[name]
        method = get_method(model.peft_config[name].method)
        for key, attr in method.shared_keys(model.peft_config[name]).items():
            out[key] = (shared, attr, tuple(getattr(shared, attr).shape), None, None)
    for module_name, saved in model.saved_modules():
        if name in saved.copies:
            for pname, p in saved.copies[name].named_parameters():
                out[f"{PREFIX}{module_name}.{pname}"] = (saved.copies[name], pname, tuple(p.shape), None, None)
    bias = getattr(model.peft_config[name], "bias", "none")
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
    """Keys peft may also write, which we read but never require: a method's per-layer copies of its shared
    tensors (``Method.peft_optional_keys``); with ``bias="all"`` peft saves the biases
    of a modules_to_save wrapper's original and copy under its wrapper names as well; when an embedding is a
    target, peft saves the full embedding matrix too (it may have been resized), which then replaces the base's."""
    out = {}
    for module_name, host in model.hosts():
        if name in host.adapters:  # per-layer copies of shared tensors (Method.peft_optional_keys)
            method, adapter = host.methods[name], host.adapters[name]
            for suffix, attr in method.peft_optional_keys(host.kind.name).items():
                out[f"{PREFIX}{module_name}.{suffix}"] = (adapter, attr, method.peft_shape(adapter, host, attr),
                                                          method, host)
        # peft also saves the full weight of embedding-like targets (embeddings, and lm_head by name, tied or
        # not) in case the vocabulary was resized; it is the base's own weight, so it is read into the base
        if name in host.adapters and (host.kind.name == "embedding" or module_name.split(".")[-1] in _PEFT_EMBEDDING_NAMES) \
                and stores_plain_weight(host.base_layer):
            w = host.base_layer.weight
            out[f"{PREFIX}{module_name}.base_layer.weight"] = (host.base_layer, "weight", tuple(w.shape), None, None)
    if getattr(model.peft_config[name], "bias", "none") == "all":
        for module_name, saved in model.saved_modules():
            if name in saved.copies:
                for owner, prefix in ((saved.copies[name], "modules_to_save"), (saved.original_module, "original_module")):
                    if getattr(owner, "bias", None) is not None:
                        out[f"{PREFIX}{module_name}.{prefix}.bias"] = (owner, "bias", tuple(owner.bias.shape), None, None)
    return out


def adapter_tensors(model, name: str, convert_init: bool = False, export: bool = False,
                    copy: bool = True) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (what ``save_adapter`` writes). ``convert_init``: after an init
    that changed the base, tensors that apply to the original base instead (see ``Method.to_original_base``).
    ``export``: as the standard method the adapter's method exports to (``Method.export_config``), if any.
    ``copy=False``: detached, possibly views of the live tensors (hashing only reads them)."""
    tensors = {}
    initial = model._initial.get(name) if convert_init else None
    cfg = model.peft_config[name]
    for module_name, host in model.hosts():
        if name in host.adapters:
            method, adapter = host.methods[name], host.adapters[name]
            layer = method.to_peft(adapter, host)
            if initial is not None:
                keys = method.peft_keys(host.kind.name)
                now = {keys[k]: v for k, v in layer.items()}
                converted = method.to_original_base(now, initial[module_name], cfg)
                layer = {k: converted[a] for k, a in keys.items()}
            exported = method.export_config(cfg) if export else None
            if exported is not None:
                keys = method.peft_keys(host.kind.name)
                now = {keys[k]: v for k, v in layer.items()}
                # and the adapter's buffers, which the file does not hold (SoMA's initial factors)
                now.update({b: t.detach() for b, t in adapter.named_buffers(recurse=False) if b not in now})
                converted = method.export_tensors(now, cfg, module_name)
                target = get_method(exported.method)
                layer = {k: converted[a] for k, a in target.peft_keys(host.kind.name).items()}
            for suffix, t in layer.items():
                tensors[f"{PREFIX}{module_name}.{suffix}"] = t
    for key, (module, attr, _, method, _) in _slots(model, name).items():
        if method is None:
            tensors[key] = getattr(module, attr).detach()
    if not copy:
        return {k: v.detach() for k, v in tensors.items()}
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_adapter(model, path, name: str, convert_init: bool = True, export: bool = True) -> None:
    if name not in model.peft_config:
        raise GraftingError(f"no adapter named '{name}'; loaded: {model.adapter_names()}")
    cfg = model.peft_config[name]
    convert = convert_init and name in model._initial
    if convert:
        cfg = get_method(cfg.method).original_base_config(cfg)
    if not convert_init and get_method(cfg.method).export_converts_base:
        export = False  # its export is the conversion to the original base: convert_init=False keeps it native
    exported = get_method(cfg.method).export_config(cfg) if export else None
    if exported is not None:
        cfg = exported
    config = cfg.to_peft_dict()
    if config.get("base_model_name_or_path") is None:
        config["base_model_name_or_path"] = getattr(getattr(model.base_model, "config", None), "_name_or_path", None) or None
    tensors = adapter_tensors(model, name, convert_init=convert, export=export)
    with atomic_dir(path) as tmp:
        metadata = {"format": "pt", **model.adapter_metadata.get(name, {})}
        (tmp / WEIGHTS_NAME).write_bytes(save(tensors, metadata=metadata))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_tensors(path) -> dict[str, torch.Tensor]:
    return AdapterReader(path).read_all()


def read_shapes(path) -> dict[str, tuple]:
    """Tensor shapes and dtypes from the safetensors header, without reading the data."""
    return AdapterReader(path).shapes()


def load_adapter(model, path, name: str) -> None:
    path = Path(path)
    reader = AdapterReader(path)
    install_adapter(model, name, reader.config, reader.read_all(), path, reader.metadata, share=True)


def install_adapter(model, name: str, config, tensors: dict, path, metadata: dict | None = None,
                    finite_checked: bool = False, share: bool = False, training: bool | None = None) -> bool:
    """Add adapter ``name`` with ``tensors`` already read from the directory ``path`` (named in errors); a
    serving pool reads files off the engine's thread and installs here between steps. ``metadata``: the
    weights file's ``__metadata__``; a base fingerprint there is checked against this model's base.
    ``finite_checked``: the caller already ran :func:`require_finite` on ``tensors`` (off this thread).
    ``share``: the adapter's parameters may be ``tensors`` themselves rather than copies, where dtype and shape
    already match (the caller promises not to write to them; a load then allocates and copies nothing).
    ``training``: put the new adapter's modules in that mode (new modules start in training mode, as in torch and
    peft, so an adapter saved with ``lora_dropout`` would drop activations while it serves); None leaves them.
    Returns whether the adapter now holds ``tensors`` themselves, each as its parameter (see :func:`_fill`), so
    its content hash is the hash of ``tensors`` (``hashing.adopt_hash(..., held=True)``)."""
    path = Path(path)
    try:
        with filling_from_disk():
            model.add_adapter(name, config)
        if training is not None:
            model.train_adapter(name, training)
    except GraftingError as e:
        raise GraftingError(f"{path / CONFIG_NAME}: {e}") from None
    try:
        held = _fill(model, name, config, tensors, path / WEIGHTS_NAME, finite_checked, share)
        if metadata and BASE_FINGERPRINT in metadata:
            check_base_fingerprint(model, name, metadata[BASE_FINGERPRINT], path / WEIGHTS_NAME)
            model.adapter_metadata[name] = {BASE_FINGERPRINT: metadata[BASE_FINGERPRINT]}
    except Exception:
        model.delete_adapter(name)
        raise
    return held


def refill_adapter(model, name: str, config, tensors: dict, path, metadata: dict | None = None,
                   finite_checked: bool = False, share: bool = False) -> bool:
    """Give existing adapter ``name`` another adapter's weights, ``tensors`` read from ``path``, keeping its
    modules: ``config`` must be the config ``name`` was installed from (the same JSON), so every layer, shape and
    scale stays. A serving pool turns a resident adapter over this way: building an adapter's modules, not
    copying its tensors, is most of an install. Parameters that shared the previous adapter's tensors get their
    own storage before anything is copied into them, so those tensors (a host-tier copy) are never written.
    On an error the adapter holds a mix of old and new weights: delete it. Returns what :func:`install_adapter`
    returns."""
    path = Path(path)
    if not same_config(model.peft_config[name], config):
        raise GraftingError(f"{path / CONFIG_NAME}: adapter '{name}' was installed from another config; "
                            "refill_adapter keeps its modules, so the config must be the same (install it anew)")
    held = _fill(model, name, config, tensors, path / WEIGHTS_NAME, finite_checked, share, fresh=True)
    model.adapter_metadata.pop(name, None)
    if metadata and BASE_FINGERPRINT in metadata:
        check_base_fingerprint(model, name, metadata[BASE_FINGERPRINT], path / WEIGHTS_NAME)
        model.adapter_metadata[name] = {BASE_FINGERPRINT: metadata[BASE_FINGERPRINT]}
    return held


# An adapter whose init fitted it to one exact base (LoftQ, LQ-LoRA: the adapter absorbs that base's
# quantization error) records a hash of each target layer's dense base weight; loading it onto any other base
# is an error rather than silently wrong outputs.
BASE_FINGERPRINT = "grafting.base_fingerprint"


def base_fingerprint(model, name: str) -> str:
    """JSON {module: sha256 of its dense base weight (float32, (out, fan_in))} over the layers adapter ``name`` targets."""
    import hashlib
    out = {}
    for module_name, host in model.hosts():
        if name in host.adapters:
            w = host.kind.to_out_in(host.dense_weight().detach()).to(torch.float32).contiguous().cpu()
            out[module_name] = hashlib.sha256(w.numpy().tobytes()).hexdigest()[:32]
    return json.dumps(out, sort_keys=True)


def check_base_fingerprint(model, name: str, saved: str, where) -> None:
    try:
        want = json.loads(saved)
        assert isinstance(want, dict)
    except (ValueError, AssertionError):
        raise GraftingError(f"{where}: metadata '{BASE_FINGERPRINT}' is not a JSON object") from None
    have = json.loads(base_fingerprint(model, name))
    for module_name, digest in sorted(want.items()):
        if have.get(module_name) != digest:
            raise GraftingError(
                f"{where}: this adapter was initialised against one exact base (e.g. LoftQ / LQ-LoRA, whose "
                f"factors absorb that base's quantization error), and the base it is loaded onto differs at "
                f"module '{module_name}'. Load it onto the quantized base saved with it.")


def fill_adapter(model, path, name: str) -> None:
    """Overwrite the weights of existing adapter ``name`` with those saved at ``path`` (same config)."""
    reader = AdapterReader(path)
    _fill(model, name, model.peft_config[name], reader.read_all(), reader.file)


def require_finite(tensors: dict, f) -> None:
    """Refuse tensors holding NaN or infinite values, naming the file ``f`` and the key."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise GraftingError(f"{f}: tensor '{key}' holds NaN or infinite values")


def _fill(model, name: str, config, tensors: dict, f: Path, finite_checked: bool = False, share: bool = False,
          fresh: bool = False) -> bool:
    """Adapter ``name``'s tensors from ``tensors`` (read from file ``f``). Returns whether every tensor is now
    its parameter as given (``share``) and is what ``adapter_tensors`` reads back under the same key (per-layer
    parameters of methods that export them as held, nothing read under another key): then the adapter's
    content hash is the hash of ``tensors``, and a serving pool that hashed them need not compare them."""
    unseal(model, [name])  # its tensors are about to change under the same modules
    slots = _slots(model, name)
    missing = sorted(set(slots) - set(tensors))
    aliases = _peft_aliases(model, name)
    extra = sorted(set(tensors) - set(slots) - set(aliases))
    held = len(slots) == len(tensors)  # no alias read (peft's optional copies, a full embedding)
    slots.update({k: v for k, v in aliases.items() if k in tensors})
    if extra:
        raise GraftingError(f"{f}: unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''} (the config's "
                            f"target_modules={config.target_modules!r} does not create them, or the target module "
                            "is absent from the base model)")
    if missing:
        raise GraftingError(f"{f}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for key, (module, attr, shape, method, host) in slots.items():
        t = tensors[key]
        target = getattr(module, attr)
        if not target.is_floating_point():  # an index buffer (a routing table): its exact integer dtype
            if t.dtype != target.dtype:
                raise GraftingError(f"{f}: tensor '{key}' has dtype {t.dtype}; expected {target.dtype}")
        elif t.dtype not in _FLOAT_DTYPES:
            raise GraftingError(f"{f}: tensor '{key}' has dtype {t.dtype}; expected a floating dtype")
        if tuple(t.shape) != shape:
            hint = ""
            if method is not None and getattr(module, "r", None) is not None:
                hint = f" (the config gives this module r={module.r}; check r / rank_pattern)"
            raise GraftingError(f"{f}: tensor '{key}' has shape {tuple(t.shape)}, expected {shape}{hint}")
    if not finite_checked:
        require_finite({k: tensors[k] for k in slots}, f)
    with torch.no_grad():
        for key, (module, attr, shape, method, host) in slots.items():
            param = module._parameters.get(attr)
            if share and _shareable(module, attr, tensors[key], method):
                param.data = tensors[key]
                param._grafting_shared = True
                if fresh:  # `.data =` keeps the version: caches keyed on (address, version) must see new content
                    increment_version(param)
                share_int8(param, tensors[key])  # an int8 store's form of it, computed off the engine's thread
                held = held and type(method).to_peft is Method.to_peft  # exported as the parameter itself
                continue
            held = False
            if param is not None:
                param.__dict__.pop("grafting_int8", None)
            if fresh and getattr(param, "_grafting_shared", False):  # never write a tensor someone else holds
                param.data = torch.empty_like(param.data)  # shared implies the default from_peft: a full copy
                param._grafting_shared = False
            if method is not None:
                method.from_peft(module, host, attr, tensors[key])
            else:
                getattr(module, attr).copy_(tensors[key].to(getattr(module, attr).dtype))
    return held


def _shareable(module, attr: str, t: torch.Tensor, method) -> bool:
    """Whether an adapter's own parameter can be ``t`` itself: a plain copy would land there unchanged (in
    values; a matrix may be a transposed view, as a serving pool lays out factors for its store)."""
    target = module._parameters.get(attr) if method is not None else None
    dense = t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous())
    return (target is not None and type(method).from_peft is Method.from_peft and t.dtype == target.dtype
            and t.shape == target.shape and t.device == target.device and dense)


def inspect_adapter(path) -> dict:
    """What an adapter directory holds, read from its config and safetensors header only."""
    path = Path(path)
    reader = AdapterReader(path)
    config, method = reader.config, reader.method
    shapes = reader.shapes()
    params = sum(int(torch.Size(shape).numel()) for shape, _ in shapes.values())
    per_module: dict = {}
    for e in reader:
        if e.role != "full" and e.module:
            per_module.setdefault(e.module, {})[e.role] = e.shape
    ranks = {m: method.rank_from_shapes(s) for m, s in per_module.items()}
    size = sum(p.stat().st_size for p in (path / CONFIG_NAME, path / WEIGHTS_NAME))
    return {
        "path": str(path),
        "method": method.name,
        "description": method.description,
        "peft_type": config.peft_type,
        "r": getattr(config, "r", None),
        "ranks": sorted({r for r in ranks.values() if r is not None}),
        "lora_alpha": getattr(config, "lora_alpha", None),
        "use_rslora": getattr(config, "use_rslora", False),
        "target_modules": config.target_modules,
        "targets": reader.modules(),
        "shared_tensors": sorted(e.key for e in reader if e.module == ""),
        "modules_to_save": config.modules_to_save or [],
        "parameters": params,
        "dtypes": sorted({dt for _, dt in shapes.values()}),
        "size_bytes": size,
        "base_model": config.base_model_name_or_path,
    }
