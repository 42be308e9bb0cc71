"""The continuous-batching engine: outputs equal transformers' own generate per adapter, alone or mixed, with
rows joining and leaving mid-flight; sampling, stopping, cancelling, timeouts and queue limits."""

from __future__ import annotations

import platform
import threading

import pytest
import torch
from serving_models import add_random_adapter, byte_tokenizer, tiny_lm

import grafting as gf
from grafting.errors import GraftingError
from grafting.serve import AdapterError, Engine, QueueFull, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16], [3], [5, 6, 7], [40, 41, 42]]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def served(arch: str, dora: bool = True):
    model = gf.AdaptedModel(tiny_lm(arch))
    add_random_adapter(model, "a", arch, r=4, seed=1)
    add_random_adapter(model, "b", arch, r=16, seed=2)
    add_random_adapter(model, "c", arch, r=8, seed=3, use_dora=dora)
    return model


def hf_greedy(model, prompt, adapter, n):
    """transformers' generate with the adapter active (or the base alone): the reference."""
    base = model.base_model
    ids = torch.tensor([prompt])
    with torch.no_grad():
        if adapter is None:
            with model.disabled():
                out = base.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        else:
            model.set_active(adapter)
            out = base.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_mixed_batch_matches_generate_per_adapter(arch):
    model = served(arch)
    adapters = ["a", "b", None, "c", "a", "b"]
    mixed = Engine(model).generate(PROMPTS, GREEDY, adapters)
    for prompt, adapter, out in zip(PROMPTS, adapters, mixed):
        assert out.finish_reason == "length" and len(out.token_ids) == GREEDY.max_tokens
        assert out.token_ids == hf_greedy(model, prompt, adapter, GREEDY.max_tokens), adapter
    # the adapters really differ: otherwise the test above could not fail
    assert len({tuple(o.token_ids) for o in Engine(model).generate([PROMPTS[0]] * 3, GREEDY, ["a", "b", "c"])}) == 3


def test_rows_join_and_leave_mid_flight():
    model = served("llama")
    engine = Engine(model)
    adapters = ["a", "b", "c", None, "a", "c"]
    params = [SamplingParams(max_tokens=4 + 2 * i, temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]
    alone = [Engine(model).generate([p], params[i], [adapters[i]])[0].token_ids for i, p in enumerate(PROMPTS)]
    handles = [engine.submit(PROMPTS[0], params[0], adapters[0])]
    sizes = []
    for step in range(60):
        if step in (2, 3, 5, 7, 8):  # arrivals while others decode, with prompts longer and shorter than theirs
            i = len(handles)
            handles.append(engine.submit(PROMPTS[i], params[i], adapters[i]))
        engine.step()
        sizes.append(len(engine.running))
        if step > 8 and not engine.running:
            break
    assert max(sizes) >= 3 and engine.cache.rows == 0 and not engine.waiting
    assert [h.result(timeout=1).token_ids for h in handles] == alone


def test_padding_is_cut_when_long_rows_leave():
    model = served("gpt2")
    engine = Engine(model)
    long = engine.submit(list(range(1, 40)), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), "a")
    short = engine.submit([5], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), "b")
    engine.step()  # prefill and one decode step: both rows in, the short one left-padded to the long one
    assert engine.cache.columns >= 40 and len(engine.running) == 2
    engine.step()  # the long row finishes: its columns go
    assert long.request.finish_reason == "length" and len(engine.running) == 1
    assert engine.cache.columns == 1 + len(short.request.output_ids) - 1  # the short row's prompt + fed tokens
    while engine.running:
        engine.step()
    assert short.result().token_ids == hf_greedy(model, [5], "b", 8)


def test_seeded_sampling_is_independent_of_the_batch():
    model = served("gpt2")
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = Engine(model).generate([PROMPTS[0]], params, ["a"])[0].token_ids
    busy = Engine(model).generate(PROMPTS, params, ["a", "b", "c", None, "a", "b"])[0].token_ids
    other_seed = Engine(model).generate([PROMPTS[0]], SamplingParams(max_tokens=12, seed=8, ignore_eos=True), ["a"])
    assert alone == busy
    assert other_seed[0].token_ids != alone


def test_tiny_top_p_is_greedy_and_temperature_spreads():
    model = served("gpt2")
    greedy = Engine(model).generate([PROMPTS[1]], GREEDY, ["b"])[0].token_ids
    nucleus = Engine(model).generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6,
                                                                  seed=3, ignore_eos=True), ["b"])[0].token_ids
    assert nucleus == greedy
    hot = Engine(model).generate([PROMPTS[1]] * 4, SamplingParams(max_tokens=10, temperature=5.0, ignore_eos=True),
                                 ["b"] * 4)
    assert len({tuple(o.token_ids) for o in hot}) > 1  # unseeded requests draw differently


def test_eos_stops_and_is_not_returned():
    model = served("gpt2")
    greedy = Engine(model).generate([PROMPTS[2]], GREEDY, ["a"])[0].token_ids
    eos = greedy[3]
    out = Engine(model, eos_token_ids=[eos]).generate([PROMPTS[2]], SamplingParams(max_tokens=10, temperature=0),
                                                      ["a"])[0]
    assert out.finish_reason == "stop" and out.token_ids == greedy[: greedy.index(eos)]


def test_stop_strings_and_streamed_text(tokenizer):
    model = served("gpt2")
    engine = Engine(model, tokenizer=tokenizer)
    full = engine.generate(["hello"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), ["a"])[0]
    assert full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    visible = full.text
    stop = visible[5:7] if len(visible) >= 7 else visible[-2:]
    cut = visible.index(stop)
    handle = engine.submit("hello", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]), "a")
    while handle.request.finish_reason is None:
        engine.step()
    events = list(handle)
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == visible[:cut]


def test_stop_strings_with_a_seed_cut_the_same_sampled_output_every_time(tokenizer):
    model = served("gpt2")
    engine = Engine(model, tokenizer=tokenizer)
    seeded = dict(max_tokens=24, temperature=1.0, seed=11, ignore_eos=True)
    full = engine.generate(["hello"], SamplingParams(**seeded), ["a"])[0]
    greedy = engine.generate(["hello"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), ["a"])[0]
    assert full.token_ids != greedy.token_ids  # really sampled
    # the stop string: the first printable ASCII byte from the fifth token on that the text has not shown yet
    k = next(i for i, t in enumerate(full.token_ids) if i >= 4 and 33 <= t <= 126 and t not in full.token_ids[:i])
    stop = chr(full.token_ids[k])
    params = SamplingParams(**seeded, stop=[stop])
    alone = engine.generate(["hello"], params, ["a"])[0]
    busy = Engine(model, tokenizer=tokenizer).generate(["hello", "other", "hello"], params, ["a", "b", None])[0]
    for out in (alone, busy):
        assert out.finish_reason == "stop"
        assert out.token_ids == full.token_ids[:k + 1]  # the seeded draws up to the stop string's token
        assert stop not in out.text and out.text == full.text[:full.text.index(stop)]
    assert alone.text == busy.text


def test_cancel_and_timeout_free_the_row():
    model = served("gpt2")
    engine = Engine(model)
    h = engine.submit(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), "a")
    other = engine.submit(PROMPTS[1], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), "b")
    engine.step()
    engine.step()
    h.cancel()
    engine.step()
    assert h.result().finish_reason == "cancelled" and len(engine.running) == 1
    while engine.running:
        engine.step()
    assert other.result().token_ids == hf_greedy(model, PROMPTS[1], "b", 6)
    late = engine.submit(PROMPTS[0], GREEDY, "a", timeout=0.0)
    engine.step()
    out = late.result()
    assert out.finish_reason == "timeout" and "timed out" in out.error


def test_bad_requests_get_clear_errors():
    model = served("gpt2")
    engine = Engine(model, max_queue=2)
    with pytest.raises(GraftingError, match="max_tokens"):
        engine.submit([1], SamplingParams(max_tokens=-1))
    with pytest.raises(GraftingError, match="top_p"):
        engine.submit([1], SamplingParams(top_p=0))
    with pytest.raises(GraftingError, match="context is 96 tokens"):
        engine.submit(list(range(100)), GREEDY)
    with pytest.raises(AdapterError, match="no adapter named 'zzz'"):
        engine.submit([1], GREEDY, "zzz")
    with pytest.raises(GraftingError, match="tokenizer"):
        engine.submit("text without a tokenizer", GREEDY)
    vocab = model.base_model.get_input_embeddings().num_embeddings
    for bad in (vocab, -5):
        with pytest.raises(GraftingError, match=f"token id {bad} at position 1 is outside the vocabulary"):
            engine.submit([1, bad], GREEDY)
    engine.submit([1], GREEDY)
    engine.submit([2], GREEDY)
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.submit([3], GREEDY)


def test_context_limit_ends_with_length():
    model = served("gpt2")
    out = Engine(model).generate([list(range(1, 90))], SamplingParams(max_tokens=50, temperature=0,
                                                                      ignore_eos=True), ["a"])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 96 - 89


def test_background_thread_serves_concurrent_clients_and_drains_on_stop():
    model = served("llama")
    expected = {i: hf_greedy(model, p, ad, 8) for i, (p, ad) in enumerate(zip(PROMPTS, ["a", "b", "c", None, "a", "c"]))}
    engine = Engine(model, max_batch=4).start()
    results = {}

    def client(i):
        results[i] = engine.submit(PROMPTS[i], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                   ["a", "b", "c", None, "a", "c"][i]).result(timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    in_flight = engine.submit(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), "a")
    engine.stop(drain=True, timeout=60)
    assert {i: r.token_ids for i, r in results.items()} == expected
    assert in_flight.result(timeout=1).token_ids == expected[0]
    with pytest.raises(GraftingError, match="shutting down"):
        engine.submit([1], GREEDY)


def test_start_hides_what_is_alive_from_the_collector_until_stop():
    import gc
    model = served("gpt2")
    engine = Engine(model).start()
    try:
        assert gc.get_freeze_count() > 1000  # the model, torch, transformers: not walked by each collection
        assert engine.submit(PROMPTS[0], GREEDY, "a").result(timeout=60).token_ids == \
            hf_greedy(model, PROMPTS[0], "a", GREEDY.max_tokens)
    finally:
        engine.stop()
    assert gc.get_freeze_count() == 0  # collectable again once serving stops
    engine = Engine(model).start(freeze_gc=False)
    assert gc.get_freeze_count() == 0
    engine.stop()
    first, second = Engine(model).start(), Engine(model).start()  # e.g. a generator and an embedder
    first.stop()
    assert gc.get_freeze_count() > 1000  # the second one still serves: still frozen
    second.stop()
    assert gc.get_freeze_count() == 0


def test_modules_to_save_head_is_served_per_row():
    model = gf.AdaptedModel(tiny_lm("llama", tie=False))
    add_random_adapter(model, "plain", "llama", r=4, seed=1)
    add_random_adapter(model, "head", "llama", r=4, seed=2, modules_to_save=["lm_head"])
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "copies.head" in pname:
                p.add_(torch.randn_like(p))
    outs = Engine(model).generate([PROMPTS[0]] * 3, GREEDY, ["plain", "head", None])
    for out, adapter in zip(outs, ["plain", "head", None]):
        assert out.token_ids == hf_greedy(model, PROMPTS[0], adapter, GREEDY.max_tokens)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving():
    model = served("gpt2")
    engine = Engine(model).start()
    real, calls = engine._forward, {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real(*args)

    engine._forward = flaky
    try:
        first = engine.submit(PROMPTS[0], GREEDY, "a").result(timeout=60)
        assert first.finish_reason == "error" and "injected fault" in first.error and first.status == 500
        second = engine.submit(PROMPTS[0], GREEDY, "a").result(timeout=60)
        assert second.token_ids == hf_greedy(model, PROMPTS[0], "a", GREEDY.max_tokens)
    finally:
        engine.stop()


def test_a_failing_prefill_fails_only_the_requests_it_admitted():
    model = served("gpt2")
    engine = Engine(model)
    running = engine.submit(PROMPTS[0], GREEDY, "a")
    engine.step()
    real = engine._prefill

    def failing(new):
        raise RuntimeError("injected prefill fault")

    engine._prefill = failing
    doomed = engine.submit(PROMPTS[1], GREEDY, "b")
    engine.step()
    engine._prefill = real
    out = doomed.result(timeout=1)
    assert out.finish_reason == "error" and "injected prefill fault" in out.error
    while engine.running:
        engine.step()
    assert running.result(timeout=1).token_ids == hf_greedy(model, PROMPTS[0], "a", GREEDY.max_tokens)


def test_cancelled_requests_behind_a_full_batch_give_their_queue_places_back():
    model = served("gpt2")
    engine = Engine(model, max_batch=1, max_queue=2)
    engine.submit(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), "a")
    engine.step()  # the one row of the batch is taken
    gone = [engine.submit(PROMPTS[1], GREEDY, "b"), engine.submit(PROMPTS[2], GREEDY, None, timeout=0.0)]
    with pytest.raises(QueueFull):
        engine.submit(PROMPTS[3], GREEDY)
    gone[0].cancel()
    engine.step()
    assert [h.result(timeout=1).finish_reason for h in gone] == ["cancelled", "timeout"]
    assert len(engine.waiting) == 0 and len(engine.running) == 1
    engine.submit(PROMPTS[3], GREEDY)
    engine.submit(PROMPTS[4], GREEDY)


FAULTS = """
import resource, sys, torch
if sys.argv[1] == "retain":
    from grafting.serve.loop import retain_freed_memory
    assert retain_freed_memory()
def step():  # a decode step's shape: blocks of a few sizes allocated and freed in turn
    a = torch.empty(6 << 20).fill_(1)
    b = torch.empty(2 << 20).fill_(1)
    del a
    c = torch.empty(7 << 20).fill_(1)
    del b, c
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_retain_freed_memory_stops_a_step_loop_from_faulting_its_memory_back_in():
    import subprocess
    import sys
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                       check=True, timeout=120).stdout.split()[-1]) for mode in ("default", "retain")}
    assert faults["retain"] * 10 < faults["default"], faults
