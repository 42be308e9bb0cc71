"""Streaming detokenization (UTF-8 and stop-string hold-back) and per-row sampling rules."""

from __future__ import annotations

import pytest
import torch

from grafting.serve.sampling import SamplingParams, make_generator, sample_token
from grafting.serve.text import Detokenizer
from serving_models import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def stream(tokenizer, text, stop, include_stop=False):
    d = Detokenizer(tokenizer, stop, include_stop)
    pieces, stopped = [], False
    for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
        piece, stopped = d.add(t)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(d.flush())
    return pieces, stopped


def test_multibyte_characters_are_held_until_complete(tokenizer):
    pieces, _ = stream(tokenizer, "añb€", [])
    assert "".join(pieces) == "añb€"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "ñ"  # 'ñ' is two byte tokens: nothing after the first


def test_stop_string_is_never_streamed_partly(tokenizer):
    pieces, stopped = stream(tokenizer, "hello END world", ["END"])
    assert stopped and "".join(pieces) == "hello "
    pieces, stopped = stream(tokenizer, "hello EN world", ["END"])  # a false start is released later
    assert not stopped and "".join(pieces) == "hello EN world"
    assert "E" not in "".join(pieces[:8])  # held while it could still become "END"


def test_stop_string_kept_on_request_ends_the_text(tokenizer):
    pieces, stopped = stream(tokenizer, "hello END world", ["END", "D w"], include_stop=True)
    assert stopped and "".join(pieces) == "hello END"
    pieces, stopped = stream(tokenizer, "hello END world", ["ND", "END"], include_stop=True)
    assert stopped and "".join(pieces) == "hello END"  # both end at the same token: the earlier start wins


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    g = make_generator(params)
    draws = {sample_token(logits, params, g) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the second token is in, the third is not
    greedy = SamplingParams(temperature=0)
    assert sample_token(logits, greedy, make_generator(greedy)) == 0


def test_temperature_sharpens_towards_greedy():
    logits = torch.tensor([1.0, 0.8, 0.0])
    cold = SamplingParams(temperature=0.01, seed=1)
    g = make_generator(cold)
    assert {sample_token(logits, cold, g) for _ in range(100)} == {0}
    warm = SamplingParams(temperature=1.0, seed=1)
    g = make_generator(warm)
    assert {sample_token(logits, warm, g) for _ in range(200)} == {0, 1, 2}
