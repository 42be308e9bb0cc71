"""The adapter pool: many registered adapters, a few resident in the model's mixed-batch store.

S-LoRA (arXiv:2311.03285, section 4) keeps every adapter in host memory and pages the ones the running batch
needs onto the device. Here adapters are *registered* by name and directory (PEFT format; any number, only
the config is read; an explicit :meth:`~AdapterPool.load` reads and checks the weights first), *resident*
ones are installed in the :class:`~grafting.AdaptedModel` (so the mixed-batch path serves them), at most
``max_loras`` of them and at most ``max_bytes`` of tensors, and the least recently used one that no running
request holds is evicted when room is needed. Files are read and validated on a loader thread, so a load
never stalls the decode loop: the engine installs what has been read between steps (:meth:`AdapterPool.poll`).
Like S-LoRA's host memory (and vLLM's ``max_cpu_loras``), read adapters stay in a second, larger LRU tier
(``max_cpu_loras``, :mod:`grafting.serve.host_tier`): one evicted from the model comes back from memory,
without a read, a hash or the loader thread's share of two cores, which on a CPU the decode loop feels. An
installed adapter's parameters are its host copy's tensors (nothing is copied or allocated at install, so a
pool turning over does not fragment the heap the decode loop allocates from); nothing in serving writes to
them.

Building an adapter's modules is most of an install, so an evicted adapter's modules go to one of the same
config when one is installed next (:meth:`AdapterPool._make_room`), and, when the adapter taking its room has
another config, are kept aside as a *spare* (up to ``max_spares``, not served) for the next adapter with their
config; a 512-adapter replay through 64 with four ranks built modules at a third of its installs without spares.

Resident adapters are keyed by **content hash** (config + tensors, :func:`grafting.hashing.adapter_hash`),
not by name: re-registering a name (a new directory, or new files in the old one) makes its next request read
the files again, and two names with the same content share one resident copy. Requests already running keep
the weights they started with.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import GraftingError
from ..hashing import adopt_hash, config_json, seal
from ..io.peft_format import install_adapter, refill_adapter
from .host_tier import AdapterError, AdapterNotFound, HostTier, read_adapter
from .registration import Registrations, _Registered
from .validate import ModelCheck

__all__ = ["AdapterError", "AdapterNotFound", "AdapterPool"]


@dataclass
class _Resident:
    internal: str  # the adapter's name inside the model
    nbytes: int
    config: str  # the config it was installed from (JSON): an adapter with the same one can take its modules
    pins: int = 0
    last_used: float = field(default_factory=time.monotonic)


class AdapterPool(Registrations):
    """Registered adapters by name; the resident ones inside ``model`` (an AdaptedModel).

    ``max_loras``: resident adapters at most (so also distinct adapters in one batch); ``max_bytes``: their
    tensors' bytes at most (None: no limit); ``max_cpu_loras`` / ``max_cpu_bytes``: adapters kept in memory as
    read, so a re-install needs no disk read (default: as many as ``max_loras``; 0 keeps none); ``max_rank``:
    registering an adapter with a larger rank is refused (None: any rank); ``root``: the adapter root
    (``--adapter-root``): registrations not given another root (or None) must stay inside it, checked at every
    read of their files; ``prepare``: ``(config, tensors) -> (config, tensors)`` applied after reading (and
    after hashing, so keys stay the files' content), e.g. :func:`grafting.serve.embed.encoder_view`.
    ``max_spares``: evicted adapters' modules kept installed but unserved for the next adapter with their config
    (default ``max_loras // 4``; their tensors count against ``max_bytes``; the stacks need room for
    ``max_loras + max_spares`` adapters, see :attr:`max_installed`).
    Registration (:meth:`register`, :meth:`load`) is in :mod:`grafting.serve.registration`."""

    def __init__(self, model, max_loras: int = 8, max_bytes: int | None = None, max_rank: int | None = None,
                 loader_threads: int = 1, prepare=None, max_cpu_loras: int | None = None,
                 max_cpu_bytes: int | None = None, root=None, max_spares: int | None = None):
        if max_loras < 1:
            raise GraftingError(f"max_loras: expected >= 1, got {max_loras}")
        if max_cpu_loras is not None and max_cpu_loras < 0:
            raise GraftingError(f"max_cpu_loras: expected >= 0, got {max_cpu_loras}")
        if max_spares is not None and max_spares < 0:
            raise GraftingError(f"max_spares: expected >= 0, got {max_spares}")
        self.model = model
        self.max_loras, self.max_bytes, self.max_rank = max_loras, max_bytes, max_rank
        self.max_spares = max_loras // 4 if max_spares is None else max_spares
        self._spares: OrderedDict[str, _Resident] = OrderedDict()  # model-side name -> parked modules, oldest first
        self.max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        self.max_cpu_bytes = max_cpu_bytes
        self._host = HostTier(self.max_cpu_loras, max_cpu_bytes)  # name -> as read
        self.prepare = prepare
        self.root = None if root is None else Path(root)
        self._model_lock = threading.Lock()  # held while the pool changes the model: a meta copy never sees half
        self._check = ModelCheck(model, self._model_lock)
        self._registered: dict[str, _Registered] = {}
        self._refused: dict[str, str] = {}  # name -> why it could not register (see refuse)
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # digest -> resident, LRU first
        self._ready: list = []  # (entry, generation, digest, config, tensors) read, waiting for room
        self._lock = threading.Lock()
        self._loader_threads = loader_threads
        self._loader = self._new_loader()
        self._generation = 0
        self._installs = 0  # numbers the model-side names (a name outlives the content it was installed with)
        self._wanted: set = set()  # names queued requests wait for that may take room now (see want)
        self._deferred: set = set()  # names queued further back: not read until room is theirs
        self.stats = {"loads": 0, "evictions": 0, "load_errors": 0, "reads": 0}
        self.on_change = None  # called (no arguments) from the loader thread when a read finished

    @property
    def int8_store(self) -> bool:
        """Whether the model's mixed-batch store is int8: reads then quantize each factor on the loader thread."""
        routing = getattr(self.model, "_routing", None)
        return routing is not None and routing.stack_dtype == torch.int8

    @property
    def in_memory(self) -> list[str]:
        """Names whose adapter the host tier holds as read, least recently used first."""
        with self._lock:
            return self._host.names()

    @property
    def max_installed(self) -> int:
        """Adapters the model may hold at once: the resident ones and the spares."""
        return self.max_loras + self.max_spares

    @property
    def resident(self) -> list[str]:
        """Content hashes of the resident adapters, least recently used first."""
        with self._lock:
            return list(self._resident)

    # ---- the engine's side (its thread) -----------------------------------------------------------------------
    def acquire(self, name: str) -> str | None:
        """The model-side name of adapter ``name`` if resident (pinned until :meth:`release`); otherwise start
        reading it and return None (ask again after :meth:`poll`). Raises AdapterError if it cannot load."""
        with self._lock:
            entry = self._registered.get(name)
            if entry is None:
                raise self.unknown(name)
            if entry.error is not None:
                raise AdapterError(entry.error)
            if entry.digest is not None and entry.digest in self._resident:
                res = self._resident[entry.digest]
                res.pins += 1
                res.last_used = time.monotonic()
                self._resident.move_to_end(entry.digest)
                return res.internal
            if entry.loading is None and name not in self._deferred:
                self._fetch(entry)
            return None

    def _fetch(self, entry: _Registered) -> None:
        """Queue ``entry`` for install: from the host tier if it holds this registration, else read (locked)."""
        copy = self._host.current(entry.name, entry.generation)
        if copy is not None:
            self._ready.append((entry, entry.generation, copy.digest, copy.config, copy.tensors, None,
                                copy.metadata))
            entry.loading = _DONE
        else:
            entry.loading = self._loader.submit(self._read, entry, entry.generation)

    def want(self, names) -> None:
        """The adapters that queued requests wait for, in the order they will be admitted; a scheduler calls
        this before it acquires. Reads start for the first ones that fit beside the pinned residents, installs
        evict residents nobody waits for before any that somebody does, and names further back wait their turn
        instead of being read now and evicted before their request runs (512 adapters queued through a pool of
        64 read each adapter about twice that way)."""
        with self._lock:
            room = self.max_loras - sum(1 for r in self._resident.values() if r.pins > 0)
            wanted, deferred = [], set()
            for name in dict.fromkeys(names):
                entry = self._registered.get(name)
                if entry is None or entry.error is not None:
                    continue
                res = self._resident.get(entry.digest) if entry.digest is not None else None
                if res is not None and res.pins > 0:
                    continue  # already holds its room
                if len(wanted) < max(room, 1):
                    wanted.append(entry)
                else:
                    deferred.add(name)
            self._wanted, self._deferred = {e.name for e in wanted}, deferred
            for entry in wanted:
                if entry.loading is None and not (entry.digest is not None and entry.digest in self._resident):
                    self._fetch(entry)

    def release(self, internal: str) -> None:
        with self._lock:
            for res in self._resident.values():
                if res.internal == internal:
                    res.pins -= 1
                    return

    def _read(self, entry: _Registered, generation: int):
        result = self._read_files(entry, generation)
        with self._lock:
            self._ready.append(result)
        if self.on_change is not None:
            self.on_change()

    def _read_files(self, entry: _Registered, generation: int) -> tuple:
        """(entry, generation, digest, config, tensors, error, metadata): read, checked, hashed, prepared."""
        try:
            digest, config, tensors, metadata = read_adapter(entry.path, self.prepare, entry.root, self.int8_store)
            with self._lock:
                self.stats["reads"] += 1
            return entry, generation, digest, config, tensors, None, metadata
        except Exception as e:  # reported to the requests that asked for it
            return (entry, generation, None, None, None, str(e) if isinstance(e, GraftingError) else
                    f"{entry.path}: cannot read adapter '{entry.name}' ({type(e).__name__}: {e})", None)

    def poll(self) -> bool:
        """Install adapters read since the last call, evicting unpinned LRU ones to make room. Call between
        steps on the thread that runs the model. Returns whether anything changed."""
        changed = False
        with self._lock:
            ready, self._ready = self._ready, []
        waiting = []
        for item in ready:
            entry, generation, digest, config, tensors, error, metadata = item
            with self._lock:
                current = self._registered.get(entry.name) is entry and entry.generation == generation
                entry.loading = None
                if not current:
                    continue  # re-registered or unregistered while reading: the new registration reads anew
                if error is not None:
                    entry.error = error
                    self.stats["load_errors"] += 1
                    changed = True
                    continue
                nbytes = self._host.keep(entry.name, generation, digest, config, tensors, metadata)
                if digest in self._resident:  # same content under another name, or read twice
                    entry.digest = digest
                    changed = True
                    continue
            key = config_json(config)
            fits, internal = self._make_room(nbytes, key)
            if not fits:
                waiting.append(item)
                with self._lock:
                    entry.loading = _DONE
                continue
            try:
                with self._model_lock:  # a meta copy for load checks (validate.py) never sees half an install
                    if internal is not None:  # the evicted adapter's modules, given this one's weights
                        config = self.model.peft_config[internal]  # the same JSON (_make_room matched it)
                        try:
                            held = refill_adapter(self.model, internal, config, tensors, entry.path, metadata,
                                                  finite_checked=True, share=True)
                        except Exception:
                            self.model.delete_adapter(internal)
                            raise
                    else:
                        internal = self._new_internal_name()
                        held = install_adapter(self.model, internal, config, tensors, entry.path, metadata,
                                               finite_checked=True, share=True, training=False)  # no dropout
            except Exception as e:
                with self._lock:
                    entry.error = str(e) if isinstance(e, GraftingError) else f"{entry.path}: {e}"
                    self.stats["load_errors"] += 1
                    self._host.drop(entry.name)  # it will never install: do not hold its tensors
                changed = True
                continue
            if self.prepare is None:  # the model holds what was hashed: spare the engine thread a second hash
                with self._model_lock:
                    if adopt_hash(self.model, internal, config, tensors, digest, held=held):
                        # its parameters are the host tier's tensors, which nobody edits: trust the hash at
                        # every step (checking 30 layers' tensors of 32 adapters cost ~5% of a decode step)
                        seal(self.model, [internal])
            with self._lock:
                self._resident[digest] = _Resident(internal, nbytes, key)
                entry.digest = digest
                self.stats["loads"] += 1
            changed = True
        with self._lock:
            self._ready = waiting + self._ready
        self._evict_unregistered()
        return changed

    def _make_room(self, nbytes: int, config: str) -> tuple[bool, str | None]:
        """(fits, model-side name whose modules to reuse, or None): evict least recently used adapters that nobody
        holds or waits for until ``nbytes`` more fit. The least recently used of those installed from the same
        ``config`` is evicted instead of the very LRU one and its modules are handed over (refill_adapter):
        adapters trained with one recipe share a config, and building modules is most of an install. An adapter
        evicted for one of another config keeps its modules as a spare (:meth:`_park`), which an install with its
        config takes when no resident one gives up its modules. (Searching only the LRU quarter, a 512-adapter
        replay through 64 with four ranks built modules at 53 of 111 installs; searching all, at about 30, and
        read no adapter more often; with spares as well, at about ten.)"""
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return False, None
        while True:
            with self._lock:
                used = sum(r.nbytes for r in self._resident.values())
                spare_bytes = sum(r.nbytes for r in self._spares.values())
                room = self.max_bytes is None or used + spare_bytes + nbytes <= self.max_bytes
                if len(self._resident) < self.max_loras and room:
                    same = next((n for n, r in self._spares.items() if r.config == config), None)
                    return True, None if same is None else self._spares.pop(same).internal
                if len(self._resident) < self.max_loras and self._spares:  # bytes: spares go before residents
                    drop = next(iter(self._spares))
                    del self._spares[drop]
                else:
                    drop = None
                    spare = {self._registered[n].digest for n in self._wanted if n in self._registered}
                    victims = [d for d, r in self._resident.items() if r.pins <= 0 and d not in spare]
                    if not victims:
                        return False, None
                    same = next((d for d in victims if self._resident[d].config == config and (
                        self.max_bytes is None or used + spare_bytes - self._resident[d].nbytes + nbytes
                        <= self.max_bytes)), None)
                    if same is not None:
                        return True, self._forget(same).internal
            if drop is not None:
                with self._model_lock:
                    self.model.delete_adapter(drop)
            else:
                self._park(victims[0], config)

    def _park(self, digest: str, wanted: str) -> None:
        """Evict resident ``digest``, keeping its modules installed (unserved: no name routes to them) as a spare
        for the next adapter with its config. Beyond ``max_spares`` (not counting one of ``wanted``, the config
        being installed, which that install takes next), the oldest spare of another config goes first."""
        with self._lock:
            res = self._forget(digest)
            self._spares[res.internal] = res
            drop = []
            taken = any(r.config == wanted for r in self._spares.values())
            while len(self._spares) - taken > self.max_spares:
                name = next((n for n, r in self._spares.items() if r.config != wanted), next(iter(self._spares)))
                drop.append(self._spares.pop(name).internal)
        for internal in drop:
            with self._model_lock:
                self.model.delete_adapter(internal)

    def _new_internal_name(self) -> str:
        """A model-side name no adapter holds (the model may hold adapters this pool did not install)."""
        while True:
            self._installs += 1
            name = f"pool-{self._installs}"
            if name not in self.model.peft_config:
                return name

    def _forget(self, digest: str) -> _Resident:
        """Drop resident ``digest`` from the books (locked); the caller deletes or reuses its modules."""
        res = self._resident.pop(digest)
        for entry in self._registered.values():
            if entry.digest == digest:
                entry.digest = None
        self.stats["evictions"] += 1
        return res

    def _evict(self, digest: str) -> None:
        with self._lock:
            res = self._forget(digest)
        with self._model_lock:
            self.model.delete_adapter(res.internal)

    def _stale(self) -> list[str]:
        """Digests of resident copies that no registered name points at and nothing pins (locked)."""
        wanted = {e.digest for e in self._registered.values()}
        return [d for d, r in self._resident.items() if d not in wanted and r.pins <= 0]

    def has_stale(self) -> bool:
        """Whether a resident copy waits to be evicted (:meth:`_stale`): the loop then steps once even with no
        request, so an unloaded adapter leaves an idle server's model."""
        with self._lock:
            return bool(self._stale())

    def _evict_unregistered(self) -> None:
        """Resident copies that no registered name points at any more, once unpinned, go."""
        with self._lock:
            stale = self._stale()
        for d in stale:
            self._evict(d)

    def preload(self, names=None) -> list[str]:
        """Read and install adapters now, on the calling thread (the model's, before serving starts): ``names``
        (default: the registered ones, in registration order), the first ``max_loras`` of them installed and
        the rest, up to ``max_cpu_loras`` in all, read into the host tier. A server that starts warm answers its
        first requests without waiting for disk; S-LoRA's and peft's servers hold their adapters before the
        first request too. Returns the names now resident; ones that fail to load keep their error for the
        requests that ask for them."""
        with self._lock:
            wanted = list(self._registered) if names is None else list(names)
        for name in wanted:
            if name not in self._registered:
                raise AdapterNotFound(f"no adapter named '{name}'")
        loaded = []
        for name in wanted[:self.max_loras]:
            with self._lock:
                entry = self._registered[name]
                if entry.digest is not None and entry.digest in self._resident:
                    loaded.append(name)
                    continue
                entry.loading = _DONE
            self._read(entry, entry.generation)
            self.poll()
            if entry.digest is not None and entry.digest in self._resident:
                loaded.append(name)
        for name in wanted[self.max_loras:max(self.max_loras, self.max_cpu_loras)]:
            with self._lock:
                entry = self._registered[name]
                if self._host.current(name, entry.generation) is not None:
                    continue
            _, generation, digest, config, tensors, error, metadata = self._read_files(entry, entry.generation)
            with self._lock:
                if self._registered.get(name) is not entry or entry.generation != generation:
                    continue
                if error is not None:
                    entry.error = error
                    self.stats["load_errors"] += 1
                else:
                    self._host.keep(name, generation, digest, config, tensors, metadata)
        with self._lock:
            internal = [r.internal for r in self._resident.values()]
        with self._model_lock:
            self.model.stack_adapters(internal)  # the mixed-batch stacks too, not on the first requests
        return loaded

    def _new_loader(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self._loader_threads, thread_name_prefix="grafting-adapter-loader")

    def pending(self, name: str) -> bool:
        """Whether adapter ``name`` is being read, waits for room, or waits its turn to be read (:meth:`want`)."""
        entry = self._registered.get(name)
        return entry is not None and (entry.loading is not None or name in self._deferred)

    def close(self) -> None:
        """Stop the loader thread (reads not started are dropped). The pool stays usable: a later read starts
        a new loader, and names whose read was dropped are read again when asked for."""
        with self._lock:
            self._loader.shutdown(wait=False, cancel_futures=True)
            self._loader = self._new_loader()  # starts no thread until something is read
            for entry in self._registered.values():
                if entry.loading is not None and entry.loading is not _DONE and entry.loading.cancelled():
                    entry.loading = None


_DONE = Future()  # marks "read, waiting for room" so acquire does not read the files again
