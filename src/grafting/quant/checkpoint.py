"""Read and write transformers checkpoints quantized with bitsandbytes 4-bit, without importing bitsandbytes.

On disk (what ``model.save_pretrained`` writes for a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``):
``config.json`` carries ``quantization_config`` (quant_method "bitsandbytes", load_in_4bit, bnb_4bit_quant_type,
bnb_4bit_use_double_quant, ...); each quantized layer ``M`` stores ``M.weight`` (uint8, packed, shape (n/2, 1)),
``M.weight.absmax``, ``M.weight.quant_map`` (the 16 NF4 levels), with double quantization
``M.weight.nested_absmax`` and ``M.weight.nested_quant_map``, and ``M.weight.quant_state.bitsandbytes__nf4``: the
remaining fields as UTF-8 JSON bytes (quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype,
nested_offset). Everything else is an ordinary tensor. Only safetensors and JSON are read.

grafting's variant, for bases holding k-bit NormalFloat layers (LQ-LoRA's mixed configurations,
:mod:`grafting.quant.nfk`): the same tensors, the quant state under ``M.weight.quant_state.grafting__nfk``
(with ``bits``; quant_type "nf2" / "nf3" / "nf8"), and ``quant_method`` "grafting" in config.json. transformers
+ bitsandbytes fail on such a checkpoint (they cannot decode those layers) rather than load it wrongly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import GraftingError
from ..io.atomic import atomic_dir
from ..merge.io import SafetensorsInput, open_input
from ..merge.shards import ShardWriter
from .linear import NF4Linear
from .model import linear_modules, nf4_layers
from .nf4 import BLOCK_SIZES, NESTED_BLOCK_SIZE, NF4Weight
from .nfk import BITS as NFK_BITS
from .nfk import BLOCK_SIZES as NFK_BLOCK_SIZES
from .nfk import NFkLinear, NFkWeight

QS_KEY = "weight.quant_state.bitsandbytes__nf4"
NFK_QS_KEY = "weight.quant_state.grafting__nfk"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STAT_SUFFIXES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map", QS_KEY,
                  NFK_QS_KEY)


def quantization_config(directory) -> dict | None:
    """The checkpoint's ``quantization_config``, checked to be one grafting reads; None when there is none."""
    file = Path(directory) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GraftingError(f"{file}: cannot read the model config ({e})") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if qc is None:
        return None
    where = f"{file}: quantization_config"
    if not isinstance(qc, dict):
        raise GraftingError(f"{where} must be an object")
    method = qc.get("quant_method")
    if method not in ("bitsandbytes", "grafting"):
        raise GraftingError(f"{where}.quant_method is {method!r}; grafting reads bitsandbytes 4-bit NF4 checkpoints "
                            "(and its own, quant_method 'grafting') only")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise GraftingError(f"{where}: an 8-bit (LLM.int8) checkpoint; grafting reads 4-bit NF4 checkpoints only")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise GraftingError(f"{where}: load_in_4bit is not set; not a 4-bit checkpoint")
    qtype = qc.get("bnb_4bit_quant_type", "fp4")
    if qtype != "nf4":
        raise GraftingError(f"{where}.bnb_4bit_quant_type is {qtype!r}; grafting supports 'nf4' only")
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage not in ("uint8", None):
        raise GraftingError(f"{where}.bnb_4bit_quant_storage is {storage!r}; grafting reads 'uint8' storage only")
    return qc


def _quant_state(src: SafetensorsInput, prefix: str, nfk: bool = False) -> dict:
    key = prefix + (NFK_QS_KEY if nfk else QS_KEY)
    where = f"{src.label}: tensor '{key}'"
    try:
        state = json.loads(bytes(src.get(key).numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GraftingError(f"{where}: not the JSON quant state bitsandbytes writes ({e})") from None
    if not isinstance(state, dict):
        raise GraftingError(f"{where}: expected a JSON object")
    bits = state.get("bits", 4) if nfk else 4
    if nfk and bits not in NFK_BITS:
        raise GraftingError(f"{where}: bits {bits!r} is not one of {NFK_BITS}")
    if state.get("quant_type") != f"nf{bits}":
        raise GraftingError(f"{where}: quant_type is {state.get('quant_type')!r}; expected 'nf{bits}'")
    sizes = NFK_BLOCK_SIZES if nfk else BLOCK_SIZES
    if state.get("blocksize") not in sizes:
        raise GraftingError(f"{where}: blocksize {state.get('blocksize')!r} is not one of {sizes}")
    shape = state.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise GraftingError(f"{where}: shape must be [out_features, in_features], got {shape!r}")
    if state.get("dtype") not in _DTYPES:
        raise GraftingError(f"{where}: dtype {state.get('dtype')!r} is not one of {sorted(_DTYPES)}")
    nested = prefix + "weight.nested_absmax" in src.names()
    if nested and (state.get("nested_blocksize") != NESTED_BLOCK_SIZE
                   or not isinstance(state.get("nested_offset"), (int, float))):
        raise GraftingError(f"{where}: double quantization needs nested_blocksize {NESTED_BLOCK_SIZE} and a numeric "
                            f"nested_offset, got {state.get('nested_blocksize')!r}, {state.get('nested_offset')!r}")
    return state


def read_nf4(src: SafetensorsInput, prefix: str, nfk: bool = False) -> NF4Weight:
    """The NF4 weight stored under ``prefix`` (a module name plus "."), with every tensor's shape checked; with
    ``nfk``, grafting's k-bit NormalFloat layer (an :class:`NFkWeight`)."""
    state = _quant_state(src, prefix, nfk)
    bits = state.get("bits", 4) if nfk else 4
    shape, bs = torch.Size(state["shape"]), state["blocksize"]
    n = math.prod(shape)
    blocks = -(-n // bs)
    names = set(src.names())
    nested = prefix + "weight.nested_absmax" in names

    def get(suffix, want_shape, dtype):
        key = prefix + suffix
        if key not in names:
            raise GraftingError(f"{src.label}: quantized layer '{prefix[:-1]}' has no tensor '{key}'")
        t = src.get(key)
        if tuple(t.shape) != tuple(want_shape) or t.dtype != dtype:
            raise GraftingError(f"{src.label}: tensor '{key}' is {tuple(t.shape)} {t.dtype}; expected "
                                f"{tuple(want_shape)} {dtype} for a {list(shape)} weight in blocks of {bs}")
        return t

    nbytes = -(-n // 2) if not nfk else (n if bits == 8 else -(-n // 8) * bits)
    packed = get("weight", (nbytes, 1), torch.uint8).reshape(-1)
    code = get("weight.quant_map", (2 ** bits,), torch.float32)
    make = (lambda *a: NFkWeight(*a, bits=bits)) if nfk else NF4Weight
    if nested:
        absmax = get("weight.absmax", (blocks,), torch.uint8)
        nested_absmax = get("weight.nested_absmax", (-(-blocks // NESTED_BLOCK_SIZE),), torch.float32)
        nested_code = get("weight.nested_quant_map", (256,), torch.float32)
        offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
        return make(packed, absmax, shape, _DTYPES[state["dtype"]], bs, code, nested_absmax, nested_code, offset)
    absmax = get("weight.absmax", (blocks,), torch.float32)
    return make(packed, absmax, shape, _DTYPES[state["dtype"]], bs, code)


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory), buffers real (rotary tables)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def from_pretrained(directory, model_class=None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model from a bitsandbytes 4-bit NF4 checkpoint, its quantized layers as :class:`NF4Linear`.

    ``model_class``: the transformers class to build (default: the config's ``architectures[0]``). ``dtype``:
    the compute dtype, and the dtype of every tensor that is not quantized."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    directory = Path(directory)
    qc = quantization_config(directory)
    if qc is None:
        raise GraftingError(f"{directory / 'config.json'}: no quantization_config; not a 4-bit checkpoint (load it "
                            "with transformers and quantize it with grafting.quant.quantize)")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    config.quantization_config = None
    with contextlib.suppress(AttributeError):
        del config.quantization_config
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, archs[0], None) if archs else None
        if model_class is None:
            raise GraftingError(f"{directory / 'config.json'}: 'architectures' names no transformers class "
                                f"({archs!r}); pass model_class=")
    with _parameters_on_meta():
        build = model_class.from_config if model_class.__name__.startswith("Auto") else model_class._from_config
        model = build(config, dtype=dtype)
    src = open_input(directory)
    try:
        _load_into(model, src, dtype)
    finally:
        src.close()
    model.eval()
    return model


def _load_into(model: nn.Module, src: SafetensorsInput, dtype: torch.dtype) -> None:
    names = set(src.names())
    modules = dict(model.named_modules())
    quantized = sorted([(k[: -len(QS_KEY) - 1], False) for k in names if k.endswith("." + QS_KEY)]
                       + [(k[: -len(NFK_QS_KEY) - 1], True) for k in names if k.endswith("." + NFK_QS_KEY)])
    used = set()
    for name, nfk in quantized:
        old = modules.get(name)
        if old is None or not (isinstance(old, nn.Linear) or type(old).__name__ == "Conv1D"):
            raise GraftingError(f"{src.label}: quantized tensor '{name}.weight' belongs to no linear layer of "
                                f"{type(model).__name__}")
        q = read_nf4(src, name + ".", nfk)
        want = (old.out_features, old.in_features) if isinstance(old, nn.Linear) else tuple(old.weight.shape[::-1])
        if tuple(q.shape) != want:
            raise GraftingError(f"{src.label}: '{name}' is quantized as {list(q.shape)}, the model's layer is "
                                f"{list(want)} (out, in)")
        bias = None
        if getattr(old, "bias", None) is not None:
            if name + ".bias" not in names:
                raise GraftingError(f"{src.label}: layer '{name}' has a bias but the checkpoint holds no '{name}.bias'")
            bias = src.get(name + ".bias").to(dtype)
            used.add(name + ".bias")
        layer = NFkLinear(q, bias) if nfk else NF4Linear(q, bias)
        layer.compute_dtype = dtype
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        used.update(name + "." + s for s in _STAT_SUFFIXES)
        used.add(name + ".weight")
    rest = {k: src.get(k) for k in sorted(names - used)}
    rest = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in rest.items()}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if unexpected:
        raise GraftingError(f"{src.label}: tensors the model has no place for: {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if still:
        raise GraftingError(f"{src.label}: the checkpoint holds no tensor for {still[:5]}")


def _quant_state_bytes(q: NF4Weight) -> torch.Tensor:
    bits = getattr(q, "bits", 4)
    state = {"quant_type": f"nf{bits}", "blocksize": q.block_size, "dtype": str(q.dtype).removeprefix("torch."),
             "shape": list(q.shape)}
    if isinstance(q, NFkWeight):
        state["bits"] = bits
    if q.double_quant:
        state.update({"nested_blocksize": q.nested_block_size, "nested_dtype": "float32",
                      "nested_offset": float(q.offset)})
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict transformers + bitsandbytes expect, in the 4-bit layout; tied weights written once. For an
    adapted model, its base alone (adapters are saved with ``save_adapter``)."""
    from ..model import AdaptedModel

    base = model.base_model if isinstance(model, AdaptedModel) else model
    out: dict[str, torch.Tensor] = {}
    seen: set = set()
    layers = dict(nf4_layers(base))
    owned = {id(t) for m in layers.values() for t in m.buffers()}
    for name, t in base.state_dict(keep_vars=True).items():
        if id(t) in owned or ".adapters." in name or ".copies." in name:  # adapters' own tensors
            continue
        if t.numel() and t.data_ptr() in seen:  # tied (lm_head <- embed_tokens): transformers re-ties on load
            continue
        seen.add(t.data_ptr())
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = t.detach()
    for name, layer in layers.items():
        q = layer.weight_nf4
        p = name + ".weight"
        out[p] = q.packed.reshape(-1, 1)
        out[p + ".absmax"] = q.absmax
        out[p + ".quant_map"] = q.code.float()
        if q.double_quant:
            out[p + ".nested_absmax"] = q.nested_absmax.float()
            out[p + ".nested_quant_map"] = q.nested_code.float()
        out[name + "." + (NFK_QS_KEY if isinstance(layer, NFkLinear) else QS_KEY)] = _quant_state_bytes(q)
    return out


def _weights_file(name: str) -> bool:
    """A checkpoint's weights or index: what a new save replaces instead of keeping beside its own."""
    return name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"))


def save_pretrained(model: nn.Module, directory, shard_size: int = 5 * 2**30) -> Path:
    """Write ``model`` (its NF4 layers included) as a transformers 4-bit checkpoint that transformers +
    bitsandbytes load with ``from_pretrained(directory)``; atomic (a crash leaves no half-written directory).
    A model with k-bit NormalFloat layers (LQ-LoRA's budget) is written in grafting's variant, which
    :func:`from_pretrained` reads and transformers refuses."""
    from ..model import AdaptedModel

    if isinstance(model, AdaptedModel):
        if any(host.merged for _, host in model.hosts()):
            raise GraftingError("save_pretrained: adapters are merged into the base; unmerge() first, or "
                                "merge_and_unload() and save the plain model it returns")
    config_owner = model.base_model if isinstance(model, AdaptedModel) else model
    from .embedding import NF4Embedding
    if any(isinstance(m, NF4Embedding) for m in model.modules()):
        raise GraftingError("save_pretrained: the model's embeddings are NF4 (quantize(embeddings=True)), which "
                            "bitsandbytes checkpoints cannot hold; quantize without embeddings=True to save")
    layers = nf4_layers(model)
    if not layers:
        raise GraftingError("save_pretrained: the model has no NF4 layer; quantize it first")
    config = getattr(config_owner, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise GraftingError("save_pretrained: needs a transformers model (with a .config)")
    first = layers[0][1]
    skip = [n.replace(".base_layer", "").replace(".original_module", "") for n, _ in linear_modules(config_owner)
            if ".copies." not in n]
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
          "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": first.double_quant,
          "bnb_4bit_compute_dtype": str(first.compute_dtype).removeprefix("torch."),
          "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skip or None,
          "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}
    if any(m.double_quant != first.double_quant for _, m in layers):
        raise GraftingError("save_pretrained: every NF4 layer must share one double-quant setting (bitsandbytes' "
                            "config has one); block sizes may differ (each layer's quant state holds its own)")
    if any(isinstance(m, NFkLinear) for _, m in layers):  # bitsandbytes cannot decode them: say so by name
        qc["quant_method"] = "grafting"
    tensors = checkpoint_tensors(model)
    config_dict = config.to_dict()
    config_dict["quantization_config"] = qc
    config_dict["architectures"] = [type(config_owner).__name__]  # as transformers writes it: the class to build
    directory = Path(directory)
    with atomic_dir(directory, drop=_weights_file) as tmp:
        writer = ShardWriter(tmp, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], shard_size)
        try:
            for k, v in tensors.items():
                writer.add(k, v)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        gen = getattr(config_owner, "generation_config", None)
        if gen is not None and hasattr(gen, "to_json_string"):
            (tmp / "generation_config.json").write_text(gen.to_json_string(), encoding="utf-8")
    return directory


def quantize_pretrained(model_path: str, output_dir, block_size: int = 64, double_quant: bool = True,
                        targets=None, skip=None) -> dict:
    """Load a local / packaged transformers model, quantize it to NF4 and save a bitsandbytes 4-bit checkpoint
    (with its tokenizer) that transformers + bitsandbytes and :func:`from_pretrained` load. Returns a summary."""
    from ..train.models import load_model, resolve
    from .model import quantize, quantized_nbytes

    directory, extra = resolve(model_path)
    if not extra and quantization_config(directory) is not None:
        raise GraftingError(f"{model_path}: already a 4-bit checkpoint")
    config = json.loads((Path(directory) / "config.json").read_text()) if not extra else {}
    archs = config.get("architectures") or ["ForCausalLM"]
    task = "causal_lm" if extra or any(a.endswith("ForCausalLM") for a in archs) else "embed"
    tokenizer, model = load_model(model_path, task)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    quantize(model, targets=targets, block_size=block_size, double_quant=double_quant, skip=skip)
    held = quantized_nbytes(model)
    out = save_pretrained(model, output_dir)
    with atomic_dir(out) as tmp:  # the tokenizer joins the files save_pretrained wrote (they are carried over)
        tokenizer.save_pretrained(str(tmp))
    return {"path": str(out), "layers": len(nf4_layers(model)), "fp32_bytes": before, "bytes": held["total"],
            "nf4_bytes": held["nf4"]}
