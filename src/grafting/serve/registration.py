"""The adapter pool's registrations (:class:`Registrations`, a part of :class:`~grafting.serve.AdapterPool`):
names and the directories they serve from, confined to the adapter root when there is one.

A registration reads only the adapter's config (:meth:`Registrations.register`: an ``--adapter-root`` with a
thousand adapters starts in no time), so weights that cannot serve fail the requests for them;
:meth:`Registrations.load` (the HTTP load endpoint, ``graft serve --adapter``) reads the weights and checks them
against the model first, as vLLM's load endpoint does, and registers only what would install. Either way, an
adapter under a root has its files checked against the root again at every read.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ..errors import GraftingError
from ..io.reader import CONFIG_NAME, read_config
from .host_tier import AdapterError, AdapterNotFound, adapter_rank, contained, pinned, read_adapter, unreadable


@dataclass
class _Registered:
    name: str
    path: Path
    rank: int
    generation: int
    root: Path | None = None  # every read of its files stays inside it
    digest: str | None = None  # content hash once read; None until then (and after re-registration)
    loading: Future | None = None
    error: str | None = None


class _PoolRoot:
    def __repr__(self):
        return "POOL_ROOT"


POOL_ROOT = _PoolRoot()  # register/load default: the pool's own root (None there is "unconfined")


class Registrations:
    """Registration by name, any thread. The pool provides ``_lock``, ``_registered``, ``_generation``,
    ``_host`` (the host tier), ``_resident``, ``_refused``, ``_check`` (a ModelCheck), ``root``, ``max_rank``,
    ``prepare`` and ``on_change``."""

    def register(self, name: str, path, root=POOL_ROOT) -> None:
        """Register (or re-register) adapter ``name`` from directory ``path``; only its config is read now, so
        registering thousands costs little, and weights that cannot serve fail the requests for them.
        ``root``: the directory every read of its files must stay inside, checked at each read; by default the
        pool's ``root``; None: anywhere (the operator named it, e.g. ``graft serve --adapter``)."""
        path, root = self._locate(name, path, root)
        try:
            with pinned(root, path, names=(CONFIG_NAME,)) as (path, opened):  # registering reads no weights
                config = read_config(path, opened)
        except GraftingError:
            raise  # says what is wrong and in which file
        except (OSError, ValueError) as e:  # what the reader leaves to the OS: a name too long, no permission
            raise unreadable(path, name, e) from None
        with self._lock:
            self._add(name, path, self._rank(name, path, config), root)
            self._host.drop(name)  # the new registration reads its files anew

    def load(self, name: str, path, root=POOL_ROOT) -> None:
        """Register ``name`` from ``path`` once its files are read and checked against the model: what an install
        would check (targets, tensor keys, dtypes, shapes; :class:`~grafting.serve.validate.ModelCheck`),
        without touching the model, from any thread. vLLM's load endpoint validates like this; :meth:`register`
        reads only the config. On any error AdapterError, and a registration of ``name`` stays as it was. The
        copy read goes to the host tier (within its limits), so the first request for it reads nothing.
        ``root`` as for :meth:`register`."""
        path, root = self._locate(name, path, root)
        try:
            digest, config, tensors, metadata = read_adapter(path, self.prepare, root, self.int8_store)
        except GraftingError as e:
            raise AdapterError(str(e)) from None
        except Exception as e:  # anything else the files do to the reader: say which adapter, as reads do
            raise unreadable(path, name, e) from None
        rank = self._rank(name, path, config)
        with self._lock:
            resident = digest in self._resident  # the same content already installed: nothing to check
        if not resident:
            try:
                self._check(config, tensors, path)
            except GraftingError as e:
                raise AdapterError(str(e)) from None
        with self._lock:
            entry = self._add(name, path, rank, root)
            entry.digest = digest if digest in self._resident else None
            self._host.drop(name)
            self._host.keep(name, entry.generation, digest, config, tensors, metadata)

    def _locate(self, name: str, path, root) -> tuple:
        """(directory, root confining it or None), refusing a bad name or a directory outside the root."""
        if not isinstance(name, str) or not name or len(name) > 256:
            raise AdapterError(f"adapter name {name!r}: expected a non-empty string of at most 256 characters")
        root = self.root if root is POOL_ROOT else None if root is None else Path(root)
        return (Path(path) if root is None else contained(root, path)), root

    def _rank(self, name: str, path: Path, config) -> int:
        rank = adapter_rank(config)
        if self.max_rank is not None and rank > self.max_rank:
            raise AdapterError(f"{path}: adapter '{name}' has rank {rank}, above this server's maximum "
                               f"{self.max_rank} (raise --max-lora-rank)")
        return rank

    def refuse(self, name: str, reason: str) -> None:
        """Remember that ``name`` could not register and why (an ``--adapter-root`` directory skipped at start):
        requests for it then fail with ``reason`` (HTTP 400) instead of "no such adapter" (404). Only a later
        successful registration of ``name`` replaces the refusal (a failed load answers its own error and
        leaves it); :meth:`unregister` forgets it."""
        with self._lock:
            if name not in self._registered:
                self._refused[name] = reason

    def refusal(self, name: str) -> str | None:
        """Why ``name`` was refused (:meth:`refuse`), or None."""
        return self._refused.get(name)

    def unknown(self, name: str) -> AdapterError:
        """The error for a request naming ``name``, which is not registered: why it was refused, else not found."""
        reason = self._refused.get(name)
        return AdapterNotFound(f"no adapter named '{name}'") if reason is None else AdapterError(reason)

    def _add(self, name: str, path: Path, rank: int, root) -> _Registered:
        """A new registration of ``name`` (locked), replacing any earlier one (or refusal)."""
        self._refused.pop(name, None)
        self._generation += 1
        entry = self._registered[name] = _Registered(name, path, rank, self._generation, root=root)
        return entry

    def unregister(self, name: str) -> None:
        """Forget ``name``; its resident copy is evicted once no running request holds it."""
        with self._lock:
            if self._registered.pop(name, None) is None and self._refused.pop(name, None) is None:
                raise AdapterNotFound(f"no adapter named '{name}'")
            self._host.drop(name)
        if self.on_change is not None:  # wake an idle loop: it evicts the resident copy (has_stale)
            self.on_change()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._registered)

    def __contains__(self, name: str) -> bool:
        return name in self._registered

    def path(self, name: str) -> Path:
        return self._registered[name].path
