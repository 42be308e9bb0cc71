"""What the HTTP server accepts, refuses and counts: the sampling fields beyond OpenAI's basic ones, fields it
does not implement (a 400 naming them, never silently ignored), metadata it ignores, bad values, and usage."""

from __future__ import annotations

import json

import pytest
from serving_models import TEMPLATE, byte_tokenizer, tiny_lm

import grafting as gf
from grafting.serve import AdapterPool, Engine

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

PROMPT = "Once upon"
BASE = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}


@pytest.fixture(scope="module")
def client():
    from grafting.serve.http import create_app
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "{{ greeting or '' }}" + TEMPLATE  # greeting: a chat_template_kwargs variable
    model = gf.AdaptedModel(tiny_lm("llama"))
    engine = Engine(model, tokenizer=tokenizer, pool=AdapterPool(model), max_batch=8)
    with TestClient(create_app(engine, "tiny")) as c:
        yield c


def post(client, path, body):
    r = client.post(path, json=body)
    return r.status_code, r.json()


def refused(client, path, body, param, words):
    status, out = post(client, path, body)
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param, out
    assert words in out["error"]["message"], out


def test_logit_bias_and_stop_token_ids_act_on_token_ids(client):
    status, out = post(client, "/v1/completions", {**BASE, "logit_bias": {"65": 100}})
    assert status == 200 and out["choices"][0]["text"] == "A" * 6
    plain = post(client, "/v1/completions", BASE)[1]["choices"][0]["text"]
    assert plain[0].isascii()  # the byte tokenizer's id for it is its code
    status, out = post(client, "/v1/completions", {**BASE, "stop_token_ids": [ord(plain[0])]})
    assert out["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    assert out["usage"]["completion_tokens"] == 1  # the stop token is counted, as vLLM does
    status, out = post(client, "/v1/completions", {**BASE, "stop_token_ids": [ord(plain[0])], "min_tokens": 3})
    assert len(out["choices"][0]["text"]) >= 3


def test_the_eos_that_ends_a_choice_is_counted_not_returned(client):
    body = {**BASE, "ignore_eos": False, "logit_bias": {"256": 100}}  # <eos> is 256: the first token
    status, out = post(client, "/v1/completions", body)
    assert out["choices"][0]["text"] == "" and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 1, "total_tokens": len(PROMPT) + 1}


def test_penalties_and_top_k_reach_the_sampler(client):
    plain = post(client, "/v1/completions", BASE)[1]["choices"][0]["text"]
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself greedily...
    for extra in ({"repetition_penalty": 50.0}, {"frequency_penalty": 2.0, "presence_penalty": 2.0}):
        text = post(client, "/v1/completions", {**BASE, **extra})[1]["choices"][0]["text"]
        assert text != plain, extra  # ...and stops when penalised
    neutral = {"repetition_penalty": 1, "frequency_penalty": 0, "presence_penalty": 0, "top_k": -1, "min_p": 0,
               "logit_bias": {}, "min_tokens": 0}
    assert post(client, "/v1/completions", {**BASE, **neutral})[1]["choices"][0]["text"] == plain
    seeded = {**BASE, "temperature": 1.5, "seed": 3, "max_tokens": 8}
    assert post(client, "/v1/completions", {**seeded, "top_k": 1})[1]["choices"][0]["text"] == \
        post(client, "/v1/completions", {**BASE, "max_tokens": 8})[1]["choices"][0]["text"]  # top-1 is greedy


@pytest.mark.parametrize("path,extra,param,words", [
    ("/v1/completions", {"max_tokens": 0}, "max_tokens", "only with echo"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens", ">= 1"),
    ("/v1/completions", {"logprobs": 21}, "logprobs", "[0, 20]"),
    ("/v1/completions", {"suffix": "end"}, "suffix", "not supported"),
    ("/v1/completions", {"best_of": 3}, "best_of", "best_of = n"),
    ("/v1/completions", {"guided_json": {"type": "object"}}, "guided_json", "not supported"),
    ("/v1/completions", {"max_token": 5}, "max_token", "not supported"),  # a typo is not silently ignored
    ("/v1/completions", {"prompt": []}, "prompt", "non-empty"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ("/v1/completions", {"max_tokens": 10 ** 9}, "max_tokens", "context is 96 tokens and the prompt uses 9"),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ("/v1/completions", {"logit_bias": {"999": 1}}, "logit_bias", "outside the vocabulary"),
    ("/v1/completions", {"top_k": -5}, "top_k", "expected"),
    ("/v1/completions", {"min_tokens": 7}, "min_tokens", "max_tokens=6"),
    ("/v1/completions", {"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ("/v1/completions", {"n": 17}, "n", "[1, 16]"),
    ("/v1/chat/completions", {"logprobs": 2}, "logprobs", "true or false"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "logprobs is true"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format", "JSON"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice", "tool"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions", "function"),
    ("/v1/chat/completions", {"max_completion_tokens": 500}, "max_completion_tokens", "at most"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content.1", "only text parts"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
     "messages.0.tool_calls", "tool"),
    ("/v1/chat/completions", {"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", "tokenize"),
    ("/v1/chat/completions", {"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs",
     "use the request field"),
    ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message", "add_generation_prompt"),
    ("/v1/chat/completions", {"continue_final_message": True, "add_generation_prompt": False},
     "continue_final_message", "role 'user'"),
])
def test_what_is_not_implemented_is_refused_naming_the_field(client, path, extra, param, words):
    refused(client, path, {**(BASE if path == "/v1/completions" else CHAT), **extra}, param, words)


def test_metadata_and_neutral_values_are_accepted(client):
    meta = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "seed": 2 ** 70}
    status, out = post(client, "/v1/completions", {**BASE, **meta, "best_of": 1, "logprobs": None, "echo": False})
    assert status == 200, out
    chat = {**CHAT, **meta, "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
            "response_format": {"type": "text"}, "logprobs": False, "modalities": ["text"],
            "messages": [{"role": "user", "name": "ann", "content": [{"type": "text", "text": "hi"}]}]}
    status, out = post(client, "/v1/chat/completions", chat)
    assert status == 200, out
    same = post(client, "/v1/chat/completions", CHAT)[1]
    assert out["choices"][0]["message"] == same["choices"][0]["message"]  # text parts join into the content


def test_usage_counts_each_prompt_once_whatever_n(client):
    out = post(client, "/v1/completions", {**BASE, "n": 3})[1]
    assert out["usage"] == {"prompt_tokens": 9, "completion_tokens": 18, "total_tokens": 27}
    out = post(client, "/v1/completions", {**BASE, "n": 2, "prompt": [PROMPT, "abc"], "echo": True})[1]
    assert [c["text"][:3] for c in out["choices"]] == ["Onc", "Onc", "abc", "abc"]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["prompt_tokens"] == 9 + 3 and out["usage"]["completion_tokens"] == 24
    single = post(client, "/v1/chat/completions", CHAT)[1]["usage"]["prompt_tokens"]
    r = client.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["usage"] == {"prompt_tokens": single, "completion_tokens": 8, "total_tokens": single + 8}


def test_method_not_allowed_is_an_invalid_request(client):
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_vllm_chat_template_controls_shape_the_prompt(client):
    def prompt_tokens(**extra):
        status, out = post(client, "/v1/chat/completions", {**CHAT, **extra})
        assert status == 200, out
        return out["usage"]["prompt_tokens"]

    plain = prompt_tokens()  # "<user>hi\n<assistant>": the byte tokenizer has a token per character
    assert plain == len("<user>hi\n<assistant>")
    assert prompt_tokens(add_generation_prompt=False) == plain - len("<assistant>")
    assert prompt_tokens(chat_template_kwargs={"greeting": "Hey! "}) == plain + len("Hey! ")
    partial = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once"}]
    # the reply continues "Once" (no newline after it, no new turn)
    assert prompt_tokens(messages=partial, add_generation_prompt=False, continue_final_message=True) == \
        len("<user>hi\n<assistant>Once")


def test_stop_strings_and_special_tokens_in_the_text_on_request(client):
    varied = {**BASE, "max_tokens": 12, "repetition_penalty": 50.0}  # greedy, but no character twice
    text = post(client, "/v1/completions", varied)[1]["choices"][0]["text"]
    stop = text[3:5]
    assert text.find(stop) == 3, text  # so this is where the output stops
    cut = post(client, "/v1/completions", {**varied, "stop": stop})[1]["choices"][0]["text"]
    kept = post(client, "/v1/completions", {**varied, "stop": stop,
                                            "include_stop_str_in_output": True})[1]["choices"][0]["text"]
    assert cut == text[:3] and kept == text[:5]
    forced = {**BASE, "logit_bias": {"256": 100}, "max_tokens": 2}  # <eos> (special) twice; ignore_eos is on
    assert post(client, "/v1/completions", forced)[1]["choices"][0]["text"] == ""
    assert post(client, "/v1/completions", {**forced, "skip_special_tokens": False})[1]["choices"][0]["text"] == \
        "<eos><eos>"


def test_scoring_a_prompt_as_evaluation_harnesses_do(client):
    # lm-evaluation-harness's loglikelihood request: echo, no new tokens, the prompt's log probabilities
    body = {"model": "tiny", "prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0}
    status, out = post(client, "/v1/completions", body)
    assert status == 200, out
    choice = out["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == list(PROMPT) and lp["text_offset"] == list(range(len(PROMPT)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert all(t in top and len(top) <= 2 for t, top in zip(lp["tokens"][1:], lp["top_logprobs"][1:]))
    assert out["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 0, "total_tokens": len(PROMPT)}
    # with new tokens: the prompt's entries, then the generated ones; streamed in pieces that add up
    more = {**body, "max_tokens": 4, "logprobs": 2, "ignore_eos": True}
    whole = post(client, "/v1/completions", more)[1]["choices"][0]
    assert whole["logprobs"]["token_logprobs"][:len(PROMPT)] == lp["token_logprobs"]
    assert len(whole["logprobs"]["tokens"]) == len(PROMPT) + 4 and whole["text"].startswith(PROMPT)
    r = client.post("/v1/completions", json={**more, "stream": True})
    chunks = [json.loads(line[6:])["choices"][0] for line in r.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert [v for c in chunks if c["logprobs"] for v in c["logprobs"][key]] == whole["logprobs"][key]
