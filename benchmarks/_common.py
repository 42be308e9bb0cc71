"""Timing and table helpers shared by the benchmarks."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch


def interleaved(cases: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every case, ``rounds`` times each after ``warmup`` untimed rounds.

    A case is ``fn`` or ``(setup, fn)``; only ``fn`` is timed. Cases run in turn within each round, and the order
    rotates between rounds, because on a shared CPU the machine's speed drifts by tens of percent over minutes:
    measuring case A for a minute and then case B would put that drift into the A/B ratio.
    """
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            case = cases[name]
            setup, fn = case if isinstance(case, tuple) else (None, case)
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def ratio(times: dict, num: str, den: str) -> float:
    """Median over rounds of the per-round ratio: cases of one round ran seconds apart, so pairing them cancels
    most of the machine's drift (the ratio of medians does not)."""
    return median([a / b for a, b in zip(times[num], times[den])])


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def x(r: float) -> str:
    return f"{r:.3f}x"


def rounded(obj, digits: int = 4):
    """``obj`` with every float rounded, for a compact JSON line."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def load_average() -> str:
    """1-minute load average: above the core count, other processes share the CPU and times are inflated."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def header(title: str, extra: str = "") -> None:
    print(f"# {title}")
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  cpus {os.cpu_count()}  load {load_average()}  "
          f"python {platform.python_version()}  {platform.machine()}" + (f"  {extra}" if extra else ""))


def table(title: str, rows: list, columns=("measurement", "grafting", "peft", "goal / note")) -> None:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(columns[i]), *(len(r[i]) for r in rows)) for i in range(len(columns))]
    line = "  ".join("-" * w for w in widths)
    print(f"\n## {title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    print(line)
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 or i == len(r) - 1 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())
