"""Adapters and configs as careless users and peft produce them: lm_head targets, all-linear with a classifier,
layers_to_transform, bad fields. Each must load like peft or fail with a message naming the field."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import grafting as gf
from test_model import Net, tiny_gpt2


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2,
                                        tie_word_embeddings=tied)).eval()


MODELS = {"gpt2-tied": (tiny_gpt2, ["c_attn", "lm_head"]),
          "llama-untied": (lambda: tiny_llama(False), ["q_proj", "lm_head"]),
          "llama-tied": (lambda: tiny_llama(True), ["q_proj", "lm_head"])}


@pytest.mark.parametrize("which", MODELS)
def test_lm_head_adapters_move_both_ways_with_peft(which, tmp_path):
    import peft
    make, targets = MODELS[which]
    ids = torch.tensor([[1, 2, 3, 4]])
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = gf.load(make(), tmp_path / "peft")
    assert "lm_head" in dict(ours.hosts())
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-4)

    mine = gf.adapt(make(), gf.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    mine.save_adapter(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours"))
    torch.testing.assert_close(back(input_ids=ids).logits, mine(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_all_linear_with_a_classifier_head_matches_peft():
    """peft excludes the task head (trained in full) from all-linear; so do we instead of refusing."""
    import peft
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3)).eval()
    ours = gf.adapt(copy.deepcopy(base), gf.LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                       task_type="SEQ_CLS"))
    ours_hosts = {n for n, _ in ours.hosts()}
    theirs_hosts = {n[len("base_model.model."):] for n, m in theirs.named_modules()
                    if hasattr(m, "lora_A") and hasattr(m, "base_layer") and len(m.lora_A)}
    assert ours_hosts == theirs_hosts and "classifier" not in ours_hosts
    assert "classifier" in dict(ours.saved_modules())


def test_layers_to_transform_selects_the_same_layers_as_peft():
    import peft
    base = tiny_llama(False)
    ours = gf.adapt(copy.deepcopy(base), gf.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                       layers_to_transform=[1]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                       layers_to_transform=[1]))
    theirs_hosts = {n[len("base_model.model."):] for n, m in theirs.named_modules()
                    if hasattr(m, "lora_A") and hasattr(m, "base_layer") and len(m.lora_A)}
    assert {n for n, _ in ours.hosts()} == theirs_hosts == {"model.layers.1.self_attn.q_proj",
                                                           "model.layers.1.self_attn.v_proj"}
    with pytest.raises(gf.GraftingError, match="layers_to_transform"):
        gf.adapt(copy.deepcopy(base), gf.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))


def test_exclude_modules():
    model = gf.adapt(Net(), gf.LoraConfig(target_modules="all-linear", exclude_modules=["mlp.0", "mlp.2", "classifier"]))
    assert sorted(n for n, _ in model.hosts()) == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj",
                                                    "layers.1.v_proj"]


@pytest.mark.parametrize("fields,needle", [
    ({"layers_to_transform": "first"}, "layers_to_transform"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_alhpa": 3}, "did you mean 'lora_alpha'"),
    ({"init_lora_weights": "gausian"}, "did you mean 'gaussian'"),
    ({"use_dora": "yes"}, "use_dora"),
])
def test_bad_config_fields_name_the_field(fields, needle):
    with pytest.raises(gf.GraftingError, match=needle):
        gf.LoraConfig(target_modules=["q_proj"], **fields)


def test_modules_to_save_entry_that_matches_nothing_is_named_even_beside_a_task_head():
    from transformers import BertConfig, BertForSequenceClassification
    base = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2))
    with pytest.raises(gf.GraftingError, match="'nothere'"):
        gf.adapt(base, gf.LoraConfig(target_modules=["query"], task_type="SEQ_CLS", modules_to_save=["nothere"]))


def test_deeply_nested_adapter_config_is_an_error_not_a_recursion(tmp_path):
    gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"])).save_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(gf.GraftingError, match="adapter_config.json"):
        gf.load(Net(), tmp_path / "a")


def test_unknown_peft_type_lists_what_grafting_reads(tmp_path):
    gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"])).save_adapter(tmp_path / "a")
    f = tmp_path / "a" / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "peft_type": "BOFT"}))
    with pytest.raises(gf.GraftingError, match="'BOFT'.*LORA"):
        gf.load(Net(), tmp_path / "a")
