"""Log probabilities (grafting.serve.logprobs): the engine reports the model's own distribution at each
generated token (vLLM's raw logprobs), checked against a plain forward over prompt + output; and the OpenAI
shapes built from them."""

from __future__ import annotations

import math

import pytest
import torch
from serving_models import add_random_adapter, byte_tokenizer, tiny_lm

import grafting as gf
from grafting.serve import Engine, SamplingParams
from grafting.serve.logprobs import FLOOR, chat_logprobs, completion_logprobs, token_entry


@pytest.fixture(scope="module")
def served():
    model = gf.AdaptedModel(tiny_lm("llama"))
    add_random_adapter(model, "a", "llama", r=8, seed=1)
    return model


def reference(model, adapter, prompt, output):
    """log_softmax of the logits predicting each output token, from one forward over prompt + output."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        if adapter is None:
            with model.disabled():
                logits = model.base_model(input_ids=ids).logits[0]
        else:
            model.set_active(adapter)
            logits = model.base_model(input_ids=ids).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3),
    # sampled, with rules that change the sampling distribution: the reported one stays the model's own
    SamplingParams(max_tokens=8, temperature=1.3, seed=4, top_k=20, repetition_penalty=1.5,
                   logit_bias={65: 5.0}, ignore_eos=True, logprobs=3),
], ids=["greedy", "sampled"])
def test_entries_are_the_models_own_log_probabilities(served, params):
    engine = Engine(served, eos_token_ids=[])
    prompts, adapters = [[1, 2, 3, 4, 5], [7, 8]], ["a", None]
    out = engine.generate(prompts, params, adapters)  # in one mixed batch
    for prompt, adapter, c in zip(prompts, adapters, out):
        assert [e[0] for e in c.logprobs] == c.token_ids
        expected = reference(served, adapter, prompt, c.token_ids)
        for (token, logprob, top), row in zip(c.logprobs, expected):
            assert logprob == pytest.approx(float(row[token]), abs=1e-4)
            values, ids = torch.topk(row, 3)
            assert [t for t, _ in top] == ids.tolist()
            assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-4)
            if params.greedy:
                assert top[0][0] == token


def test_prompt_entries_score_each_prompt_token_from_the_one_before(served):
    engine = Engine(served, eos_token_ids=[])
    scored = SamplingParams(max_tokens=0, prompt_logprobs=2)
    other = SamplingParams(max_tokens=5, temperature=0)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    handles = [engine.submit(prompts[0], scored, "a"), engine.submit(prompts[1], other, None),
               engine.submit(prompts[2], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0), "a")]
    while any(h.request.finish_reason is None for h in handles):
        engine.step()
    first, plain, both = [h.result() for h in handles]
    assert first.token_ids == [] and first.finish_reason == "length" and first.completion_tokens == 0
    assert first.prompt_logprobs[0] == (1, None, None)
    expected = reference(served, "a", prompts[0][:1], prompts[0][1:])  # position j - 1 scores token j
    for (token, logprob, top), row in zip(first.prompt_logprobs[1:], expected):
        assert logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert [t for t, _ in top] == torch.topk(row, 2).indices.tolist()
    assert len(both.prompt_logprobs) == 3 and all(e[2] == [] for e in both.prompt_logprobs[1:])
    assert len(both.token_ids) == 2 and plain.prompt_logprobs is None
    # scoring in the batch left the other row's output as it is alone
    assert plain.token_ids == Engine(served, eos_token_ids=[]).generate([prompts[1]], other)[0].token_ids


def test_no_logprobs_unless_asked(served):
    c = Engine(served).generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))[0]
    assert c.logprobs is None


def test_a_token_the_model_cannot_produce_reports_the_floor():
    logits = torch.tensor([0.0, 1.0, -math.inf])
    token, logprob, top = token_entry(logits, 2, 3)
    assert logprob == FLOOR and top[-1] == (2, FLOOR)
    assert top[0] == (1, pytest.approx(math.log(math.e / (1 + math.e))))


def test_openai_shapes():
    tokenizer = byte_tokenizer()
    entries = [(ord("h"), -0.5, [(ord("h"), -0.5), (ord("y"), -1.5)]), (ord("i"), -2.0, [(ord("o"), -0.1)])]
    out = completion_logprobs(tokenizer, entries, offset=5)
    assert out == {"tokens": ["h", "i"], "token_logprobs": [-0.5, -2.0], "text_offset": [5, 6],
                   # the k most likely and the sampled token (OpenAI: up to logprobs + 1)
                   "top_logprobs": [{"h": -0.5, "y": -1.5}, {"o": -0.1, "i": -2.0}]}
    chat = chat_logprobs(tokenizer, entries)
    assert chat["refusal"] is None
    assert chat["content"][1] == {"token": "i", "logprob": -2.0, "bytes": [105],
                                  "top_logprobs": [{"token": "o", "logprob": -0.1, "bytes": [111]}]}
