"""The server's Prometheus metrics: each figure equals what the engine and pool did (loads, evictions, tokens,
one latency and one time-to-first-token observation per request), and tokens/s is a recent rate that falls to
zero when the server idles, not a lifetime average."""

from __future__ import annotations

import re
import time

import pytest
from pool_fixtures import GREEDY, fresh_pool, make_adapter_dirs

from grafting.serve import Engine
from grafting.serve.loop import RecentRate

pytest.importorskip("prometheus_client")
from grafting.serve.metrics import ServerMetrics  # noqa: E402


def value(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_recent_rate_counts_the_last_window_only():
    rate = RecentRate(window=10)
    t0 = rate._started
    assert rate.rate(0, now=t0 + 1) == 0
    for i in range(1, 6):  # 100 tokens a second for 5 s
        rate.add(100 * i, now=t0 + i)
    assert rate.rate(500, now=t0 + 5) == pytest.approx(100)  # shorter than the window: since the start
    for i in range(6, 21):  # then 10 a second
        rate.add(500 + 10 * (i - 5), now=t0 + i)
    assert rate.rate(650, now=t0 + 20) == pytest.approx(10)  # the burst is out of the window
    assert rate.rate(650, now=t0 + 25) == pytest.approx(5)  # half the window idle
    assert rate.rate(650, now=t0 + 3600) == 0  # idle for an hour: nothing, where a lifetime mean says 0.18
    assert len(rate._samples) <= 12  # one sample per step, pruned to the window


def test_metrics_equal_what_the_engine_and_pool_did(tmp_path):
    dirs, expected = make_adapter_dirs(tmp_path)
    pool = fresh_pool(max_loras=1, max_spares=0, max_cpu_loras=0)
    for name in ("ad0", "ad1"):
        pool.register(name, dirs[name])
    engine = Engine(pool.model, pool=pool)
    engine.token_rate = RecentRate(window=0.5)  # a short window, so the idle test below waits little
    metrics = ServerMetrics(engine)
    engine.on_finish = metrics.observe
    before = metrics.render().decode()
    assert value(before, "grafting_adapter_evictions_total") == 0
    assert value(before, "grafting_adapters_registered") == 2
    engine.start()
    try:
        outs = []
        for name in ("ad0", "ad1", "ad0"):  # a pool of one: the second and third evict
            outs += engine.generate([[1, 2, 3], [4, 5]], GREEDY, [name, name])
        busy = metrics.render().decode()
        assert [o.token_ids for o in outs[::2]] == [expected[n] for n in ("ad0", "ad1", "ad0")]
        tokens = sum(len(o.token_ids) for o in outs)
        assert value(busy, "grafting_generated_tokens_total") == tokens
        assert value(busy, "grafting_adapter_loads_total") == pool.stats["loads"] == 3
        assert value(busy, "grafting_adapter_evictions_total") == pool.stats["evictions"] == 2
        assert value(busy, "grafting_adapters_resident") == 1
        for hist in ("grafting_request_latency_seconds", "grafting_time_to_first_token_seconds"):
            assert value(busy, f"{hist}_count") == 6
            assert value(busy, f'{hist}_bucket{{le="\\+Inf"}}') == 6
        assert value(busy, "grafting_time_to_first_token_seconds_sum") <= \
            value(busy, "grafting_request_latency_seconds_sum")
        assert value(busy, "grafting_tokens_per_second") > 0
        time.sleep(1.0)  # twice the window, idle
        assert value(metrics.render().decode(), "grafting_tokens_per_second") == 0
        assert value(metrics.render().decode(), "grafting_generated_tokens_total") == tokens
    finally:
        engine.stop()
