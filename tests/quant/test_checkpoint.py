"""bitsandbytes 4-bit checkpoints: read and written without bitsandbytes, checked against transformers +
bitsandbytes both ways, and peft QLoRA adapters crossing between the two bases."""

from __future__ import annotations

import json

import pytest
import torch

import bnb_reference  # noqa: F401  (bitsandbytes' reference kernels on every CPU: see the module)

import grafting as gf
from grafting.quant import NF4Linear
from grafting.quant.checkpoint import from_pretrained, save_pretrained
from grafting.quant.model import quantize

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def tiny(arch: str, path):
    torch.manual_seed(0)
    if arch == "llama":  # grouped-query attention, tied embeddings (as SmolLM2)
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    else:  # GPT-2: Conv1D layers, weights stored (in, out)
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32)
        model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    return path


def bnb_config(**kw):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32, **kw)


def bnb_model(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(**kw),
                                                             device_map="cpu")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def checkpoints(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    fp = tiny(request.param, root / "fp")
    bnb = bnb_model(fp)
    bnb.save_pretrained(root / "bnb4")
    return request.param, fp, root / "bnb4", bnb


@torch.no_grad()
def test_bitsandbytes_checkpoint_reads_with_equal_logits(checkpoints):
    _, _, bnb_dir, bnb = checkpoints
    ours = from_pretrained(bnb_dir)
    assert sum(isinstance(m, NF4Linear) for m in ours.modules()) == \
        sum(type(m).__name__ == "Linear4bit" for m in bnb.modules()) > 0
    assert torch.equal(ours(IDS).logits, bnb(IDS).logits)


@torch.no_grad()
def test_grafting_checkpoint_loads_in_transformers_with_equal_logits(checkpoints, tmp_path):
    _, fp, _, bnb = checkpoints
    model = quantize(transformers.AutoModelForCausalLM.from_pretrained(fp))  # quantized here, not by bnb
    assert torch.equal(model(IDS).logits, bnb(IDS).logits)
    save_pretrained(model, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert type(back.get_output_embeddings()).__name__ == "Linear" or hasattr(back, "lm_head")
    assert torch.equal(back(IDS).logits, model(IDS).logits)
    again = from_pretrained(tmp_path / "ours")  # and round trip through grafting alone
    assert torch.equal(again(IDS).logits, model(IDS).logits)


def targets(arch):
    return ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_proj"]


@torch.no_grad()
def test_peft_qlora_adapter_crosses_both_ways(checkpoints, tmp_path):
    peft = pytest.importorskip("peft")
    arch, _, bnb_dir, _ = checkpoints
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets(arch), init_lora_weights=False)
    theirs = peft.get_peft_model(bnb_model(bnb_dir.parent / "fp"), cfg)
    theirs.save_pretrained(tmp_path / "peft_adapter")
    ours = gf.load(from_pretrained(bnb_dir), tmp_path / "peft_adapter")
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=1e-5)

    mine = gf.adapt(from_pretrained(bnb_dir), gf.LoraConfig(r=3, lora_alpha=6, target_modules=targets(arch),
                                                             init_lora_weights=False))
    mine.save_adapter(tmp_path / "ours_adapter")
    loaded = peft.PeftModel.from_pretrained(bnb_model(bnb_dir.parent / "fp"), tmp_path / "ours_adapter")
    torch.testing.assert_close(loaded(IDS).logits, mine(IDS).logits, atol=1e-5, rtol=1e-5)


def edited(src, dst, change):
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    change(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("change,message", [
    (lambda q: q.update(bnb_4bit_quant_type="fp4"), "'fp4'; grafting supports 'nf4' only"),
    (lambda q: q.update(load_in_8bit=True, load_in_4bit=False), "8-bit"),
    (lambda q: q.update(quant_method="gptq"), "'gptq'"),
])
def test_unsupported_quantization_configs_say_which(checkpoints, tmp_path, change, message):
    _, _, bnb_dir, _ = checkpoints
    with pytest.raises(gf.GraftingError, match=message):
        from_pretrained(edited(bnb_dir, tmp_path / "x", change))


def test_a_different_block_size_loads_and_bad_tensors_are_named(checkpoints, tmp_path):
    arch, fp, _, _ = checkpoints
    model = quantize(transformers.AutoModelForCausalLM.from_pretrained(fp), block_size=128)
    save_pretrained(model, tmp_path / "b128")
    assert torch.equal(from_pretrained(tmp_path / "b128")(IDS).logits, model(IDS).logits)

    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "b128" / "model.safetensors")
    key = next(k for k in tensors if k.endswith(".weight.absmax"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, tmp_path / "b128" / "model.safetensors")
    with pytest.raises(gf.GraftingError, match=key.replace(".", r"\.")):
        from_pretrained(tmp_path / "b128")


def test_a_block_size_bitsandbytes_does_not_write_is_named(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    _, _, bnb_dir, _ = checkpoints
    shutil.copytree(bnb_dir, tmp_path / "odd")
    tensors = load_file(tmp_path / "odd" / "model.safetensors")
    key = next(k for k in tensors if k.endswith("quant_state.bitsandbytes__nf4"))
    state = json.loads(bytes(tensors[key].tolist()).decode())
    state["blocksize"] = 48
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(tensors, tmp_path / "odd" / "model.safetensors")
    with pytest.raises(gf.GraftingError, match="blocksize 48 is not one of"):
        from_pretrained(tmp_path / "odd")


def test_a_plain_checkpoint_is_refused_and_saving_needs_nf4_layers(checkpoints, tmp_path):
    _, fp, _, _ = checkpoints
    with pytest.raises(gf.GraftingError, match="no quantization_config"):
        from_pretrained(fp)
    with pytest.raises(gf.GraftingError, match="no NF4 layer"):
        save_pretrained(transformers.AutoModelForCausalLM.from_pretrained(fp), tmp_path / "y")


@torch.no_grad()
def test_sharded_checkpoints_and_a_resave_leaves_no_stale_shards(checkpoints, tmp_path):
    _, fp, _, bnb = checkpoints
    model = quantize(transformers.AutoModelForCausalLM.from_pretrained(fp))
    save_pretrained(model, tmp_path / "q", shard_size=40_000)
    shards = sorted(p.name for p in (tmp_path / "q").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "q" / "model.safetensors.index.json").is_file()
    assert torch.equal(from_pretrained(tmp_path / "q")(IDS).logits, bnb(IDS).logits)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert torch.equal(theirs(IDS).logits, bnb(IDS).logits)
    (tmp_path / "q" / "notes.txt").write_text("kept")
    save_pretrained(model, tmp_path / "q")  # now one file: the old shards and index must go
    assert sorted(p.name for p in (tmp_path / "q").iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert (tmp_path / "q" / "notes.txt").read_text() == "kept"
    assert torch.equal(from_pretrained(tmp_path / "q")(IDS).logits, bnb(IDS).logits)
