"""Atomic writes: a crash never leaves a half-written file or adapter directory.

Temporary names carry the writer's pid (``.<name>.tmp-<pid>-<random>``), so the next save beside them can tell
the leftovers of a killed writer (pid gone: removed) from a save still in progress (pid alive: left alone).
Whatever is written gets the permissions a plain ``open``/``mkdir`` would give under the umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE). False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: never treat it as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _temp_prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{os.getpid()}-"


def remove_stale(path: Path) -> list[Path]:
    """Remove the temporary files/directories of earlier writers of ``path`` whose process has ended."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)-")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in path.parent.iterdir():
            m = pattern.match(entry.name)
            if m and not _alive(int(m.group(1))):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                removed.append(entry)
    return removed


def _carry_over(path: Path, tmp: Path, drop=None) -> None:
    for f in path.iterdir():
        if (tmp / f.name).exists() or (drop is not None and drop(f.name)):
            continue
        # another writer may replace ``path`` meanwhile: a file gone by now was not ours to keep
        with contextlib.suppress(FileNotFoundError):
            if f.is_dir():
                shutil.copytree(f, tmp / f.name)
                continue
            try:
                os.link(f, tmp / f.name)
            except OSError as e:
                if isinstance(e, FileNotFoundError):
                    raise
                shutil.copy2(f, tmp / f.name)  # e.g. a filesystem without hard links


def _install(tmp: Path, path: Path, drop=None) -> None:
    """Put the finished ``tmp`` at ``path``; at every instant ``path`` is absent (first save) or complete."""
    for _ in range(100):  # each retry means another writer moved ``path`` in between: that ends quickly
        if path.is_dir():
            _carry_over(path, tmp, drop)
            # one atomic swap: two renames would leave no directory at ``path`` if killed between them
            if _exchange(tmp, path):
                shutil.rmtree(tmp, ignore_errors=True)  # now the previous contents
                return
            old = path.with_name(_temp_prefix(path, "old") + uuid.uuid4().hex[:8])
            try:
                os.rename(path, old)
            except FileNotFoundError:
                continue
            try:
                os.rename(tmp, path)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another writer's copy took the place
                    shutil.rmtree(old, ignore_errors=True)
                    continue
                with contextlib.suppress(OSError):
                    os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, path)
            return
        except OSError as e:
            # another writer created ``path`` since the check: replace its directory instead
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise OSError(errno.EBUSY, "other writers kept replacing the directory", str(path))


@contextlib.contextmanager
def atomic_dir(path, drop=None) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` in one rename.

    Files already in ``path`` that the block did not write are carried over (hard links), so saving into a
    directory that holds other files keeps them; except those whose name ``drop(name)`` is true (a
    checkpoint's stale shards and index must not outlive the save that replaced them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _install(tmp, path, drop)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
