"""The HTTP server end to end: the official openai client against a server this test starts on 127.0.0.1
(tiny Llama with grouped-query attention, byte tokenizer, adapters in an adapter root), plus raw requests for
the error paths the client never sends."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from serving_models import TEMPLATE, add_random_adapter, byte_tokenizer, tiny_lm, uvicorn_server

import grafting as gf
from grafting.serve import AdapterPool, Engine, SamplingParams

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_root")
    source = gf.AdaptedModel(tiny_lm("llama"))
    for i, name in enumerate(["poet", "pirate", "spare"]):
        add_random_adapter(source, name, "llama", r=[4, 16, 8][i], seed=20 + i)
        source.save_adapter(root / name, name=name)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TEMPLATE
    expected_engine = Engine(source, tokenizer=tokenizer)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = {name: expected_engine.generate(["Once upon"], greedy, [name])[0].text
                for name in ["poet", "pirate", None]}
    (root / "later").mkdir()  # weights without a config: a runtime load of it must fail clearly
    (root / "later" / "adapter_model.safetensors").write_bytes((root / "spare" / "adapter_model.safetensors")
                                                               .read_bytes())

    from grafting.serve.http import create_app
    model = gf.AdaptedModel(tiny_lm("llama"))
    pool = AdapterPool(model, max_loras=2)
    for d in ("poet", "pirate"):  # "spare" is loaded at run time
        pool.register(d, root / d)
    engine = Engine(model, tokenizer=tokenizer, pool=pool, max_batch=8, max_queue=64)
    app = create_app(engine, "tiny-llama", api_key=KEY, adapter_root=root, request_timeout=30)
    with uvicorn_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=30, max_retries=0)
        yield {"url": url, "client": client, "expected": expected, "engine": engine, "root": root}


def test_models_lists_base_and_adapters(server):
    ids = [m.id for m in server["client"].models.list().data]
    assert ids[0] == "tiny-llama" and {"poet", "pirate"} <= set(ids)


def test_completions_per_adapter_match_the_engine(server):
    client = server["client"]
    for model, adapter in [("poet", "poet"), ("pirate", "pirate"), ("tiny-llama", None)]:
        out = client.completions.create(model=model, prompt="Once upon", max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == server["expected"][adapter]
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len("Once upon")
    assert server["expected"]["poet"] != server["expected"]["pirate"]


def test_streaming_adds_up_to_the_whole_text(server):
    stream = server["client"].completions.create(model="pirate", prompt="Once upon", max_tokens=12, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True},
                                                 stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == server["expected"]["pirate"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_completions_stream_and_not(server):
    client = server["client"]
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="poet", messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 8
    streamed = client.chat.completions.create(model="poet", messages=messages, max_tokens=8, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content
    raw = client.completions.create(model="poet", prompt="<user>hi\n<assistant>", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert raw.choices[0].text == whole.choices[0].message.content  # the chat template was applied


def test_logprobs_through_the_official_client(server):
    client = server["client"]
    out = client.completions.create(model="poet", prompt="Once upon", max_tokens=12, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert out.choices[0].text == server["expected"]["poet"] == "".join(lp.tokens)  # a token per byte
    assert len(lp.tokens) == 12 and lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert max(top.values()) == top[token] == logprob <= 0  # greedy: the sampled token is the most likely
        assert 2 <= len(top) <= 3
    chat = dict(model="pirate", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0,
                logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**chat).choices[0]
    streamed = [item for c in client.chat.completions.create(**chat, stream=True)
                if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in whole.logprobs.content]
    assert "".join(i.token for i in whole.logprobs.content) == whole.message.content
    assert all(len(i.top_logprobs) == 3 and i.top_logprobs[0].logprob == i.logprob and
               i.bytes == list(i.token.encode()) for i in whole.logprobs.content)


def test_api_key_guards_v1_only(server):
    bad = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", timeout=10, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    metrics = httpx.get(server["url"] + "/metrics").text
    for name in ("grafting_queue_depth", "grafting_batch_size", "grafting_generated_tokens_total",
                 "grafting_adapter_loads_total", "grafting_request_latency_seconds_bucket"):
        assert name in metrics


def test_errors_are_openai_error_objects(server):
    client = server["client"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nobody", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="poet", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="poet", prompt="x" * 200, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="poet", prompt="x", max_tokens=2, logprobs=50)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server["url"] + "/v1/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server["url"] + "/v1/completions", json={"model": "poet"}, headers=headers)
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="needs an encoder"):  # a causal LM serves no embeddings
        client.embeddings.create(model="poet", input="x")
    assert httpx.get(server["url"] + "/health").status_code == 200  # still up


def test_runtime_load_and_unload_stay_inside_the_root(server, tmp_path):
    url, client = server["url"], server["client"]
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "spare", "lora_path": "spare"}, headers=headers)
    assert r.status_code == 200, r.text
    out = client.completions.create(model="spare", prompt="Once upon", max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")
    outside = tmp_path / "outside"
    outside.mkdir()
    (server["root"] / "escape").symlink_to(outside, target_is_directory=True)
    for path in ["../outside", str(outside), "escape"]:
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path}, headers=headers)
        assert r.status_code == 400 and "error" in r.json(), path
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "half", "lora_path": "later"}, headers=headers)
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "spare"}, headers=headers)
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="spare", prompt="x", max_tokens=2)
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "spare"}, headers=headers)
    assert r.status_code == 404


def test_a_client_that_disconnects_is_cancelled(server):
    engine = server["engine"]
    deadline = time.monotonic() + 10
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.02)
    max_tokens = engine.max_model_len - len("Once")  # as many as the context allows
    finished, observe = [], engine.on_finish
    engine.on_finish = lambda r: (finished.append(r), observe(r))
    # 30 ms a forward: the whole answer would take 2.7 s or more, so only a cancellation ends it early
    slow = engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    try:
        with httpx.stream("POST", server["url"] + "/v1/completions",
                          json={"model": "poet", "prompt": "Once", "max_tokens": max_tokens, "stream": True,
                                "temperature": 0, "ignore_eos": True},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
            assert r.status_code == 200
            events = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                if len(events) == 2:
                    break  # and leave: the connection closes with the rest of the stream unread
        deadline = time.monotonic() + 10
        while not finished and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        slow.remove()
        engine.on_finish = observe
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None]  # it was mid-stream
    assert len(finished) == 1, "the request did not end within 10 s of the client leaving"
    assert finished[0].finish_reason == "cancelled"
    assert 2 <= finished[0].completion_tokens < max_tokens
    deadline = time.monotonic() + 5
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.running and not engine.waiting
