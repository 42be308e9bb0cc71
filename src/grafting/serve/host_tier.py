"""What the adapter pool reads and keeps in memory: an adapter's files, checked, hashed and laid out for the
mixed-batch store (:func:`read_adapter`), and the host tier that holds them by name (:class:`HostTier`).

S-LoRA (arXiv:2311.03285, section 4) keeps every adapter in host memory and pages the ones a batch needs onto
the device; vLLM bounds that memory with ``max_cpu_loras``. Here the tier is an LRU of adapters as read, within
a count and a byte budget: one evicted from the model comes back from it without a read, a hash or the loader
thread's share of two cores. Installs share the tier's tensors (nothing is copied at install).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import GraftingError
from ..hashing import adapter_hash
from ..io.peft_format import require_finite
from ..io.reader import CONFIG_NAME, WEIGHTS_NAME, AdapterReader, weights_file
from ..stacks import int8_rows


class AdapterError(GraftingError):
    """An adapter request that cannot be served (unknown name, over the rank limit, unreadable files)."""


class AdapterNotFound(AdapterError):
    pass


@dataclass
class HostCopy:
    """An adapter as read (validated, hashed, prepared) for one registration of its name."""
    generation: int
    digest: str
    config: object
    tensors: dict
    metadata: dict | None
    nbytes: int


class HostTier:
    """Adapters as read, by name, least recently used first: at most ``max_count`` of them (0: none) and, when
    ``max_bytes`` is set, at most that many tensor bytes. Not thread-safe: the pool calls it under its lock."""

    def __init__(self, max_count: int, max_bytes: int | None = None):
        self.max_count, self.max_bytes = max_count, max_bytes
        self._copies: OrderedDict[str, HostCopy] = OrderedDict()
        self.nbytes = 0

    def __getitem__(self, name: str) -> HostCopy:
        return self._copies[name]

    def names(self) -> list[str]:
        return list(self._copies)

    def current(self, name: str, generation: int) -> HostCopy | None:
        """The copy of ``name`` if it was read for registration ``generation`` (then marked most recent)."""
        copy = self._copies.get(name)
        if copy is None or copy.generation != generation:
            return None
        self._copies.move_to_end(name)
        return copy

    def keep(self, name: str, generation: int, digest: str, config, tensors: dict, metadata) -> int:
        """Hold what was read for ``name``, dropping least recently used copies past the limits; an adapter
        alone over the byte budget is not held. Returns its tensors' bytes (:func:`tensor_bytes`), counted once
        per copy held: a copy installed again from here is not counted again (240 tensors, a millisecond)."""
        held = self._copies.get(name)
        if held is not None and held.tensors is tensors and held.generation == generation:
            self._copies.move_to_end(name)
            return held.nbytes
        nbytes = tensor_bytes(tensors)
        if self.max_count == 0 or (self.max_bytes is not None and nbytes > self.max_bytes):
            return nbytes
        self.drop(name)
        self._copies[name] = HostCopy(generation, digest, config, tensors, metadata, nbytes)
        self.nbytes += nbytes
        while len(self._copies) > self.max_count or (self.max_bytes is not None and self.nbytes > self.max_bytes):
            self.drop(next(iter(self._copies)))
        return nbytes

    def drop(self, name: str) -> None:
        dropped = self._copies.pop(name, None)
        if dropped is not None:
            self.nbytes -= dropped.nbytes


def contained(root, path) -> Path:
    """The real directory of adapter ``path`` if it and the two files read from it resolve inside ``root``
    (symlinks followed); AdapterError otherwise. Checked before every read, not once at registration: files
    swapped for symlinks out of the root after a load are refused at the next read. Reads then go through the
    real directory, so a symlink along ``path`` re-pointed after this check does not move them."""
    try:
        real_root = Path(root).resolve()
        real = Path(path).resolve()
        targets = (real, (real / CONFIG_NAME).resolve(), (real / WEIGHTS_NAME).resolve())
    except (OSError, ValueError, RuntimeError) as e:  # NUL bytes, symlink loops
        raise AdapterError(f"{shorten(path)!r}: not a usable adapter path ({type(e).__name__})") from None
    for target in targets:
        if target != real_root and real_root not in target.parents:
            what = "the directory" if target == real else target.name  # not where: that is outside
            raise AdapterError(f"{shorten(path)}: {what} resolves outside the adapter root {real_root} (symlinks "
                               "are followed; an adapter root serves only what is inside it)")
    return real


@contextlib.contextmanager
def pinned(root, path, names=(CONFIG_NAME, WEIGHTS_NAME)):
    """(real directory, ``opened`` for :class:`~grafting.io.reader.AdapterReader`) of adapter ``path`` inside
    ``root``: its files ``names`` opened once and checked inside the root as opened (the descriptor's own path, Linux
    ``/proc/self/fd``), then read through those descriptors, so a file swapped for a symlink out of the root
    between :func:`contained` and the read is never followed. ``root`` None: read by name, anywhere."""
    if root is None:
        yield Path(path), None
        return
    real = contained(root, path)
    if not Path("/proc/self/fd").is_dir():  # no descriptor paths here: read by name, checked just before
        yield real, None
        return
    if not real.is_dir():
        raise AdapterError(f"{shorten(path)}: not an adapter directory")
    real_root, fds = Path(root).resolve(), {}
    try:
        for name in names:
            try:  # non-blocking: a FIFO under the root must not hang the reader (refused just below)
                fds[name] = fd = os.open(real / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                if name == WEIGHTS_NAME:
                    weights_file(real)  # says what is missing (or that a pickle is never read)
                raise AdapterError(f"{shorten(path)}: {name} missing (an adapter directory holds {CONFIG_NAME} "
                                   f"and {WEIGHTS_NAME})") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise AdapterError(f"{shorten(path)}: {name} is not a regular file")
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if real_root not in target.parents:
                raise AdapterError(f"{shorten(path)}: {name} resolves outside the adapter root {real_root} "
                                   "(symlinks are followed; an adapter root serves only what is inside it)")
        yield real, {name: f"/proc/self/fd/{fd}" for name, fd in fds.items()}
    finally:
        for fd in fds.values():
            os.close(fd)


def unreadable(path, name: str | None, e: Exception) -> AdapterError:
    """The error for adapter ``name`` whose files at ``path`` the OS would not read (a name too long, no
    permission), naming the path once and shortened: the path may be a client's."""
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)[:200]
    what = "the adapter" if name is None else f"adapter '{shorten(name, 100)}'"
    return AdapterError(f"{shorten(path)}: cannot read {what} ({type(e).__name__}: {why})")


def shorten(path, limit: int = 300) -> str:
    text = str(path)
    return text if len(text) <= limit else text[:limit] + "..."


def read_adapter(path, prepare=None, root=None, int8: bool = False) -> tuple:
    """(content hash, config, tensors, metadata) of the PEFT-format adapter in ``path``: read, checked finite,
    hashed as the files are, then ``prepare``\\ d (if given) and laid out for the store (:func:`stack_layout`;
    ``int8``: for an int8 store). ``root``: the files must stay inside it (:func:`pinned`)."""
    try:
        with pinned(root, path) as (path, opened):
            reader = AdapterReader(path, opened)
            tensors = reader.read_all()
    except GraftingError:
        raise  # says what is wrong and in which file
    except (OSError, ValueError) as e:  # what the reader leaves to the OS: a name too long, no permission
        raise unreadable(path, None, e) from None
    require_finite(tensors, reader.file)  # here, on the loader thread, not on the engine's at install
    digest = adapter_hash(reader.config, tensors)
    config = reader.config
    if prepare is not None:
        config, tensors = prepare(config, tensors)
    return digest, config, stack_layout(config, tensors, int8), reader.metadata


def stack_layout(config, tensors: dict, int8: bool = False) -> dict:
    """LoRA and DoRA factors laid out as the mixed-batch store keeps them, done here on the loader thread: each
    ``lora_A`` (r, fan_in) and ``lora_B`` (out, r) becomes a transposed view of a contiguous (fan_in, r) /
    (r, out) tensor, same values and shape. Installs share these tensors (``install_adapter(share=True)``), so
    writing an adapter into the store is a contiguous copy instead of a transposing one, about six times
    faster; with the host tier an adapter is laid out once and installed many times. ``int8`` (the model's
    store is int8): each factor also carries its int8 form and per-rank scales (``tensor.grafting_int8``,
    :func:`grafting.stacks.int8_rows`), so an install copies those instead of quantizing on the engine's thread.
    Other methods' tensors are left as read."""
    if getattr(config, "method", None) not in ("lora", "dora"):
        return tensors
    out = {}
    for key, t in tensors.items():
        if t.dim() == 2 and key.endswith(("lora_A.weight", "lora_B.weight")) and t.is_contiguous():
            t = t.t().contiguous().t()
            if int8:
                t.grafting_int8 = int8_rows(t.t(), dim=0 if key.endswith("lora_A.weight") else 1)
        out[key] = t
    return out


def tensor_bytes(tensors: dict) -> int:
    """Bytes of ``tensors``, with the int8 forms :func:`stack_layout` attached to them."""
    return sum(x.numel() * x.element_size() for t in tensors.values() for x in (t, *getattr(t, "grafting_int8", ())))


def adapter_rank(config) -> int:
    """The largest rank an adapter config gives any layer (``r`` and ``rank_pattern``)."""
    ranks = [getattr(config, "r", 0) or 0]
    ranks += list((getattr(config, "rank_pattern", None) or {}).values())
    return int(max(ranks))
