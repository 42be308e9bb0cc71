"""Compiled kernels, built on first use with the machine's C compiler; every caller keeps a pure-PyTorch path.

``lora_rows.c`` (see there) reads each mixed-batch row's LoRA factors in place, in fp32, bf16 or int8. It is built
with ``cc -O3 -march=native -fopenmp -shared`` into a per-user cache (``$GRAFTING_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/grafting/kernels`` or ``~/.cache/grafting/kernels``), keyed by the source, the flags and the
CPU (``-march=native`` code must not run on another CPU), and written atomically (a temporary file renamed
into place). Without a compiler, off Linux, or when the build fails, :func:`lora_rows` returns None and callers
use torch ops; ``GRAFTING_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

_lock = threading.Lock()
_built: dict = {}
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11"]


class LoraRows:
    """``y[row] += (x[row] @ A_b[slot]) @ B_b[slot]`` for every entry (row, b, slot), in place on ``y``: one
    call serves a layer's rows over all its rank buckets."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        p, i = ctypes.c_void_p, ctypes.c_int64
        self._fns = {}
        for dtype, name in ((torch.float32, "lora_rows_f32"), (torch.bfloat16, "lora_rows_bf16"),
                            (torch.int8, "lora_rows_i8")):
            fn = getattr(lib, name)
            fn.argtypes = [p, p, p, p, i, i, i, i, ctypes.c_int]
            fn.restype = None
            self._fns[dtype] = fn

    def supports(self, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether it runs activations ``x`` into ``y`` with factors of ``dtype`` on ``device``."""
        return (x.dtype == y.dtype == torch.float32 and dtype in self._fns and x.device.type == "cpu"
                and device.type == "cpu" and y.is_contiguous())

    def __call__(self, x: torch.Tensor, y: torch.Tensor, table: torch.Tensor, entries: torch.Tensor,
                 dtype: torch.dtype) -> None:
        """``x`` (n, tokens, in) fp32 and ``y`` (n, tokens, out) fp32, contiguous. ``table`` (buckets, 5) int64:
        each bucket's A (slots, in, r) and B (slots, r, out) addresses (contiguous tensors of ``dtype``, which
        the caller keeps alive), r, and for int8 the addresses of A's and B's per-rank fp32 scales (slots, r)
        (0 otherwise). ``entries`` (m, 3) int64: row, bucket position in ``table``, slot; rows
        are taken in this order by the threads in turn (heaviest first balances them)."""
        n, tokens, fan_in = x.shape
        self._fns[dtype](x.data_ptr(), y.data_ptr(), table.data_ptr(), entries.data_ptr(), len(entries), tokens,
                         fan_in, y.shape[-1], torch.get_num_threads())

    @staticmethod
    def table(buckets: list) -> torch.Tensor:
        """The ``table`` for ``buckets``: each ``(A, B)`` or ``(A, B, a_scale, b_scale)`` (A (slots, in, r),
        B (slots, r, out), the int8 scales (slots, r) fp32 or None; contiguous), or None for a bucket no row
        reads."""
        rows = []
        for b in buckets:
            if b is None:
                rows.append((0, 0, 0, 0, 0))
                continue
            A, B, *scales = b
            rows.append((A.data_ptr(), B.data_ptr(), A.shape[-1],
                         *(0 if t is None else t.data_ptr() for t in (scales or (None, None)))))
        return torch.tensor(rows, dtype=torch.int64).view(-1, 5)


def lora_rows() -> LoraRows | None:
    """The mixed-batch LoRA kernel, built if needed; None where it cannot be built here or while
    ``GRAFTING_KERNELS=0`` (read on every call, so it can be switched per process section)."""
    if os.environ.get("GRAFTING_KERNELS", "1") == "0":
        return None
    with _lock:
        if "lora_rows" not in _built:
            _built["lora_rows"] = _load("lora_rows", LoraRows)
        return _built["lora_rows"]


def _load(name: str, wrapper):
    if os.environ.get("GRAFTING_KERNELS", "1") == "0" or platform.system() != "Linux":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = Path(__file__).with_name(f"{name}.c")
    for flags in (FLAGS + ["-fopenmp"], FLAGS):  # single-threaded where the compiler has no OpenMP
        key = hashlib.sha256(source.read_bytes() + " ".join([compiler, *flags]).encode() + _cpu().encode())
        path = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                    built = Path(tmp) / path.name
                    subprocess.run([compiler, *flags, str(source), "-o", str(built)], check=True,
                                   capture_output=True, timeout=120)
                    os.replace(built, path)
            return wrapper(ctypes.CDLL(str(path)), path)
        except (OSError, subprocess.SubprocessError, AttributeError):
            continue
    return None


def _cache_dir() -> Path:
    if os.environ.get("GRAFTING_KERNEL_CACHE"):
        return Path(os.environ["GRAFTING_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "grafting" / "kernels"


def _cpu() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return "\n".join(dict.fromkeys(line for line in info.splitlines()
                                       if line.startswith(("model name", "flags"))))
    except OSError:
        return platform.processor() or platform.machine()
