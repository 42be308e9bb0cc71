"""The logits rules of OpenAI's and vLLM's sampling parameters, each against its formula on small tensors,
their neutral values against plain sampling, and how the engine ends (and counts) an output."""

from __future__ import annotations

import math

import pytest
import torch
from serving_models import byte_tokenizer, tiny_lm

import grafting as gf
from grafting.errors import GraftingError
from grafting.serve import Engine, SamplingParams
from grafting.serve.sampling import RowState, make_generator, process_logits, sample_token
from grafting.serve.text import Detokenizer

LOGITS = torch.tensor([2.0, -1.0, 0.5, 3.0, -0.25])


def draws(logits, params, n=400, state=None):
    g = make_generator(params)
    return {sample_token(logits, params, RowState(g, *(state or ()))) for _ in range(n)}


def test_logit_bias_is_added_to_the_logits():
    out = process_logits(LOGITS, SamplingParams(logit_bias={1: 5.0, 3: -100, 99: 7.0}))  # 99: no such token
    assert torch.equal(out, LOGITS + torch.tensor([0.0, 5.0, 0.0, -100.0, 0.0]))
    assert sample_token(LOGITS, SamplingParams(temperature=0, logit_bias={4: 4})) == 4  # greedy follows the bias


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    state = RowState(None, prompt_ids=[0], output_ids=[1, 1])
    out = process_logits(LOGITS, SamplingParams(repetition_penalty=2.0), state)
    assert torch.equal(out, torch.tensor([1.0, -2.0, 0.5, 3.0, -0.25]))  # 2 / 2 and -1 * 2; unseen untouched
    out = process_logits(LOGITS, SamplingParams(repetition_penalty=0.5), state)  # < 1 favours repeats
    assert torch.equal(out, torch.tensor([4.0, -0.5, 0.5, 3.0, -0.25]))
    # greedy would pick 3 again; penalised hard, it no longer does
    assert sample_token(LOGITS, SamplingParams(temperature=0, repetition_penalty=10.0), RowState(None, [3])) == 0


def test_frequency_and_presence_penalties_count_the_output_only():
    state = RowState(None, prompt_ids=[1, 1, 1], output_ids=[2, 2, 0])
    out = process_logits(LOGITS, SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), state)
    counts = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0])
    assert torch.allclose(out, LOGITS - counts * 0.5 - (counts > 0).float() * 1.0)
    out = process_logits(LOGITS, SamplingParams(frequency_penalty=-2.0), state)  # negative: encourage repeats
    assert torch.allclose(out, LOGITS + counts * 2.0)


def test_min_tokens_holds_back_eos_and_stop_token_ids_until_reached():
    params = SamplingParams(min_tokens=2, stop_token_ids=[2])
    early = process_logits(LOGITS, params, RowState(None, [], [7], eos_token_ids={3}))
    assert early[2] == early[3] == -math.inf and torch.equal(early[[0, 1, 4]], LOGITS[[0, 1, 4]])
    assert torch.equal(process_logits(LOGITS, params, RowState(None, [], [7, 7], eos_token_ids={3})), LOGITS)
    ignoring = process_logits(LOGITS, SamplingParams(min_tokens=2, stop_token_ids=[2], ignore_eos=True),
                              RowState(None, [], [], eos_token_ids={3}))
    assert ignoring[2] == -math.inf and ignoring[3] == LOGITS[3]  # EOS does not end the output anyway
    assert sample_token(LOGITS, SamplingParams(temperature=0, min_tokens=1), RowState(None, eos_token_ids={3})) == 0


def test_top_k_keeps_the_k_largest_and_ties_with_the_kth():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert draws(logits, SamplingParams(top_k=2, seed=0)) == {0, 1}
    assert draws(torch.tensor([1.0, 1.0, 0.0]), SamplingParams(top_k=1, seed=0)) == {0, 1}
    for off in (-1, 0, 4, 9):
        assert draws(torch.zeros(4), SamplingParams(top_k=off, seed=0)) == {0, 1, 2, 3}


def test_top_p_applies_to_what_top_k_kept_and_min_p_is_relative_to_the_top():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert draws(logits, SamplingParams(top_p=0.5, seed=0)) == {0, 1}  # 0.4 < 0.5: the second is needed
    assert draws(logits, SamplingParams(top_k=2, top_p=0.5, seed=0)) == {0}  # renormalised: 4/7 >= 0.5
    assert draws(logits, SamplingParams(min_p=0.5, seed=0)) == {0, 1}  # p >= 0.5 * 0.4
    assert draws(logits, SamplingParams(min_p=0.3, seed=0)) == {0, 1, 2}


def test_neutral_values_sample_exactly_as_without_them():
    neutral = dict(top_k=-1, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                   logit_bias={0: 0.0, 3: 0}, min_tokens=0, stop_token_ids=[4])
    state = RowState(None, [0, 3, 3], [1, 3], {2})
    assert torch.equal(process_logits(LOGITS, SamplingParams(**neutral), state), LOGITS)
    for top_k in (-1, 0):
        plain, same = SamplingParams(seed=5), SamplingParams(seed=5, **{**neutral, "top_k": top_k})
        g1, g2 = make_generator(plain), make_generator(same)
        history = RowState(g2, state.prompt_ids, state.output_ids, state.eos_token_ids)
        assert [sample_token(LOGITS, plain, g1) for _ in range(50)] == \
            [sample_token(LOGITS, same, history) for _ in range(50)]
    greedy = SamplingParams(temperature=0, **neutral)
    assert sample_token(LOGITS, greedy, state) == int(torch.argmax(LOGITS)) == 3


def test_seeds_wrap_modulo_2_to_the_64_and_tiny_temperatures_are_greedy():
    def sequence(seed):
        params = SamplingParams(seed=seed)
        g = make_generator(params)
        return [sample_token(torch.zeros(50), params, g) for _ in range(20)]

    assert sequence(2 ** 70 + 7) == sequence(7) and sequence(-1) == sequence(2 ** 64 - 1)
    assert sequence(7) != sequence(8)
    tiny = SamplingParams(temperature=1e-30)
    assert make_generator(tiny) is None and sample_token(LOGITS, tiny, None) == 3  # no overflow to NaN


@pytest.mark.parametrize("field,value", [
    ("top_k", -2), ("top_k", 1.5), ("min_p", 1.5), ("min_tokens", 17), ("min_tokens", -1),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("repetition_penalty", 0.0),
    ("repetition_penalty", float("nan")), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("logit_bias", {1: 101}), ("logit_bias", {-1: 1}), ("seed", 1.5), ("temperature", float("inf"))])
def test_out_of_range_values_are_refused_naming_the_field(field, value):
    with pytest.raises(GraftingError, match=f"^{field}: expected"):
        SamplingParams(**{field: value}).validate()
    with pytest.raises(GraftingError, match="logit_bias: token id 300 is outside the vocabulary"):
        SamplingParams(logit_bias={300: 1}).check_vocab(260)


def test_stop_strings_wait_for_min_tokens_and_released_text_stays():
    tok = byte_tokenizer()
    d = Detokenizer(tok, ["ab"])
    ids = tok("xab", add_special_tokens=False)["input_ids"]
    assert [d.add(t, may_stop=False) for t in ids] == [("x", False), ("", False), ("ab", False)]
    assert d.add(tok("c", add_special_tokens=False)["input_ids"][0]) == ("c", False)  # "ab" is final now
    d = Detokenizer(tok, ["ab"])
    assert d.add(ids[0], may_stop=False) == ("x", False) and d.add(ids[1], may_stop=False) == ("", False)
    assert d.add(ids[2]) == ("", True)  # completed once stopping is allowed: it stops, "a" never sent


# ---- the engine: what ends an output, and what usage counts ----------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return gf.AdaptedModel(tiny_lm("llama"))


PROMPT = [5, 9, 2, 7]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def test_eos_and_stop_token_ids_end_the_output_and_are_counted_not_returned(model):
    greedy = Engine(model).generate([PROMPT], GREEDY)[0].token_ids
    end = greedy[3]
    k = greedy.index(end)
    out = Engine(model, eos_token_ids=[end]).generate([PROMPT], SamplingParams(max_tokens=10, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids == greedy[:k] and out.completion_tokens == k + 1
    stopped = Engine(model).generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                              stop_token_ids=[end]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == greedy[:k] and stopped.completion_tokens == k + 1
    assert Engine(model).generate([PROMPT], GREEDY)[0].completion_tokens == 10  # "length": nothing extra


def test_min_tokens_outlasts_eos_and_a_stop_token(model):
    greedy = Engine(model).generate([PROMPT], GREEDY)[0].token_ids
    end = greedy[1]
    k = greedy.index(end)
    for engine, params in [(Engine(model), SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[end],
                                                          min_tokens=k + 3)),
                           (Engine(model, eos_token_ids=[end]), SamplingParams(max_tokens=10, temperature=0,
                                                                               min_tokens=k + 3))]:
        out = engine.generate([PROMPT], params)[0]
        assert len(out.token_ids) >= k + 3 and end not in out.token_ids[:k + 3]
        assert out.token_ids[:k] == greedy[:k]  # the rule changes nothing before the end would come
