"""Recipes on a quantized base: a quantize: section (QLoRA, LoftQ), and model.path pointing at a 4-bit
checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import grafting as gf
from grafting.quant import NF4Linear, from_pretrained, nf4_layers, quantize, save_pretrained
from grafting.train import train
from recipe_files import write_recipe

transformers = pytest.importorskip("transformers")


def with_section(path, **sections):
    recipe = yaml.safe_load(path.read_text())
    recipe.update(sections)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("init", ["qlora", "loftq"])
def test_quantize_section_trains_on_an_nf4_base(tmp_path, tiny_model_dir, jsonl_data, init):
    train_f, val_f = jsonl_data
    recipe = with_section(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_f, val_f, tmp_path / "out"),
                          quantize={"init": init, "num_iter": 2})
    result = train(recipe)
    assert result.after["loss"] < result.before["loss"]
    assert result.peak_memory_mb > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["peak_memory_mb"] == result.peak_memory_mb
    if init == "qlora":
        assert not (tmp_path / "out" / "base").exists()
        base = quantize(transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3),
                        skip=["classifier"])
    else:  # the adapter belongs to the base saved beside it
        base = from_pretrained(tmp_path / "out" / "base")
        assert type(base.classifier).__name__ == "Linear"
    assert len(nf4_layers(base)) > 4
    model = gf.load(base, tmp_path / "out" / "adapter")
    assert isinstance(model.base_model.bert.encoder.layer[0].attention.self.query.base_layer, NF4Linear)


def test_model_path_may_be_a_4bit_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = quantize(transformers.LlamaForCausalLM(cfg))
    save_pretrained(model, tmp_path / "q4")
    tok = pytest.importorskip("tokenizers")
    vocab = {chr(ord("a") + i): i for i in range(26)} | {"<unk>": 26, " ": 27}
    t = tok.Tokenizer(tok.models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = tok.pre_tokenizers.Split("", "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<unk>"
                                         ).save_pretrained(tmp_path / "q4")
    rows = [{"prompt": "say abc", "response": "abc abc"}] * 24
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"path": str(tmp_path / "q4"), "task": "causal_lm"},
        "adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"source": "files", "train": str(data), "validation": str(data), "max_length": 64},
        "optim": {"lr": 1e-2}, "train": {"batch_size": 8, "max_steps": 6, "progress": False},
        "output_dir": str(tmp_path / "out"),
    }
    result = train(recipe)
    assert result.after["loss"] < result.before["loss"]
    with pytest.raises(gf.GraftingError, match="already a 4-bit checkpoint"):
        train({**recipe, "quantize": {}, "output_dir": str(tmp_path / "out2")})
    from grafting.train.models import load_model
    with pytest.raises(gf.GraftingError, match="classification needs its head"):
        load_model(str(tmp_path / "q4"), "seq_cls", 2)


def test_quantize_section_is_validated(tmp_path, tiny_model_dir, jsonl_data):
    train_f, val_f = jsonl_data
    base = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_f, val_f, tmp_path / "out")
    with pytest.raises(gf.GraftingError, match="quantize.bits_per_parameter"):
        train(with_section(base, quantize={"init": "loftq", "bits_per_parameter": 4.1}))
    with pytest.raises(gf.GraftingError, match="quantize.block_size"):
        train(with_section(base, quantize={"block_size": 48}))
    with pytest.raises(gf.GraftingError, match="quantize.embeddings"):
        train(with_section(base, quantize={"init": "loftq", "embeddings": True}))
    with pytest.raises(gf.GraftingError, match="quantize.nf4_only"):
        train(with_section(base, quantize={"init": "lq_lora", "nf4_only": True}))


def test_lq_lora_budget_below_four_bits_in_a_recipe(tmp_path, tiny_model_dir, jsonl_data):
    """bits_per_parameter 3: LQ-LoRA mixes NormalFloat widths; the base saved beside the adapter reloads."""
    from grafting.quant.nfk import NFkLinear
    train_f, val_f = jsonl_data
    recipe = with_section(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_f, val_f, tmp_path / "out"),
                          quantize={"init": "lq_lora", "num_iter": 2, "bits_per_parameter": 3.0})
    result = train(recipe)
    assert result.after["loss"] < result.before["loss"]
    base = from_pretrained(tmp_path / "out" / "base")
    assert any(isinstance(m, NFkLinear) and m.bits < 4 for m in base.modules())
    model = gf.load(base, tmp_path / "out" / "adapter")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 3


def test_nf4_embeddings_in_a_recipe(tmp_path, tiny_model_dir, jsonl_data):
    train_f, val_f = jsonl_data
    recipe = with_section(write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_f, val_f, tmp_path / "out"),
                          quantize={"embeddings": True, "block_size": 32})  # the tiny BERT is 32 wide
    result = train(recipe)
    assert result.after["loss"] < result.before["loss"]
