"""Synthetic serving workloads as S-LoRA evaluates them (Sheng et al., 2023, arXiv:2311.03285, section 7.1).

Request i arrives after a Gamma-distributed gap (mean ``1 / rate``, coefficient of variation ``cv``: 1 is a
Poisson process, larger is burstier) and asks for adapter ``floor(N * X)`` with ``X ~ Power(alpha)`` (density
``alpha * x**(alpha - 1)`` on [0, 1]: ``alpha`` = 1 is uniform, small ``alpha`` piles the traffic on a few
adapters); prompt and output lengths are uniform in the given ranges. Ranks are drawn per adapter from
``ranks``. A trace is plain data, so every system in a comparison replays the same one. Gaps, adapter draws and
lengths come from separate random streams of one seed, so traces with the same seed and other parameters
differ only where those parameters act: the same seed with N = 8 and N = 512 gives the same arrivals, prompts
and outputs, and only which adapter each request asks for changes (compare adapter counts on that, not on
traces that also differ in length: two seeds' prompt tokens differed by 14%).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds after the trace starts
    adapter: int  # adapter index in [0, n_adapters)
    prompt_len: int
    output_len: int


def adapter_ranks(n_adapters: int, ranks=(8, 16, 32, 64), seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(r) for r in rng.choice(ranks, size=n_adapters)]


def make_trace(n_requests: int, n_adapters: int, rate: float, alpha: float = 1.0, cv: float = 1.0,
               prompt_len=(8, 64), output_len=(8, 64), seed: int = 0) -> list[TraceRequest]:
    """``n_requests`` requests at ``rate`` per second on average (see the module docstring)."""
    if n_requests < 1 or n_adapters < 1 or rate <= 0 or alpha <= 0 or cv <= 0:
        raise ValueError("n_requests, n_adapters, rate, alpha and cv must all be positive")
    timing, choice, lengths = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    shape = 1.0 / cv ** 2  # Gamma(k, theta): mean k theta, cv 1 / sqrt(k)
    gaps = timing.gamma(shape, 1.0 / (rate * shape), size=n_requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    adapters = np.minimum(np.floor(n_adapters * choice.power(alpha, size=n_requests)), n_adapters - 1)
    prompts = lengths.integers(prompt_len[0], prompt_len[1] + 1, size=n_requests)
    outputs = lengths.integers(output_len[0], output_len[1] + 1, size=n_requests)
    return [TraceRequest(float(a), int(d), int(p), int(o)) for a, d, p, o in zip(arrivals, adapters, prompts, outputs)]


def summarize(latencies, ttfts, tokens: int, makespan: float, slo_ttft: float) -> dict:
    """Throughput (tokens/s), latency and time-to-first-token percentiles, and SLO attainment (the share of
    requests whose first token came within ``slo_ttft`` seconds, S-LoRA's measure). ``ttfts`` has one entry per
    request, None for one that never produced a token: it misses the SLO and has no time to first token.
    Percentiles of nothing (every request failed) are NaN rather than an error."""
    lat = np.asarray(latencies, dtype=float)
    ttft = np.asarray([t for t in ttfts if t is not None], dtype=float)

    def pct(values, q):
        return float(np.percentile(values, q)) if len(values) else float("nan")

    return {"throughput": tokens / makespan if makespan > 0 else 0.0,
            "latency_p50": pct(lat, 50), "latency_p99": pct(lat, 99),
            "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90),
            "slo_attainment": float(np.sum(ttft <= slo_ttft)) / len(ttfts) if len(ttfts) else 0.0,
            "requests": int(len(lat)), "tokens": int(tokens)}
