"""Merge inputs and output: models read lazily tensor by tensor, and a sharded safetensors writer.

An input is anything satisfying :class:`MergeInput` (names, shape, dtype, get, config); :func:`open_input` is
the one place that decides which kind a path is. Today that is a safetensors model: one ``.safetensors`` file,
a directory with ``model.safetensors``, or a sharded directory with ``model.safetensors.index.json``. Headers are
read up front, tensors only when asked for, so a merge holds one tensor per input at a time. Pickle weights
(``.bin``, ``.pt``) are never loaded: they can run arbitrary code.

:class:`ShardWriter` writes tensors as they are produced, in HF's layout (``model.safetensors``, or
``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``), holding at most one shard in memory.
"""

from __future__ import annotations

import json
import os
import re
import struct
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
    metadata, without reading the tensor; ``get`` reads one tensor, in its stored dtype (the driver upcasts).
    An optional ``close()`` is called when the merge ends. The driver names inputs as the config does, so an
    input needs no label of its own."""

    config: dict | None

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...


def _read_header(file: Path) -> dict:
    """The safetensors header of ``file`` (name -> {dtype, shape, data_offsets}), read without the data."""
    try:
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise GraftingError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:  # the format caps headers at 100 MB; more means this is not safetensors
                raise GraftingError(f"{file}: not a safetensors file (header length {n} is implausible)")
            header = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GraftingError(f"{file}: cannot read the safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header


class SafetensorsInput:
    """A model stored as one or more safetensors files; tensors are read one at a time on ``get``."""

    def __init__(self, label: str, path: Path, files: list[Path], config: dict | None,
                 weight_map: dict[str, Path] | None = None):
        self.label, self.path, self.config = label, path, config
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._handles: dict[Path, object] = {}
        for file in files:
            header = _read_header(file)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if name in self._file_of:
                    raise GraftingError(f"{label}: tensor '{name}' is stored twice ({self._file_of[name].name} "
                                        f"and {file.name})")
                code = info.get("dtype")
                if code not in DTYPES:
                    raise GraftingError(f"{file}: tensor '{name}' has dtype {code!r}, which torch here cannot hold")
                self._file_of[name] = file
                self._meta[name] = (tuple(info["shape"]), DTYPES[code])
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
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return handle.get_tensor(name)

    def close(self) -> None:
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


# ---- writing ------------------------------------------------------------------------------------------------

class ShardWriter:
    """Write tensors into ``directory`` as safetensors shards of at most ``shard_size`` bytes.

    Tensors are held until the next one would overflow the shard, then the shard is written and dropped, so
    memory holds at most one shard (a single tensor larger than ``shard_size`` gets a shard of its own).
    Shards get provisional names while the total is unknown; :meth:`finish` renames them to HF's and writes
    the index. Atomicity is the caller's: write into a temporary directory (see ``atomic_dir``)."""

    def __init__(self, directory, shard_size: int, metadata: dict | None = None):
        if shard_size <= 0:
            raise GraftingError(f"shard_size must be a positive number of bytes, got {shard_size}")
        self.directory = Path(directory)
        self.shard_size = shard_size
        self.metadata = {"format": "pt", **(metadata or {})}
        self._held: dict[str, torch.Tensor] = {}
        self.held_bytes = 0
        self.peak_held_bytes = 0
        self.total_bytes = 0
        self.tensors = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.files: list[Path] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._held or any(name in names for _, names in self._shards):
            raise GraftingError(f"tensor '{name}' written twice")
        size = tensor.numel() * tensor.element_size()
        if self._held and self.held_bytes + size > self.shard_size:
            self.flush()
        tensor = tensor.detach().to("cpu").contiguous()
        # a view into a larger buffer (a method returning a slice) would make safetensors write, or refuse,
        # the whole buffer: give it its own storage
        if tensor.untyped_storage().nbytes() != size:
            tensor = tensor.clone()
        self._held[name] = tensor
        self.held_bytes += size
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        self.total_bytes += size
        self.tensors += 1

    def flush(self) -> None:
        if not self._held:
            return
        from safetensors.torch import save_file

        file = self.directory / f".shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._held, str(file), metadata=self.metadata)
        self._shards.append((file, list(self._held)))
        self._held = {}
        self.held_bytes = 0

    def finish(self) -> list[Path]:
        """Flush the last shard, give every shard its final name, write the index when there are several."""
        self.flush()
        n = len(self._shards)
        if n == 0:
            raise GraftingError("nothing to write: the merge produced no tensors")
        if n == 1:
            final = self.directory / SINGLE
            os.replace(self._shards[0][0], final)
            self.files = [final]
            return self.files
        weight_map = {}
        for i, (file, names) in enumerate(self._shards, 1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(file, final)
            self.files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return self.files
