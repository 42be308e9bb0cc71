"""S-LoRA's workload generator follows its stated distributions."""

from __future__ import annotations

import numpy as np
import pytest

from grafting.serve.workload import adapter_ranks, make_trace, summarize


@pytest.mark.parametrize("cv", [1.0, 4.0])
def test_gaps_have_the_asked_mean_and_burstiness(cv):
    trace = make_trace(20000, 8, rate=5.0, cv=cv, seed=1)
    gaps = np.diff([t.arrival for t in trace])
    assert trace[0].arrival == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.08)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.12)


def test_power_law_adapter_popularity():
    uniform = np.array([t.adapter for t in make_trace(20000, 10, rate=1, alpha=1.0, seed=2)])
    skewed = np.array([t.adapter for t in make_trace(20000, 10, rate=1, alpha=0.1, seed=2)])
    assert np.bincount(uniform, minlength=10) / 20000 == pytest.approx([0.1] * 10, abs=0.015)
    assert np.mean(skewed == 0) == pytest.approx(0.1 ** 0.1, abs=0.015)  # P(X < 1/N) = (1/N)^alpha
    assert skewed.max() <= 9


def test_lengths_ranks_and_determinism():
    a = make_trace(500, 64, rate=2, prompt_len=(4, 9), output_len=(16, 16), seed=3)
    assert all(4 <= t.prompt_len <= 9 and t.output_len == 16 for t in a)
    assert a == make_trace(500, 64, rate=2, prompt_len=(4, 9), output_len=(16, 16), seed=3)
    assert set(adapter_ranks(200)) == {8, 16, 32, 64}
    with pytest.raises(ValueError):
        make_trace(10, 0, rate=1)


def test_traces_of_one_seed_differ_only_where_their_parameters_act():
    """Same seed, N = 8 and N = 512: the same arrivals and lengths, adapters floor(N X) of the same X; another
    cv changes the gaps only, another alpha the adapters only."""
    base = make_trace(300, 8, rate=4, alpha=1.0, cv=1.0, seed=5)
    many = make_trace(300, 512, rate=4, alpha=1.0, cv=1.0, seed=5)
    bursty = make_trace(300, 8, rate=4, alpha=1.0, cv=4.0, seed=5)
    skewed = make_trace(300, 8, rate=4, alpha=0.1, cv=1.0, seed=5)
    same = lambda a, b, field: [getattr(r, field) for r in a] == [getattr(r, field) for r in b]  # noqa: E731
    for other, differs in ((many, "adapter"), (bursty, "arrival"), (skewed, "adapter")):
        for field in ("arrival", "adapter", "prompt_len", "output_len"):
            assert same(base, other, field) == (field != differs), (field, differs)
    assert all(b.adapter == m.adapter * 8 // 512 for b, m in zip(base, many))  # floor(8 X) from floor(512 X)


def test_summary_figures():
    s = summarize([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 5.0], tokens=100, makespan=10.0, slo_ttft=1.0)
    assert s["throughput"] == 10.0 and s["slo_attainment"] == 0.75 and s["ttft_p50"] == pytest.approx(0.25)


def test_requests_without_a_first_token_miss_the_slo_and_an_all_failed_replay_still_summarizes():
    s = summarize([1.0, 2.0, 3.0, 4.0], [0.1, None, 0.3, None], tokens=10, makespan=5.0, slo_ttft=1.0)
    assert s["slo_attainment"] == 0.5 and s["ttft_p50"] == pytest.approx(0.2) and s["requests"] == 4
    none = summarize([1.0, 2.0], [None, None], tokens=0, makespan=2.0, slo_ttft=1.0)
    assert none["slo_attainment"] == 0.0 and none["throughput"] == 0.0 and np.isnan(none["ttft_p90"])
    empty = summarize([], [], tokens=0, makespan=0.0, slo_ttft=1.0)
    assert empty["requests"] == 0 and np.isnan(empty["latency_p50"])
