"""The background thread shared by the generation engine and the embedder: step while there is work, sleep
on a condition otherwise, stop by draining or cancelling what is in flight."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque

from ..errors import GraftingError


log = logging.getLogger("grafting.serve")

# a step that fails this many times in a row fails what waits too: the same error again and again (an adapter
# that cannot be fetched, say) would otherwise keep those clients waiting for ever
FAILURES_BEFORE_FAILING_THE_QUEUE = 3


class RecentRate:
    """A counter's rate over the last ``window`` seconds, from samples the loop adds once per step (any thread
    may read it). A gauge of the lifetime average would decay while the server idles and hide a slowdown
    behind hours of history; Prometheus' ``rate()`` over the matching counter gives the same figure server-side."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self._samples: deque = deque()  # (monotonic time, counter value), oldest first
        self._started = time.monotonic()
        self._lock = threading.Lock()  # a scrape copies the samples while the loop appends

    def add(self, value: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._samples.append((now, value))
            # keep one sample at or before the window's start: the baseline the rate is measured from
            while len(self._samples) > 1 and self._samples[1][0] <= now - self.window:
                self._samples.popleft()

    def rate(self, value: float, now: float | None = None) -> float:
        """Per second over the last ``window`` seconds (since start if shorter), ``value`` being the counter now."""
        now = time.monotonic() if now is None else now
        start, base = self._started, 0.0
        with self._lock:
            samples = list(self._samples)
        for t, v in samples:
            if t > now - self.window:
                break
            start, base = t, v
        start = max(start, now - self.window)  # idle since the baseline: count only the window's seconds
        return (value - base) / max(now - start, 1e-9)


class QueueFull(GraftingError):
    """More requests are waiting than the engine accepts (HTTP 429)."""


class EngineStopped(GraftingError):
    pass


def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of returning them to the OS (process-wide).

    A serving loop allocates and frees the same sizes every step (activations, key/value caches, gathered
    factors); by default glibc maps blocks above a moving threshold afresh and unmaps them when freed, so each
    step page-faults its memory back in: on the S-LoRA trace (benchmarks/serve.py) about half of grafting's
    minor page faults and a tenth of its decode time. Blocks up to ``mmap_threshold`` come from the heap, which
    shrinks only when ``trim_threshold`` bytes are free at its top. Returns whether it applied (glibc only;
    elsewhere nothing changes)."""
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    return True


_freeze_lock = threading.Lock()
_frozen_by = [0]  # loops running with the collector frozen: the last one to stop unfreezes


class BackgroundLoop:
    """``start()`` runs ``step()`` on a daemon thread; ``stop()`` ends it. Subclasses define ``step`` (returns
    False when nothing could run, e.g. every request waits for an adapter read), ``_has_work``, ``_drained``,
    ``_cancel_all`` and ``_fail_all``, and hold ``self.pool``, ``self.waiting``, ``self.max_queue`` and
    ``self.stats``."""

    thread_name = "grafting-loop"

    def _init_loop(self) -> None:
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True

    def _enqueue(self, item) -> None:
        """Queue ``item`` for the loop (any thread); refused while stopping or when the queue is full."""
        with self._lock:
            if not self._accepting:
                raise EngineStopped(f"the {self.thread_name.removeprefix('grafting-')} is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue}); retry later")
            self.waiting.append(item)
            self.stats["requests"] += 1
            self._lock.notify_all()

    def _remove_waiting(self, item) -> None:
        with self._lock:
            try:
                self.waiting.remove(item)
            except ValueError:
                pass

    def start(self, retain_memory: bool = True, freeze_gc: bool = True):
        """Run steps on a background thread. ``retain_memory``: see :func:`retain_freed_memory`. ``freeze_gc``:
        until :meth:`stop`, the cyclic garbage collector ignores every object alive now (``gc.freeze``: the
        model, tokenizer and libraries, hundreds of thousands of objects that a full collection would otherwise
        walk again and again while the loop allocates: installing adapters from a pool took a third longer
        without it)."""
        if retain_memory:
            retain_freed_memory()
        if freeze_gc and self._thread is None and not self.__dict__.get("_froze"):
            with _freeze_lock:
                if _frozen_by[0] == 0:
                    gc.collect()
                    gc.freeze()
                _frozen_by[0] += 1
            self._froze = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; with ``drain`` finish the ones in flight first, else cancel them."""
        with self._lock:
            self._accepting = False
            if not drain:
                self._cancel_all()
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.__dict__.pop("_froze", False):
            with _freeze_lock:
                _frozen_by[0] -= 1
                if _frozen_by[0] == 0:  # another engine or embedder still serving keeps it frozen
                    gc.unfreeze()  # what was alive at start may be collected again
        if self.pool is not None:
            self.pool.close()

    def _pool_stale(self) -> bool:
        return self.pool is not None and self.pool.has_stale()

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _fail_waiting(self, why: str) -> None:
        """Finish every waiting request with an error (a subclass whose queue can hold them overrides this)."""

    def _loop(self) -> None:
        failures = 0
        while True:
            with self._lock:
                while not self._has_work() and not self._stopping and not self._pool_stale():
                    self._lock.wait(timeout=0.5)
                if self._stopping and self._drained():
                    return
            try:
                ran = self.step()
                failures = 0
            except Exception as e:  # never leave clients hanging: fail what is in flight, keep serving
                failures += 1
                log.exception("%s step failed (%d in a row)", type(self).__name__, failures)
                why = f"internal error: {type(e).__name__}: {e}"
                self._fail_all(why)
                if failures >= FAILURES_BEFORE_FAILING_THE_QUEUE:
                    self._fail_waiting(why)
                continue
            if ran is False:
                with self._lock:  # everything waits for an adapter being read: sleep until the pool says
                    self._lock.wait(timeout=0.05)
