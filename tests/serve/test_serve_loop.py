"""The engine's background loop: a step that keeps failing fails the queue instead of leaving its clients
waiting for ever, and a pool closed by a stopped engine serves the next engine (its loader restarts)."""

from __future__ import annotations

import pytest
from pool_fixtures import GREEDY, make_adapter_dirs
from serving_models import tiny_lm

import grafting as gf
from grafting.serve import AdapterPool, Engine, SamplingParams
from grafting.serve.loop import FAILURES_BEFORE_FAILING_THE_QUEUE


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    return make_adapter_dirs(tmp_path_factory.mktemp("adapters"))


def test_a_step_that_keeps_failing_fails_the_waiting_requests_and_the_engine_keeps_serving(adapter_dirs):
    dirs, _ = adapter_dirs
    pool = AdapterPool(gf.AdaptedModel(tiny_lm("gpt2")))
    pool.register("ad0", dirs["ad0"])
    engine = Engine(pool.model, pool=pool)
    broken = []

    def acquire(name):  # the pool breaking in a way the engine does not expect, every time it is asked
        broken.append(name)
        raise RuntimeError("the disk went away")

    pool.acquire = acquire
    engine.start()
    try:
        out = engine.submit([1, 2, 3], GREEDY, "ad0").result(timeout=30)
        assert out.finish_reason == "error" and "RuntimeError: the disk went away" in out.error
        assert len(broken) >= FAILURES_BEFORE_FAILING_THE_QUEUE
        del pool.acquire  # the pool works again: so does the engine
        again = engine.submit([1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), "ad0")
        assert again.result(timeout=30).finish_reason == "length"
    finally:
        engine.stop()


def test_a_pool_closed_by_a_stopped_engine_serves_the_next_one(adapter_dirs):
    dirs, expected = adapter_dirs
    # one adapter resident and one in memory: every other one must be read from disk again
    pool = AdapterPool(gf.AdaptedModel(tiny_lm("gpt2")), max_loras=1, max_cpu_loras=1)
    for name in dirs:
        pool.register(name, dirs[name])
    first = Engine(pool.model, pool=pool)
    first.start()
    assert first.submit([1, 2, 3], GREEDY, "ad0").result(timeout=30).token_ids == expected["ad0"]
    first.stop()  # closes the pool's loader
    second = Engine(pool.model, pool=pool)
    second.start()
    try:
        handles = [second.submit([1, 2, 3], GREEDY, name) for name in ("ad1", "ad2", "ad3")]
        assert [h.result(timeout=30).token_ids for h in handles] == [expected[n] for n in ("ad1", "ad2", "ad3")]
    finally:
        second.stop()


def test_requests_admitted_before_a_failure_in_admission_are_not_lost(adapter_dirs):
    dirs, expected = adapter_dirs
    pool = AdapterPool(gf.AdaptedModel(tiny_lm("gpt2")), max_loras=2)
    for name in ("ad0", "ad1"):
        pool.register(name, dirs[name])
    pool.preload()
    engine = Engine(pool.model, pool=pool)
    real, calls = pool.acquire, []

    def acquire(name):  # the second acquire of the first step fails once, after the first request was taken
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("transient")
        return real(name)

    pool.acquire = acquire
    handles = [engine.submit([1, 2, 3], GREEDY, name) for name in ("ad0", "ad1")]
    with pytest.raises(RuntimeError, match="transient"):
        engine.step()
    assert [r.adapter for r in engine.waiting] == ["ad0", "ad1"]  # back in the queue, in order
    while any(h.request.finish_reason is None for h in handles):
        engine.step()
    assert [h.result().token_ids for h in handles] == [expected["ad0"], expected["ad1"]]
    assert not any(res.pins for res in pool._resident.values())  # every pin released
