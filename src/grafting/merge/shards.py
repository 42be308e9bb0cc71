"""Writing a merged model as safetensors shards, each tensor streamed to disk the moment it is made.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once, so a writer built on it holds a
whole shard (5 GB by default) before anything reaches the disk. A merge knows every output tensor's name, shape
and dtype before it computes the first one, which is all a safetensors header holds. :class:`ShardWriter`
takes that layout up front, assigns tensors to shards, writes each shard's header when the shard is opened and
then appends each tensor's bytes as it arrives. Memory holds one tensor, not one shard.

The files are ordinary safetensors (an 8-byte little-endian header length, the JSON header padded with spaces to
8 bytes, the data back to back in header order), in HF's layout: ``model.safetensors``, or
``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``. Atomicity is the caller's: write into
a temporary directory (see :func:`grafting.io.atomic.atomic_dir`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GraftingError
from .io import DTYPES, INDEX, SINGLE

_CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def _entry(name: str, shape, dtype: torch.dtype) -> _Entry:
    if dtype not in _CODES:
        raise GraftingError(f"tensor '{name}': dtype {dtype} has no safetensors code")
    numel = 1
    for d in shape:
        numel *= int(d)
    return _Entry(name, tuple(int(d) for d in shape), dtype, numel * dtype.itemsize)


def _header(entries: list[_Entry], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _CODES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer pads it
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Stream tensors into ``directory`` as safetensors shards of at most ``shard_size`` bytes of data.

    ``layout``: every tensor to be written, as ``(name, shape, dtype)`` in the order :meth:`add` will receive
    them. Shards are filled in that order; a tensor larger than ``shard_size`` gets a shard of its own.
    ``metadata`` (string values) goes into every shard's ``__metadata__``."""

    def __init__(self, directory, layout, shard_size: int, metadata: dict | None = None):
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
            raise GraftingError(f"shard_size must be a positive number of bytes, got {shard_size!r}")
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        entries = [_entry(name, shape, dtype) for name, shape, dtype in layout]
        if not entries:
            raise GraftingError("nothing to write: the merge produced no tensors")
        seen: set[str] = set()
        for e in entries:
            if e.name in seen:
                raise GraftingError(f"tensor '{e.name}' written twice")
            seen.add(e.name)
        self.shards: list[list[_Entry]] = [[]]
        held = 0
        for e in entries:
            if self.shards[-1] and held + e.nbytes > shard_size:
                self.shards.append([])
                held = 0
            self.shards[-1].append(e)
            held += e.nbytes
        n = len(self.shards)
        self.files = [self.directory / (SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors")
                      for i in range(1, n + 1)]
        self.total_bytes = sum(e.nbytes for e in entries)
        self._order = [(s, e) for s, shard in enumerate(self.shards) for e in shard]
        self._next = 0
        self._fh = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the layout; it must match the layout's name, shape and dtype."""
        if self._next >= len(self._order):
            raise GraftingError(f"tensor '{name}' is not in the layout (all {len(self._order)} were written)")
        shard, e = self._order[self._next]
        if name != e.name:
            raise GraftingError(f"expected tensor '{e.name}' next, got '{name}'")
        if tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
            raise GraftingError(f"tensor '{name}': the layout says {e.shape} {e.dtype}, got "
                                f"{tuple(tensor.shape)} {tensor.dtype}")
        if self._fh is None:
            self._fh = open(self.files[shard], "wb")  # noqa: SIM115 (closed when the shard's last tensor is in)
            self._fh.write(_header(self.shards[shard], self.metadata))
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if e.nbytes:
            self._fh.write(data.view(torch.uint8).numpy().data)
        self._fh.flush()  # out of the process: the file buffer must not become a second copy to account for
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != shard:
            self._fh.close()
            self._fh = None

    def finish(self) -> list[Path]:
        """Check that every tensor of the layout was written; write the index when there are several shards."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            self.abort()
            raise GraftingError(f"the merge stopped before tensor '{missing}' "
                                f"({len(self._order) - self._next} tensors not written)")
        if len(self.files) > 1:
            weight_map = {e.name: f.name for f, shard in zip(self.files, self.shards) for e in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return list(self.files)

    def abort(self) -> None:
        """Close an open shard (its file is incomplete: the caller discards the directory)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
