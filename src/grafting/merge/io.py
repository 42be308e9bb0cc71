"""Merge inputs and output: models read lazily tensor by tensor, and a sharded safetensors writer.

An input is anything satisfying :class:`MergeInput` (names, shape, dtype, get, config); :func:`open_input` is
the one place that decides which kind a path is. Today that is a safetensors model: one ``.safetensors`` file,
a directory with ``model.safetensors``, or a sharded directory with ``model.safetensors.index.json``. Headers are
read up front, tensors only when asked for, so a merge holds one tensor per input at a time. Pickle weights
(``.bin``, ``.pt``) are never loaded: they can run arbitrary code.

Writing the merged model is :mod:`.shards`.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..errors import GraftingError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)


@runtime_checkable
class MergeInput(Protocol):
    """What the merge driver needs from an input model.

    ``config``: the parsed ``config.json`` (None when there is none): it gives the layer count. ``names()`` in a
    stable order (reading in that order walks each file front to back). ``shape`` / ``dtype`` come from
    metadata, without reading the tensor; ``get`` reads one tensor, in its stored dtype (the driver upcasts), into
    a new buffer each call that the caller owns (a merge method may overwrite it in place).
    An optional ``close()`` is called when the merge ends. The driver names inputs as the config does, so an
    input needs no label of its own."""

    config: dict | None

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...


def _read_header(file: Path) -> tuple[dict, int]:
    """The safetensors header of ``file`` (name -> {dtype, shape, data_offsets}), read without the data, and
    the file offset where the data begins."""
    try:
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise GraftingError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:  # the format caps headers at 100 MB; more means this is not safetensors
                raise GraftingError(f"{file}: not a safetensors file (header length {n} is implausible)")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise GraftingError(f"{file}: not a safetensors file (its header is not a JSON object)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GraftingError(f"{file}: cannot read the safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _check_entry(file: Path, name: str, info, data_start: int, file_size: int) -> tuple:
    """(shape, dtype, file offset, byte count) of one header entry, or a GraftingError saying what is wrong."""
    if not isinstance(info, dict):
        raise GraftingError(f"{file}: header entry '{name}' is not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if code not in DTYPES:
        raise GraftingError(f"{file}: tensor '{name}' has dtype {code!r}, which torch here cannot hold")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise GraftingError(f"{file}: tensor '{name}': shape must be a list of sizes, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise GraftingError(f"{file}: tensor '{name}': data_offsets must be [start, end], got {offsets!r}")
    dtype = DTYPES[code]
    nbytes = offsets[1] - offsets[0]
    numel = 1
    for d in shape:
        numel *= d
    if nbytes != numel * dtype.itemsize:
        raise GraftingError(f"{file}: tensor '{name}' has shape {shape} of {code} ({numel * dtype.itemsize} bytes) "
                            f"but data_offsets span {nbytes} bytes")
    if data_start + offsets[1] > file_size:
        raise GraftingError(f"{file}: tensor '{name}' ends past the end of the file (truncated download?)")
    return tuple(shape), dtype, data_start + offsets[0], nbytes


class SafetensorsInput:
    """A model stored as one or more safetensors files; tensors are read one at a time on ``get``.

    A tensor is read with one ``readinto`` from its offset into a buffer of its own, not through a memory map:
    the pages of a mapped file stay resident in the process while the mapping lives, so a merge that maps N
    checkpoints ends up holding them all in its RSS, which is exactly what streaming is meant to avoid."""

    def __init__(self, label: str, path: Path, files: list[Path], config: dict | None,
                 weight_map: dict[str, Path] | None = None):
        if sys.byteorder != "little":  # safetensors data is little-endian and is read here without conversion
            raise GraftingError(f"{label}: reading safetensors needs a little-endian machine")
        self.label, self.path, self.config = label, path, config
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
        self._handles: dict[Path, object] = {}
        for file in files:
            header, data_start = _read_header(file)
            size = file.stat().st_size
            entries = {name: _check_entry(file, name, info, data_start, size) for name, info in header.items()}
            for name, meta in sorted(entries.items(), key=lambda kv: kv[1][2]):
                if name in self._file_of:
                    raise GraftingError(f"{label}: tensor '{name}' is stored twice ({self._file_of[name].name} "
                                        f"and {file.name})")
                self._file_of[name] = file
                self._meta[name] = meta
        if weight_map is not None:  # a wrong index would make the output silently miss or misplace tensors
            for name, file in weight_map.items():
                if self._file_of.get(name) != file:
                    raise GraftingError(f"{path / INDEX}: weight_map puts '{name}' in {file.name}, which does "
                                        f"not hold it")
            extra = sorted(set(self._file_of) - set(weight_map))
            if extra:
                raise GraftingError(f"{path / INDEX}: weight_map misses '{extra[0]}' "
                                    f"(stored in {self._file_of[extra[0]].name})")

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        file = self._file_of.get(name)
        if file is None:
            raise GraftingError(f"{self.label}: has no tensor '{name}'")
        shape, dtype, offset, nbytes = self._meta[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = open(file, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        buf = torch.empty(nbytes, dtype=torch.uint8)
        handle.seek(offset)
        view = memoryview(buf.numpy()) if nbytes else memoryview(b"")
        got = 0
        while got < nbytes:  # readinto may return short counts on some filesystems
            n = handle.readinto(view[got:])
            if not n:
                raise GraftingError(f"{file}: tensor '{name}' is cut short ({got} of {nbytes} bytes); the file "
                                    f"changed or is truncated")
            got += n
        # safetensors stores little-endian; so does every platform torch ships CPU wheels for
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __repr__(self) -> str:
        return f"SafetensorsInput({self.label!r}, {len(self._file_of)} tensors)"


def _load_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GraftingError(f"{file}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise GraftingError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _refuse_pickle(path: Path, found: list[str]) -> GraftingError:
    return GraftingError(
        f"{path}: holds only pickle weights ({', '.join(found)}); grafting never loads pickle files (they can run "
        f"code). Convert the model to safetensors first, e.g. "
        f"AutoModel.from_pretrained(path).save_pretrained(out, safe_serialization=True)")


def open_input(path, *, label: str | None = None, base: MergeInput | None = None) -> MergeInput:
    """Open a merge input by path; the one place that tells input kinds apart.

    ``label`` names it in errors (default: the path). ``base``: the merge's base model, already open, for inputs
    that are defined relative to it (adapter directories)."""
    path = Path(path)
    label = label or str(path)
    if not path.exists():
        raise GraftingError(f"{label}: no such file or directory (models must be local paths)")
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsInput(label, path, [path], None)
        if path.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(path, [path.name])
        raise GraftingError(f"{label}: expected a .safetensors file or a model directory")
    if (path / "adapter_config.json").exists():
        if base is None:
            raise GraftingError(f"{label}: is an adapter directory (adapter_config.json); to merge it into a full "
                                "model give base_model (the model it was trained on), or merge adapters into an "
                                "adapter (output: {kind: adapter})")
        from .adapters import AdapterInput
        return AdapterInput(path, base)
    config = _load_json(path / "config.json") if (path / "config.json").is_file() else None
    if (path / INDEX).is_file():
        index = _load_json(path / INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise GraftingError(f"{path / INDEX}: expected a non-empty 'weight_map' object")
        files = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or Path(fname).name != fname:  # stay inside the model directory
                raise GraftingError(f"{path / INDEX}: weight_map entry for '{name}' must be a file name in the "
                                    f"directory, got {fname!r}")
            file = path / fname
            if not file.is_file():
                raise GraftingError(f"{path / INDEX}: weight_map names shard '{fname}', which is missing")
            files[name] = file
        return SafetensorsInput(label, path, sorted(set(files.values())), config, files)
    if (path / SINGLE).is_file():
        return SafetensorsInput(label, path, [path / SINGLE], config)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _refuse_pickle(path, pickles)
    others = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f" (it holds {', '.join(others)}, but not under the HF names)" if others else ""
    raise GraftingError(f"{label}: no {SINGLE} or {INDEX} in the directory{hint}")


# ---- layers -------------------------------------------------------------------------------------------------

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# the block containers of the common HF families: LLaMA/Mistral/Qwen (model.layers), GPT-2/Bloom/Falcon
# (transformer.h), BERT (encoder.layer), GPT-J/NeoX (layers / h), T5 (block), MPT (blocks)
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def num_layers(config: dict | None) -> int | None:
    """The transformer block count from a ``config.json`` dict (also inside ``text_config``), or None."""
    if not config:
        return None
    for cfg in (config, config.get("text_config") or {}):
        for key in LAYER_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def layer_index(name: str) -> int | None:
    """The block a tensor belongs to (``model.layers.3.mlp.up_proj.weight`` -> 3); None outside the stack."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None
