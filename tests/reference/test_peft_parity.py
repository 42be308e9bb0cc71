"""Numerical parity with ``peft`` (fp32), in both directions of the on-disk format.

(a) peft writes an adapter, grafting loads it: outputs equal peft's.
(b) grafting writes an adapter, ``peft.PeftModel.from_pretrained`` loads it: outputs equal grafting's.

Every adapter is perturbed after creation (B non-zero, DoRA magnitudes scaled, modules_to_save copies and
trained biases moved), and each test first checks that the adapter really changes the base model's output,
so a loader that silently drops tensors cannot pass.
"""

from __future__ import annotations

import copy

import pytest
import torch

import grafting as gf
from toys import make_toy

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")

ATOL, RTOL = 1e-5, 1e-5
VOCAB = 100


# ---- models ---------------------------------------------------------------------------------------------------
def make_hf(name: str):
    torch.manual_seed(1)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    elif name == "bert":
        cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                                      num_labels=3)
        model = transformers.BertForSequenceClassification(cfg)
    elif name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                                       max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(name)
    return model.eval()


def make_model(name: str):
    """(base model, input batch) for a model name: ``toy-<kind>`` or an HF architecture."""
    if name.startswith("toy-"):
        model = make_toy(name[4:]).eval()
        return model, model.make_input()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    return make_hf(name), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(model, batch) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(batch, dict):
            return model(**batch).logits
        return model(batch)


def perturb(model, scale: float = 0.2, seed: int = 123) -> None:
    """Move every trainable parameter (adapter factors, magnitudes, saved copies, trained biases)."""
    g = torch.Generator().manual_seed(seed)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing trainable to perturb"
    with torch.no_grad():
        for name, p in trainable:
            noise = torch.randn(p.shape, generator=g)
            if "magnitude" in name:
                p.mul_(1.0 + scale * noise.abs())
            else:
                p.add_(noise * scale)


# ---- cases: (model name, LoraConfig fields shared by peft and grafting) -----------------------------------------
GPT2_T = ["c_attn", "c_proj", "c_fc"]
LLAMA_T = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "toy-linear-lora": ("toy-linear", {"target_modules": ["target"]}),
    "toy-linear-dora": ("toy-linear", {"target_modules": ["target"], "use_dora": True}),
    "toy-linear-mts-bias_all": ("toy-linear", {"target_modules": ["target"], "modules_to_save": ["head"],
                                               "bias": "all"}),
    "toy-conv1d-lora": ("toy-conv1d", {"target_modules": ["target"], "fan_in_fan_out": True}),
    "toy-conv1d-dora": ("toy-conv1d", {"target_modules": ["target"], "fan_in_fan_out": True, "use_dora": True}),
    "toy-conv2d-lora": ("toy-conv2d", {"target_modules": ["target"]}),
    "toy-conv2d-dora": ("toy-conv2d", {"target_modules": ["target"], "use_dora": True}),
    "toy-conv2d-bias_lora_only": ("toy-conv2d", {"target_modules": ["target"], "bias": "lora_only"}),
    "toy-embedding-lora": ("toy-embedding", {"target_modules": ["target"]}),
    "toy-embedding-dora": ("toy-embedding", {"target_modules": ["target"], "use_dora": True}),
    "gpt2-lora-list": ("gpt2", {"target_modules": GPT2_T}),
    "gpt2-rslora": ("gpt2", {"target_modules": GPT2_T, "use_rslora": True}),
    "gpt2-dora": ("gpt2", {"target_modules": GPT2_T, "use_dora": True}),
    "gpt2-regex": ("gpt2", {"target_modules": r".*\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)"}),
    "gpt2-all-linear": ("gpt2", {"target_modules": "all-linear"}),
    "gpt2-bias_all": ("gpt2", {"target_modules": GPT2_T, "bias": "all"}),
    "gpt2-bias_lora_only": ("gpt2", {"target_modules": ["c_attn"], "bias": "lora_only"}),
    "bert-lora-mts": ("bert", {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
    "bert-patterns": ("bert", {"target_modules": ["query", "value"], "modules_to_save": ["classifier"],
                               # "layer\.0" matches no module name *at its end*, so it must be ignored (PEFT's rule)
                               "rank_pattern": {r"layer\.0": 9, "query": 4, r"layer\.1\.attention\.self\.value": 2},
                               "alpha_pattern": {"value": 32, r"layer\.0\.attention\.self\.query": 3}}),
    "bert-dora-seqcls": ("bert", {"target_modules": ["query", "value", "dense"], "use_dora": True,
                                  "task_type": "SEQ_CLS"}),
    "bert-bias_all": ("bert", {"target_modules": ["query", "value"], "modules_to_save": ["classifier"],
                               "bias": "all"}),
    "llama-lora-embed": ("llama", {"target_modules": [*LLAMA_T, "embed_tokens"]}),
    "llama-dora-embed": ("llama", {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "use_dora": True}),
    "llama-rslora-patterns": ("llama", {"target_modules": LLAMA_T, "use_rslora": True,
                                        "rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 5},
                                        "alpha_pattern": {r"layers\.0\.self_attn\.q_proj": 7}}),
    "llama-all-linear": ("llama", {"target_modules": "all-linear"}),
    "llama-regex-gaussian": ("llama", {"target_modules": r"model\.layers\.1\.self_attn\.(q|k|v)_proj",
                                       "init_lora_weights": "gaussian"}),
}
BASE_FIELDS = {"r": 8, "lora_alpha": 16}


def fields(case: str) -> tuple[str, dict]:
    model_name, kw = CASES[case]
    return model_name, {**BASE_FIELDS, **kw}


def peft_config(kw: dict):
    return peft.LoraConfig(**kw)


def gf_config(kw: dict):
    return gf.LoraConfig(**kw)


def assert_changes_base(base_out: torch.Tensor, adapted_out: torch.Tensor) -> None:
    assert not torch.allclose(base_out, adapted_out, atol=1e-3), "the adapter does not change the output"


def peft_written(case: str, path, seed: int = 123):
    """(peft model, untouched base copy, batch): a perturbed peft adapter saved at ``path``."""
    model_name, kw = fields(case)
    base, batch = make_model(model_name)
    fresh = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft_config(kw))
    perturb(pm, seed=seed)
    pm.eval()
    pm.save_pretrained(str(path))
    return pm, fresh, batch


# ---- (a) peft writes, grafting reads ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_grafting_loads_peft_adapter(case, tmp_path):
    pm, fresh, batch = peft_written(case, tmp_path / "peft")
    base_out = run(copy.deepcopy(fresh), batch)
    expected = run(pm, batch)
    assert_changes_base(base_out, expected)
    gm = gf.load(fresh, tmp_path / "peft").eval()
    torch.testing.assert_close(run(gm, batch), expected, atol=ATOL, rtol=RTOL)


# ---- (b) grafting writes, peft reads ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_grafting_adapter(case, tmp_path):
    model_name, kw = fields(case)
    base, batch = make_model(model_name)
    fresh = copy.deepcopy(base)
    base_out = run(copy.deepcopy(base), batch)
    gm = gf.adapt(base, gf_config(kw))
    perturb(gm)
    gm.eval()
    expected = run(gm, batch)
    assert_changes_base(base_out, expected)
    gm.save_adapter(tmp_path / "gf")
    pm = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "gf")).eval()
    torch.testing.assert_close(run(pm, batch), expected, atol=ATOL, rtol=RTOL)


def test_peft_reads_what_grafting_wrote_tensor_for_tensor(tmp_path):
    """Beyond outputs: every tensor grafting writes lands in peft's model unchanged, and none is left out."""
    _, kw = fields("bert-patterns")
    base, _ = make_model("bert")
    fresh = copy.deepcopy(base)
    gm = gf.adapt(base, gf_config({**kw, "use_dora": True, "bias": "lora_only"}))
    perturb(gm)
    gm.save_adapter(tmp_path / "gf")
    pm = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "gf"))
    from safetensors.torch import load_file
    written = load_file(str(tmp_path / "gf" / "adapter_model.safetensors"))
    theirs = peft.get_peft_model_state_dict(pm)
    assert sorted(written) == sorted(theirs)
    for key, t in written.items():
        torch.testing.assert_close(theirs[key], t, atol=0, rtol=0, msg=key)


# ---- several peft adapters in one grafting model, by name ---------------------------------------------------------
def test_named_peft_adapters_switch(tmp_path):
    pms, batch, fresh = {}, None, None
    for name, (case, seed) in {"plain": ("gpt2-lora-list", 1), "dora": ("gpt2-dora", 2),
                               "some": ("gpt2-regex", 3)}.items():
        pms[name], fresh, batch = peft_written(case, tmp_path / name, seed=seed)
    gm = gf.AdaptedModel(fresh)
    for name in pms:
        gm.load_adapter(tmp_path / name, name=name)
    gm.eval()
    outs = {}
    for name, pm in pms.items():
        gm.set_active(name)
        outs[name] = run(pm, batch)
        torch.testing.assert_close(run(gm, batch), outs[name], atol=ATOL, rtol=RTOL)
    assert not torch.allclose(outs["plain"], outs["dora"], atol=1e-3)


# ---- merging ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["gpt2-lora-list", "gpt2-dora", "llama-dora-embed", "toy-conv2d-dora",
                                  "toy-embedding-dora", "bert-lora-mts"])
def test_merge_and_unload_matches_peft(case, tmp_path):
    pm, fresh, batch = peft_written(case, tmp_path / "peft")
    unmerged = run(pm, batch)
    gm = gf.load(fresh, tmp_path / "peft").eval()
    peft_plain = pm.merge_and_unload().eval()
    gf_plain = gm.merge_and_unload().eval()
    expected = run(peft_plain, batch)
    torch.testing.assert_close(expected, unmerged, atol=1e-4, rtol=1e-4)  # peft itself is consistent
    torch.testing.assert_close(run(gf_plain, batch), expected, atol=ATOL, rtol=RTOL)
    theirs = dict(peft_plain.state_dict())
    ours = dict(gf_plain.state_dict())
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=RTOL, msg=key)


# ---- generation -------------------------------------------------------------------------------------------------
def test_generate_matches_peft(tmp_path):
    pm, fresh, batch = peft_written("gpt2-lora-list", tmp_path / "peft", seed=7)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    plain = copy.deepcopy(fresh)
    with torch.no_grad():
        base_tokens = plain.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
        expected = pm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
        gm = gf.load(fresh, tmp_path / "peft").eval()
        got = gm.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    assert expected.shape == (2, 7 + 5)
    assert not torch.equal(base_tokens, expected), "the adapter does not change generation"
    assert torch.equal(got, expected)
