"""Runtime adapter loads over HTTP with an adapter root: a load is read and checked before it answers (200 means
it will serve, a refusal leaves the name as it was), files stay inside the root at every read (not only when
loaded), unloading never cuts a running request short, and a reload under the same name serves the new files.
A tiny Llama behind uvicorn; the pool holds one adapter and no host copies, so every switch reads the files."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from serving_models import add_random_adapter, byte_tokenizer, tiny_lm, uvicorn_server

import grafting as gf
from grafting.serve import AdapterPool, Engine, SamplingParams

pytest.importorskip("uvicorn")

NAMES = ("poet", "pirate", "spare")
PROMPT = "Once upon"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    root, outside = base / "root", base / "outside"
    source = gf.AdaptedModel(tiny_lm("llama"))
    for i, name in enumerate(NAMES):
        add_random_adapter(source, name, "llama", r=[4, 16, 8][i], seed=20 + i)
        source.save_adapter(root / name, name=name)
        source.save_adapter(outside / name, name=name)
    tokenizer = byte_tokenizer()
    reference = Engine(source, tokenizer=tokenizer)  # every adapter on its own, no pool
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    long = SamplingParams(max_tokens=80, temperature=0, ignore_eos=True)
    expected = {name: reference.generate([PROMPT], greedy, [name])[0].text for name in NAMES}
    expected_long = reference.generate([PROMPT], long, ["pirate"])[0].text

    from grafting.serve.http import create_app
    model = gf.AdaptedModel(tiny_lm("llama"))
    pool = AdapterPool(model, max_loras=1, max_cpu_loras=0)  # every switch reads the files again
    pool.register("pirate", root / "pirate")
    engine = Engine(model, tokenizer=tokenizer, pool=pool, max_batch=8, max_queue=64)
    app = create_app(engine, "tiny-llama", adapter_root=root, request_timeout=30)
    with uvicorn_server(app) as url:
        yield {"url": url, "root": root, "outside": outside, "expected": expected, "expected_long": expected_long,
               "pool": pool}


def load(url, name, path):
    return httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=30)


def complete(url, model, max_tokens=12):
    return httpx.post(url + "/v1/completions", timeout=30, json={
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})


def text(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def copy_adapter(src, dst):
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def test_a_load_that_could_never_serve_is_refused_and_the_name_keeps_what_it_had(server):
    url, root = server["url"], server["root"]
    copy_adapter(root / "spare", root / "garbage")
    (root / "garbage" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    copy_adapter(root / "spare", root / "elsewhere")
    config = json.loads((root / "elsewhere" / "adapter_config.json").read_text())
    (root / "elsewhere" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["nope_proj"]}))
    for path, says in [("garbage", "adapter_model.safetensors: not a readable safetensors file"),
                       ("elsewhere", "matched no module")]:
        r = load(url, "fresh", path)
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
        assert complete(url, "fresh").status_code == 404  # never registered
        r = load(url, "pirate", path)  # a failed reload leaves the registration serving what it served
        assert r.status_code == 400, r.text
        assert text(complete(url, "pirate")) == server["expected"]["pirate"]
    for path in ["a\x00b", "a" * 5000, "x/" * 3000]:  # names the OS refuses: a clear 400, never a 500
        r = load(url, "odd", path)
        assert r.status_code == 400 and "lora_path" in r.text, (path[:10], r.text)


def test_a_weights_file_symlinked_out_of_the_root_is_refused(server):
    url, root, outside = server["url"], server["root"], server["outside"]
    linked = root / "linked"
    linked.mkdir()
    shutil.copy(outside / "spare" / "adapter_config.json", linked / "adapter_config.json")
    (linked / "adapter_model.safetensors").symlink_to(outside / "spare" / "adapter_model.safetensors")
    r = load(url, "linked", "linked")
    assert r.status_code == 400 and "outside the adapter root" in r.json()["error"]["message"], r.text
    assert complete(url, "linked").status_code == 404


def test_files_swapped_for_symlinks_after_a_load_are_refused_at_the_next_read(server):
    url, root, outside = server["url"], server["root"], server["outside"]
    copy_adapter(root / "poet", root / "swap")
    assert load(url, "swap", "swap").status_code == 200
    assert text(complete(url, "swap")) == server["expected"]["poet"]
    for f in ("adapter_config.json", "adapter_model.safetensors"):  # now outside weights, behind the root's names
        (root / "swap" / f).unlink()
        (root / "swap" / f).symlink_to(outside / "spare" / f)
    assert text(complete(url, "pirate")) == server["expected"]["pirate"]  # evicts swap: it must be read again
    r = complete(url, "swap")
    assert r.status_code == 400 and "outside the adapter root" in r.json()["error"]["message"], r.text
    assert server["expected"]["spare"] != server["expected"]["poet"]  # so serving spare would have shown


def test_unloading_an_adapter_lets_its_running_request_finish(server):
    url = server["url"]
    body = {"model": "pirate", "prompt": PROMPT, "max_tokens": 80, "temperature": 0, "ignore_eos": True,
            "stream": True}
    pieces, finish = [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["text"])
                break
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "pirate"}).status_code == 200
        for line in lines:
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["text"])
                finish = choice["finish_reason"] or finish
    assert finish == "length" and "".join(pieces) == server["expected_long"]
    r = complete(url, "pirate")
    assert r.status_code == 404 and "pirate" in r.json()["error"]["message"]
    assert load(url, "pirate", "pirate").status_code == 200  # as the other tests found it


def test_a_reload_under_the_same_name_serves_the_new_files(server):
    url, root, expected = server["url"], server["root"], server["expected"]
    copy_adapter(root / "poet", root / "mutable")
    assert load(url, "mutable", "mutable").status_code == 200
    assert text(complete(url, "mutable")) == expected["poet"]
    copy_adapter(root / "spare", root / "mutable")  # new files in the same directory, then the same load
    assert load(url, "mutable", "mutable").status_code == 200
    assert text(complete(url, "mutable")) == expected["spare"]
    assert load(url, "mutable", "pirate").status_code == 200  # the same name from another directory
    assert text(complete(url, "mutable")) == expected["pirate"]
    models = httpx.get(url + "/v1/models").json()["data"]
    assert [m["root"] for m in models if m["id"] == "mutable"] == [str((root / "pirate").resolve())]
