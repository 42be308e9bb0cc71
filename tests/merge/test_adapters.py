"""Adapters merged into one adapter (exact concatenation, weight space + truncated SVD) and adapters as inputs.

Adapters are written by peft on tiny models built from configs; merged adapters are loaded back with peft and
compared with the base model whose weights carry the combination of peft's own ΔW."""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from grafting.errors import GraftingError  # noqa: E402
from grafting.merge import ModelTensor, TensorGroup, get_merge_method, tensor_generator  # noqa: E402
from grafting.merge.adapters import AdapterInput, merge_adapters  # noqa: E402


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def peft_adapter(base, path, seed, **kw):
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw))
    model.save_pretrained(path)
    deltas = {}
    for name, mod in model.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer) and "default" in mod.lora_A:
            deltas[name.replace("base_model.model.", "")] = mod.get_delta_weight("default").detach()
    return deltas


def with_deltas(base, deltas: dict):
    model = copy.deepcopy(base)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, dw in deltas.items():
            mods[name].weight += dw
    return model


def peft_logits(base, adapter_dir, ids):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    base = tiny_llama()
    root = tmp_path_factory.mktemp("adapters")
    d1 = peft_adapter(base, root / "a1", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    d2 = peft_adapter(base, root / "a2", 2, r=2, lora_alpha=3, use_rslora=True,
                      target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 3})
    return base, root / "a1", root / "a2", d1, d2


def combine(d1, d2, c1, c2):
    out = {k: c1 * v for k, v in d1.items()}
    for k, v in d2.items():
        out[k] = out.get(k, 0) + c2 * v
    return out


def test_task_arithmetic_of_lora_adapters_is_exact_by_concatenation(two_adapters, tmp_path):
    base, a1, a2, d1, d2 = two_adapters
    res = merge_adapters([a1, a2], "task_arithmetic", tmp_path / "m", params=[{"weight": 0.7}, {"weight": -0.4}],
                         global_params={"lambda": 1.5})
    assert res.exact and not res.energy
    # ranks add where both adapters adapt a module: q_proj 4 + 2; v_proj 4; o_proj 3 (a2's rank_pattern)
    assert res.ranks["model.layers.0.self_attn.q_proj"] == 6
    assert res.ranks["model.layers.1.self_attn.v_proj"] == 4 and res.ranks["model.layers.0.self_attn.o_proj"] == 3
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = with_deltas(base, combine(d1, d2, 1.5 * 0.7, 1.5 * -0.4))(ids).logits
    torch.testing.assert_close(peft_logits(base, tmp_path / "m", ids), expected, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["r"] == cfg["lora_alpha"] == 6


def test_linear_is_the_weighted_mean_of_the_deltas(two_adapters, tmp_path):
    base, a1, a2, d1, d2 = two_adapters
    merge_adapters([a1, a2], "linear", tmp_path / "m", params=[{"weight": 1.0}, {"weight": 3.0}])
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    expected = with_deltas(base, combine(d1, d2, 0.25, 0.75))(ids).logits
    torch.testing.assert_close(peft_logits(base, tmp_path / "m", ids), expected, rtol=1e-5, atol=1e-5)


def test_linear_without_normalize_is_refused_when_it_would_scale_the_base(two_adapters, tmp_path):
    _, a1, a2, _, _ = two_adapters
    with pytest.raises(GraftingError, match="sum of the weights"):
        merge_adapters([a1, a2], "linear", tmp_path / "m", params=[{"weight": 1.0}, {"weight": 3.0}],
                       global_params={"normalize": False})
    assert not (tmp_path / "m").exists()


def test_weight_space_merge_at_full_rank_is_the_dense_merge(two_adapters, tmp_path):
    base, a1, a2, d1, d2 = two_adapters
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    res = merge_adapters([a1, a2], "ties", tmp_path / "m", params=params, rank=32)
    assert not res.exact and all(abs(e - 1.0) < 1e-6 for e in res.energy.values())
    ties = get_merge_method("ties")
    gparams = {p.name: p.default for p in ties.global_params() if not p.required}
    merged = {}
    for module in res.ranks:
        name = module + ".weight"
        like = (d1.get(module) if module in d1 else d2[module])
        dws = [d.get(module, torch.zeros_like(like)) for d in (d1, d2)]
        defaults = {q.name: q.default for q in ties.model_params() if not q.required}
        group = TensorGroup(name, [ModelTensor(str(a), dw, {**defaults, **p}) for a, dw, p in zip((a1, a2), dws, params)],
                            base=torch.zeros_like(dws[0]), generator=tensor_generator(0, name))
        merged[module] = ties(group, gparams)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(peft_logits(base, tmp_path / "m", ids), with_deltas(base, merged)(ids).logits,
                               rtol=1e-4, atol=1e-4)


def test_truncation_keeps_the_reported_energy(two_adapters, tmp_path):
    base, a1, a2, d1, d2 = two_adapters
    params = [{"weight": 1.0, "density": 0.7}, {"weight": 1.0, "density": 0.7}]
    full = merge_adapters([a1, a2], "ties", tmp_path / "full", params=params, rank=32)
    cut = merge_adapters([a1, a2], "ties", tmp_path / "cut", params=params, rank=3)
    picked = merge_adapters([a1, a2], "ties", tmp_path / "e", params=params, energy=0.9)
    from safetensors.torch import load_file
    tf, tc = (load_file(str(p / "adapter_model.safetensors")) for p in (tmp_path / "full", tmp_path / "cut"))
    for module, kept in cut.energy.items():
        key = f"base_model.model.{module}.lora_"
        dense = tf[key + "B.weight"] @ tf[key + "A.weight"]
        low = tc[key + "B.weight"] @ tc[key + "A.weight"]
        # Eckart-Young: the squared error of the best rank-k approximation is the energy left out
        err = float((dense - low).pow(2).sum() / dense.pow(2).sum())
        assert abs(err - (1 - kept)) < 1e-4 and cut.ranks[module] == 3
        s = torch.linalg.svdvals(dense).double().pow(2)
        frac = torch.cumsum(s, 0) / s.sum()
        k = picked.ranks[module]
        assert frac[k - 1] >= 0.9 - 1e-9 and (k == 1 or frac[k - 2] < 0.9)
    assert full.ranks != cut.ranks


def test_bad_inputs_are_refused(two_adapters, tmp_path):
    base, a1, a2, _, _ = two_adapters
    dora = tmp_path / "dora"
    peft_adapter(base, dora, 3, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(GraftingError, match="give the base model .*DoRA"):
        merge_adapters([a1, dora], "ties", tmp_path / "m", params=[{"weight": 1.0}, {"weight": 1.0}])
    with pytest.raises(GraftingError, match="rank or energy, not both"):
        merge_adapters([a1, a2], "ties", tmp_path / "m", rank=2, energy=0.5)
    with pytest.raises(GraftingError, match="unknown merge_method 'nope'"):
        merge_adapters([a1, a2], "nope", tmp_path / "m")
    with pytest.raises(GraftingError, match="2 adapters"):
        merge_adapters([a1, a2], "ties", tmp_path / "m", params=[{"weight": 1.0}])
    assert not (tmp_path / "m").exists()


def save_model(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_yaml_with_adapter_entries_writes_an_adapter_or_a_full_model(two_adapters, tmp_path):
    import yaml

    from grafting.merge.run import merge
    base, a1, a2, d1, d2 = two_adapters
    base_dir = save_model(base, tmp_path / "base")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    cfg = {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5},
           "models": [{"model": str(a1), "parameters": {"weight": 1.0}},
                      {"model": str(a2), "parameters": {"weight": [2.0, 4.0]}}]}  # a gradient over the 2 layers
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    res = merge(tmp_path / "a.yaml", tmp_path / "adapter", progress=False)
    assert res.adapter.exact and (tmp_path / "adapter" / "adapter_config.json").is_file()
    # without a base the depth comes from the adapters' own layer indices: layer 0 -> 2.0, layer 1 -> 4.0
    expected = {k: 0.5 * v for k, v in d1.items()}
    for k, v in d2.items():
        expected[k] = expected.get(k, 0) + 0.5 * (2.0 if ".layers.0." in k else 4.0) * v
    torch.testing.assert_close(peft_logits(base, tmp_path / "adapter", ids), with_deltas(base, expected)(ids).logits,
                               rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file
    merge({**cfg, "dtype": "bfloat16"}, tmp_path / "bf16", progress=False)  # the config's dtype is the output's
    assert {v.dtype for v in load_file(str(tmp_path / "bf16" / "adapter_model.safetensors")).values()} == {
        torch.bfloat16}
    # the same adapters into their base: a full model that transformers loads
    full = {**cfg, "base_model": str(base_dir), "output": {"kind": "model"}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(full))
    merge(tmp_path / "m.yaml", tmp_path / "model", progress=False, copy_tokenizer=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_deltas(base, expected)(ids).logits, rtol=1e-5, atol=1e-5)


def test_an_adapter_over_a_conv1d_base_is_the_base_plus_its_transposed_delta(tmp_path):
    from grafting.merge.io import open_input
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50,
                                                               n_positions=16)).eval()
    base_dir = save_model(gpt2, tmp_path / "gpt2")
    peft_adapter(gpt2, tmp_path / "lora", 5, r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    folded = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), str(tmp_path / "lora")).merge_and_unload()
    want = folded.state_dict()
    seen = AdapterInput(tmp_path / "lora", open_input(base_dir))
    changed = 0
    for name in seen.names():
        got = seen.get(name)
        torch.testing.assert_close(got, want[name], rtol=1e-6, atol=1e-6)
        changed += not torch.equal(got, gpt2.state_dict()[name])
    assert changed == 4  # c_attn and c_fc in both blocks


def test_extracting_an_adapter_recovers_a_low_rank_fine_tune(tmp_path):
    from grafting.merge.extract import extract_adapter
    from grafting.merge.io import open_input
    base = tiny_llama(1)
    base_dir = save_model(base, tmp_path / "base")
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, mod in tuned.named_modules():
            if name.endswith(("q_proj", "down_proj")):
                out_f, in_f = mod.weight.shape
                mod.weight += 0.05 * torch.randn(out_f, 3, generator=g) @ torch.randn(3, in_f, generator=g)
        tuned.model.norm.weight += 0.01  # not a linear weight: reported, not captured
    tuned_dir = save_model(tuned, tmp_path / "tuned")
    res = extract_adapter(open_input(base_dir), open_input(tuned_dir), tmp_path / "ex", energy=0.999,
                          base_dir=base_dir)
    assert set(res.ranks.values()) == {3} and len(res.ranks) == 4  # q_proj and down_proj of both layers
    assert all(e > 0.999 for e in res.energy.values())
    assert list(res.not_captured) == ["model.norm.weight"]
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    expect = copy.deepcopy(tuned)
    with torch.no_grad():
        expect.model.norm.weight -= 0.01
        want = expect(ids).logits
    torch.testing.assert_close(peft_logits(base, tmp_path / "ex", ids), want, rtol=1e-4, atol=1e-4)
    low = extract_adapter(open_input(base_dir), open_input(tuned_dir), tmp_path / "ex1", rank=1, base_dir=base_dir)
    assert set(low.ranks.values()) == {1} and all(e < 0.99 for e in low.energy.values())
    with pytest.raises(GraftingError, match="exactly one of rank"):
        extract_adapter(open_input(base_dir), open_input(tuned_dir), tmp_path / "x", rank=2, energy=0.5)


def test_graft_extract_writes_the_adapter(tmp_path, capsys):
    from grafting.cli.main import main
    base = tiny_llama(2)
    base_dir = save_model(base, tmp_path / "base")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight += 0.1 * torch.randn(32, 1) @ torch.randn(1, 32)
    tuned_dir = save_model(tuned, tmp_path / "tuned")
    assert main(["extract", str(base_dir), str(tuned_dir), str(tmp_path / "ex"), "--rank", "1", "--no-progress"]) == 0
    assert "extracted 1 modules" in capsys.readouterr().out
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tuned(ids).logits
    torch.testing.assert_close(peft_logits(base, tmp_path / "ex", ids), want, rtol=1e-4, atol=1e-4)
    assert main(["extract", str(base_dir), str(tmp_path / "nope"), str(tmp_path / "ex2"), "--rank", "1"]) == 2


def test_conv_and_half_precision_adapters_merge(tmp_path):
    """Where peft's SVD merge fails (Conv2d layers, fp16 adapters): both paths work and peft loads the result."""
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    deltas = []
    for i, r in enumerate((2, 3)):
        d = peft_adapter(base, tmp_path / f"c{i}", 10 + i, r=r, lora_alpha=r, target_modules=["0", "2"])
        f = tmp_path / f"c{i}" / "adapter_model.safetensors"
        save_file({k: v.half() for k, v in load_file(str(f)).items()}, str(f))  # stored in half precision
        m = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / f"c{i}"))
        deltas.append({n.replace("base_model.model.", ""): mod.get_delta_weight("default").detach()
                       for n, mod in m.named_modules() if isinstance(mod, peft.tuners.lora.LoraLayer)})
        assert set(deltas[-1]) == set(d)
    x = torch.randn(2, 3, 9, 9)

    def run(adapter):
        m = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
        with torch.no_grad():
            return m(x)
    merge_adapters([tmp_path / "c0", tmp_path / "c1"], "task_arithmetic", tmp_path / "ta",
                   params=[{"weight": 0.5}, {"weight": 2.0}])
    want = with_deltas(base, {k: 0.5 * deltas[0][k] + 2.0 * deltas[1][k] for k in deltas[0]})
    with torch.no_grad():
        torch.testing.assert_close(run(tmp_path / "ta"), want(x), rtol=1e-4, atol=1e-4)
    res = merge_adapters([tmp_path / "c0", tmp_path / "c1"], "ties", tmp_path / "ties",
                         params=[{"weight": 1.0, "density": 0.6}, {"weight": 1.0, "density": 0.6}], rank=2)
    assert set(res.ranks.values()) == {2} and all(0 < e < 1 for e in res.energy.values())
    assert torch.isfinite(run(tmp_path / "ties")).all()
    # fp16 in, fp16 out; an explicit dtype wins
    for name, dtype in (("ta", torch.float16), ("ties", torch.float16)):
        assert {v.dtype for v in load_file(str(tmp_path / name / "adapter_model.safetensors")).values()} == {dtype}
    merge_adapters([tmp_path / "c0", tmp_path / "c1"], "task_arithmetic", tmp_path / "ta32",
                   params=[{"weight": 0.5}, {"weight": 2.0}], dtype=torch.float32)
    ta32 = load_file(str(tmp_path / "ta32" / "adapter_model.safetensors"))
    assert {v.dtype for v in ta32.values()} == {torch.float32}
