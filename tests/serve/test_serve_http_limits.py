"""The HTTP server under load and time limits, on 127.0.0.1: a full queue (429), the per-request timeout (504,
and during a stream an error event after the 200), and a non-streaming client that leaves mid-generation.

The tiny model sleeps 10 ms in every forward, so a long generation reliably outlasts the limits."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
from serving_models import byte_tokenizer, tiny_lm, uvicorn_server

import grafting as gf
from grafting.serve import AdapterPool, Engine

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

LONG = {"model": "tiny", "prompt": "Once", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}


@contextlib.contextmanager
def slow_server(request_timeout, **engine_kw):
    from grafting.serve.http import create_app
    base = tiny_lm("llama")
    base.register_forward_pre_hook(lambda module, args: time.sleep(0.01))
    model = gf.AdaptedModel(base)
    engine = Engine(model, tokenizer=byte_tokenizer(), pool=AdapterPool(model), max_model_len=4096, **engine_kw)
    app = create_app(engine, "tiny", request_timeout=request_timeout)
    finished, observe = [], engine.on_finish
    engine.on_finish = lambda r: (finished.append(r), observe(r))
    with uvicorn_server(app) as url:
        yield url, engine, finished


def wait_for(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def limited():
    with slow_server(request_timeout=2.0, max_batch=1, max_queue=1) as server:
        yield server


def test_a_full_queue_is_429_and_a_timeout_504(limited):
    url, engine, finished = limited
    wait_for(lambda: not engine.running and not engine.waiting, "an idle engine")
    done_before, results = len(finished), {}

    def call(name):
        results[name] = httpx.post(url + "/v1/completions", json=LONG, timeout=30)

    running = threading.Thread(target=call, args=("running",))
    running.start()
    wait_for(lambda: engine.running, "the first request running")
    waiting = threading.Thread(target=call, args=("waiting",))
    waiting.start()
    wait_for(lambda: engine.waiting, "the second request waiting")

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=30, max_retries=0)
    with pytest.raises(openai.RateLimitError) as full:
        client.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert full.value.status_code == 429
    assert full.value.body["type"] == "rate_limit_error" and full.value.body["code"] == 429
    assert "max_queue=1" in full.value.body["message"]

    running.join(30)
    waiting.join(30)
    for name in ("running", "waiting"):
        r = results[name]
        assert r.status_code == 504, (name, r.text)
        error = r.json()["error"]
        assert error["type"] == "timeout" and error["code"] == 504 and "timed out" in error["message"], name
    assert [r.finish_reason for r in finished[done_before:]] == ["timeout", "timeout"]
    assert all(r.completion_tokens < LONG["max_tokens"] for r in finished[done_before:])


def test_a_timeout_while_streaming_is_an_error_event_then_done(limited):
    url, engine, finished = limited
    wait_for(lambda: not engine.running and not engine.waiting, "an idle engine")
    with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        assert r.status_code == 200  # sent before the timeout: it cannot change any more
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert any(e["choices"][0]["text"] for e in events[:-1])  # tokens came before the limit
    error = events[-1]["error"]
    assert error["type"] == "timeout" and error["code"] == 504 and "timed out" in error["message"]
    assert finished[-1].finish_reason == "timeout"
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=30, max_retries=0)
    with pytest.raises(openai.APIError, match="timed out"):  # the official client raises on the event
        for _ in client.completions.create(model="tiny", prompt="Once", max_tokens=2000, stream=True,
                                           extra_body={"ignore_eos": True}):
            pass


def test_a_non_streaming_client_that_leaves_is_cancelled():
    with slow_server(request_timeout=None, max_batch=4) as (url, engine, finished):
        body = json.dumps(LONG).encode()
        host, port = url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        wait_for(lambda: engine.running and engine.running[0].completion_tokens >= 5, "tokens arriving")
        sock.close()  # nothing of the response has been sent: only the connection says the client left
        wait_for(lambda: finished, "the request ending", timeout=10)
        assert finished[0].finish_reason == "cancelled"
        assert 5 <= finished[0].completion_tokens < LONG["max_tokens"]
        wait_for(lambda: not engine.running, "the row leaving the batch", timeout=5)


def test_an_embeddings_request_past_its_timeout_is_504():
    """A tiny encoder that sleeps 1 s per forward, one row per batch: the second request waits behind the first
    past its 0.3 s limit and gets 504 (a timeout error object) while the first, already running, gets 200."""
    import torch
    from transformers import BertConfig, BertModel

    from grafting.serve.embed import Embedder
    from grafting.serve.http import create_app
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=50, max_position_embeddings=16)).eval()
    encoder.register_forward_pre_hook(lambda module, args: time.sleep(1.0))
    model = gf.AdaptedModel(encoder)
    embedder = Embedder(model, pool=AdapterPool(model), max_batch=1)
    app = create_app(embedder, "tiny-bert", request_timeout=0.3)
    body = {"model": "tiny-bert", "input": [2, 5, 6]}  # token ids: no tokenizer needed
    with uvicorn_server(app) as url:
        results = {}
        first = threading.Thread(target=lambda: results.update(
            first=httpx.post(url + "/v1/embeddings", json=body, timeout=10)))
        first.start()
        wait_for(lambda: embedder.running, "the first request running")
        started = time.monotonic()
        second = httpx.post(url + "/v1/embeddings", json=body, timeout=8)
        first.join(10)
        assert second.status_code == 504, second.text
        error = second.json()["error"]
        assert error["type"] == "timeout" and error["code"] == 504 and "timed out" in error["message"]
        assert time.monotonic() - started < 5
        assert results["first"].status_code == 200 and len(results["first"].json()["data"][0]["embedding"]) == 32
