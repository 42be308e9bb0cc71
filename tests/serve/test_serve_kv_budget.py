"""The key/value cache budget (``max_kv_bytes``, ``graft serve --kv-cache-memory``): the bytes per token come
from the config, admission keeps the batch within the budget, and rows that would outgrow it are preempted
and recomputed (vLLM's recompute preemption) with outputs unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from serving_models import add_random_adapter, tiny_lm

import grafting as gf
from grafting.errors import GraftingError
from grafting.serve import Engine, SamplingParams
from grafting.serve.kv import kv_bytes_per_token, room

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14], [3], [5, 6, 7], [40, 41, 42]]
ADAPTERS = ["a", "b", None, "a", "b", None]


def served(arch: str):
    model = gf.AdaptedModel(tiny_lm(arch))
    add_random_adapter(model, "a", arch, r=4, seed=1)
    add_random_adapter(model, "b", arch, r=8, seed=2)
    return model


@pytest.mark.parametrize("arch,expected", [("gpt2", 2 * 2 * 4 * 8 * 4), ("llama", 2 * 2 * 2 * 8 * 4)])
def test_bytes_per_token_from_the_config_match_the_cache(arch, expected):
    # 2 layers; GPT-2: 4 heads of 8; Llama: grouped-query attention, 2 key/value heads of 8; fp32
    engine = Engine(served(arch), eos_token_ids=[])
    assert engine.kv_bytes_per_token == expected
    for p, a in zip(PROMPTS[:3], ADAPTERS):
        engine.submit(p, SamplingParams(max_tokens=3, temperature=0), a)
    engine.step()
    assert engine.cache.nbytes() == len(engine.running) * engine.cache.capacity * expected


def run_checked(engine, params, budget=None):
    """Submit every prompt, step until done; the cache never holds more than ``budget`` after a step."""
    handles = [engine.submit(p, params, a) for p, a in zip(PROMPTS, ADAPTERS)]
    most = 0
    while any(h.request.finish_reason is None for h in handles):
        engine.step()
        most = max(most, len(engine.running))
        if budget is not None:
            assert engine.cache.nbytes() <= budget
    return [h.result() for h in handles], most


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                                    SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_preempted_rows_are_recomputed_and_answer_the_same(params):
    model = served("llama")
    free, most_free = run_checked(Engine(model, eos_token_ids=[]), params)
    per_token = 2 * 2 * 2 * 8 * 4
    # four short prompts fit at admission (4 rows x room(9) columns); growing past the first buffers does not
    budget = 4 * room(9) * per_token
    tight = Engine(model, eos_token_ids=[], max_kv_bytes=budget)
    out, most = run_checked(tight, params, budget)
    assert tight.stats["preemptions"] > 0
    assert most < most_free == len(PROMPTS)
    assert [c.token_ids for c in out] == [c.token_ids for c in free]
    assert [c.finish_reason for c in out] == ["length"] * len(PROMPTS)
    # usage and metrics count each prompt once, however often it was recomputed
    assert [c.prompt_tokens for c in out] == [len(p) for p in PROMPTS]
    assert tight.stats["prompt_tokens"] == sum(len(p) for p in PROMPTS)
    assert tight.cache.nbytes() == 0 and not tight.running and not tight.waiting


def test_a_request_that_cannot_fit_alone_is_refused_at_submit():
    per_token = 2 * 2 * 2 * 8 * 4
    engine = Engine(served("llama"), eos_token_ids=[], max_kv_bytes=room(20) * per_token)
    engine.submit([1, 2, 3], SamplingParams(max_tokens=17))  # 20 tokens: fits
    with pytest.raises(GraftingError, match=r"max_tokens: .* bytes of key/value cache, more than .* budget"):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=18))


def test_a_budget_needs_a_config_that_says_the_cache_shape():
    model = served("llama")
    model.base_model.config = SimpleNamespace(max_position_embeddings=96, vocab_size=260)  # no layers or heads
    assert kv_bytes_per_token(model.base_model.config, torch.float32) is None
    with pytest.raises(GraftingError, match="max_kv_bytes: .* cannot be budgeted"):
        Engine(model, max_kv_bytes=10 ** 6)
