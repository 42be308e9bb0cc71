"""Adapters with a head trained in full (``modules_to_save``) on a causal LM, saved to disk in PEFT format and
served through the adapter pool: alone, mixed in one batch, handing their modules over to another adapter of
the same config (refill_adapter), and over HTTP with the official openai client. The reference is transformers'
own generate on the AdaptedModel the adapters were saved from."""

from __future__ import annotations

import pytest
import torch
from pool_fixtures import settle
from serving_models import add_random_adapter, save_tiny_lm, tiny_lm, uvicorn_server

import grafting as gf
from grafting.serve import AdapterPool, Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = "Once upon"
HEADS = ("h1", "h2")  # one config (r=4, lm_head in full): either can take over the other's modules


def greedy_reference(model, ids, adapter, n=GREEDY.max_tokens):
    """transformers' generate with ``adapter`` active (None: the base), no serving code involved."""
    with torch.no_grad():
        if adapter is None:
            with model.disabled():
                out = model.base_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                                eos_token_id=None, pad_token_id=0)
        else:
            model.set_active(adapter)
            out = model.base_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                            eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama (untied lm_head) saved as a model directory, two head adapters and a LoRA-only twin of h1
    under an adapter root, and the reference greedy ids of each (and of the base)."""
    tmp = tmp_path_factory.mktemp("saved_modules")
    _, tokenizer = save_tiny_lm(tmp / "model", "llama", tie=False)
    source = gf.AdaptedModel(tiny_lm("llama", tie=False))
    for i, name in enumerate(HEADS):
        add_random_adapter(source, name, "llama", r=4, seed=5 + i, modules_to_save=["lm_head"])
        with torch.no_grad():  # the head's copy starts as the base's: move it so it changes the outputs
            for pname, p in source.named_parameters():
                if f"copies.{name}." in pname:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(50 + i)))
        source.save_adapter(tmp / "root" / name, name=name)
    add_random_adapter(source, "h1_lora_only", "llama", r=4, seed=5)  # h1's factors (same seed), no head
    source.eval()
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    expected = {a: greedy_reference(source, ids, a) for a in (*HEADS, "h1_lora_only", None)}
    # the head decides the output, and the two adapters differ: otherwise the checks below could not fail
    assert len({tuple(v) for v in expected.values()}) == 4
    return {"dir": tmp, "ids": ids, "expected": expected, "tokenizer": tokenizer}


def test_the_saved_file_holds_the_head_under_peft_keys(saved):
    from safetensors import safe_open
    with safe_open(saved["dir"] / "root" / "h1" / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.lm_head.weight" in f.keys()


def test_head_adapters_from_disk_serve_their_own_outputs_alone_and_mixed(saved):
    root, ids, expected = saved["dir"] / "root", saved["ids"], saved["expected"]
    pool = AdapterPool(gf.AdaptedModel(tiny_lm("llama", tie=False)), max_loras=2)
    for name in HEADS:
        pool.register(name, root / name)
    engine = Engine(pool.model, pool=pool)
    for name in HEADS:
        assert engine.generate([ids], GREEDY, [name])[0].token_ids == expected[name], name
    # both resident: one batch, each row through its own head, and a base row through the base's
    outs = engine.generate([ids] * 3, GREEDY, ["h2", None, "h1"])
    assert [o.token_ids for o in outs] == [expected["h2"], expected[None], expected["h1"]]
    pool.close()


def test_a_head_adapter_taking_over_anothers_modules_serves_its_own_head(saved):
    """max_loras 1: each install evicts the other adapter and refills its modules, the head's copy included
    (the same module objects throughout; the outputs follow the adapter asked for, never the previous one)."""
    root, ids, expected = saved["dir"] / "root", saved["ids"], saved["expected"]
    pool = AdapterPool(gf.AdaptedModel(tiny_lm("llama", tie=False)), max_loras=1, max_cpu_loras=0)
    for name in HEADS:
        pool.register(name, root / name)
    engine = Engine(pool.model, pool=pool)
    first = settle(pool, "h1")
    heads = [m for n, m in pool.model.saved_modules()]
    copy = heads[0].copies[first]
    pool.release(first)
    for name in ("h1", "h2", "h1", "h2"):
        internal = settle(pool, name)
        assert internal == first and pool.model.adapter_names() == [first]  # handed over, not rebuilt
        assert [m for _, m in pool.model.saved_modules()][0].copies[internal] is copy
        pool.release(internal)
        assert engine.generate([ids], GREEDY, [name])[0].token_ids == expected[name], name
        assert engine.generate([ids], GREEDY, [None])[0].token_ids == expected[None]  # the base's head untouched
    assert pool.stats["loads"] == 4 and pool.stats["evictions"] == 3
    pool.close()


def test_head_adapters_over_http_with_the_openai_client(saved):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from grafting.serve.http import create_app
    from grafting.serve.server import build_engine
    tmp, expected, tokenizer = saved["dir"], saved["expected"], saved["tokenizer"]
    engine, _ = build_engine(str(tmp / "model"), adapter_root=str(tmp / "root"), max_loras=1, max_cpu_loras=1)
    app = create_app(engine, "tiny", adapter_root=tmp / "root", request_timeout=60)
    with uvicorn_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
        for model, adapter in [("h1", "h1"), ("h2", "h2"), ("tiny", None), ("h1", "h1"), ("h2", "h2")]:
            out = client.completions.create(model=model, prompt=PROMPT, max_tokens=GREEDY.max_tokens,
                                            temperature=0, extra_body={"ignore_eos": True})
            assert out.choices[0].text == tokenizer.decode(expected[adapter]), model
            assert out.usage.completion_tokens == GREEDY.max_tokens
        stats = engine.pool.stats
        assert stats["evictions"] >= 3 and len(engine.model.adapter_names()) == 1  # modules handed over
