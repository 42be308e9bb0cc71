"""grafting.serve.ray on a local single-node Ray cluster: two replicas behind the router, requests routed by
adapter (Ray Serve model multiplexing), answers equal to a local engine's, streaming through the router."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from serving_models import add_random_adapter, free_port, save_tiny_lm, wait_healthy

import grafting as gf
from grafting.serve import Engine, SamplingParams

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

KEY = "sk-ray"


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    from grafting.serve.ray import build_app
    tmp = tmp_path_factory.mktemp("ray")
    base, tokenizer = save_tiny_lm(tmp / "tiny-llama", "llama", chat=True)
    source = gf.AdaptedModel(base)
    for i, name in enumerate(["poet", "pirate"]):
        add_random_adapter(source, name, "llama", r=[4, 16][i], seed=40 + i)
        source.save_adapter(tmp / "adapters" / name, name=name)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = {name: Engine(source, tokenizer=tokenizer).generate(["Once upon"], greedy, [name])[0].text
                for name in ["poet", "pirate", None]}
    port = free_port()
    # on two busy cores a proxy can take longer than Ray's 5 s to report ready; it is then killed and retried
    for var in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(var, "60")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(str(tmp / "tiny-llama"), adapter_root=str(tmp / "adapters"), num_replicas=2, max_loras=1,
                        api_key=KEY, ray_actor_options={"num_cpus": 0.5}, max_batch=8)
        serve.run(app, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout=180)
        yield {"url": url, "expected": expected, "adapters": tmp / "adapters", "source": source,
               "tokenizer": tokenizer}
    finally:
        serve.shutdown()
        ray.shutdown()


def _complete(url, model, **extra):
    r = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": model, "prompt": "Once upon", "max_tokens": 10, "temperature": 0,
                         "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.headers["x-grafting-replica"]


def test_answers_match_a_local_engine(ray_server):
    client = openai.OpenAI(base_url=ray_server["url"] + "/v1", api_key=KEY, timeout=60, max_retries=0)
    for model, adapter in [("poet", "poet"), ("pirate", "pirate"), ("tiny-llama", None)]:
        out = client.completions.create(model=model, prompt="Once upon", max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == ray_server["expected"][adapter], model
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="pirate", prompt="Once upon", max_tokens=10, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == ray_server["expected"]["pirate"]
    chat = client.chat.completions.create(model="poet", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_requests_for_an_adapter_stay_on_the_replica_that_holds_it(ray_server):
    """Ray's router learns which replica holds which adapter from the replicas, through its controller, every
    few seconds; until then requests may land anywhere (and, with one adapter per replica, move adapters
    around). Once it knows, every request for an adapter goes to the replica holding it."""
    url = ray_server["url"]
    held = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        held = {model: {_complete(url, model)[1] for _ in range(4)} for model in ("poet", "pirate")}
        if all(len(r) == 1 for r in held.values()) and held["poet"] != held["pirate"]:
            break
        time.sleep(2)
    for model in ("poet", "pirate"):  # settled: 8 more each stay put (by chance: 2^-8 per adapter)
        held[model] |= {_complete(url, model)[1] for _ in range(8)}
    assert all(len(r) == 1 for r in held.values()), held
    spread = {_complete(url, "tiny-llama")[1] for _ in range(12)}  # the base routes freely
    assert len(spread) == 2, spread


def test_app_builder_takes_serve_run_arguments(tmp_path):
    from grafting.errors import GraftingError
    from grafting.serve.ray import app_builder
    app = app_builder({"model": str(tmp_path), "num_replicas": "3", "max_loras": "2", "max_batch": "4"})
    assert type(app).__name__ == "Application"
    with pytest.raises(GraftingError, match="num_replicas: expected an integer"):
        app_builder({"model": str(tmp_path), "num_replicas": "two"})
    with pytest.raises(GraftingError, match="unknown argument 'colour'"):
        app_builder({"model": str(tmp_path), "colour": "red"})


def test_new_adapter_directories_serve_by_name_and_runtime_loads_are_refused(ray_server):
    url, h = ray_server["url"], {"Authorization": f"Bearer {KEY}"}
    source = ray_server["source"]
    add_random_adapter(source, "sailor", "llama", r=8, seed=77)
    source.save_adapter(ray_server["adapters"] / "sailor", name="sailor")
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = Engine(source, tokenizer=ray_server["tokenizer"]).generate(["Once upon"], greedy, ["sailor"])[0].text
    assert _complete(url, "sailor")[0] == want
    r = httpx.post(url + "/v1/load_lora_adapter", headers=h, json={"lora_name": "x", "lora_path": "poet"})
    assert r.status_code == 400 and "adapter root" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", headers=h, json={"model": "nobody", "prompt": "x"})
    assert r.status_code == 404 and "nobody" in json.dumps(r.json())
    (ray_server["adapters"] / "broken").mkdir()
    (ray_server["adapters"] / "broken" / "adapter_config.json").write_text("{not json")
    r = httpx.post(url + "/v1/completions", headers=h, json={"model": "broken", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]  # why, not "does not exist"
    for f in (ray_server["adapters"] / "sailor").iterdir():  # the operator fixes it: served from then on
        (ray_server["adapters"] / "broken" / f.name).write_bytes(f.read_bytes())
    assert _complete(url, "broken")[0] == want
    assert httpx.post(url + "/v1/completions", json={"model": "poet", "prompt": "x"}).status_code == 401
