"""The merge driver end to end: against mergekit tensor by tensor, loading with transformers, atomic output,
dtypes, tokenizers, errors, and ``graft merge``."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from grafting.errors import GraftingError
from grafting.merge import base as merge_base
from grafting.merge.base import WEIGHT, merge_method, merge_methods
from grafting.merge.config import load_config
from grafting.merge.io import open_input
from grafting.merge.run import merge


def _tokenizer(path, order_seed: int, template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(99)]
    if order_seed:  # the same words under other ids: a different tokenizer of the same size
        words = [words[i] for i in torch.randperm(99, generator=torch.Generator().manual_seed(order_seed))]
    vocab = {w: i for i, w in enumerate(words)} | {"[UNK]": 99}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    if template:
        fast.chat_template = template
    fast.save_pretrained(path)


TEMPLATE_A = "{% for m in messages %}A: {{ m['content'] }}{% endfor %}"
TEMPLATE_B = "{% for m in messages %}B: {{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and two fine-tunes (perturbed copies) for GPT-2 and LLaMA; sharded, bf16 and broken variants."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    families = {
        "gpt2": GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=32)),
        "llama": LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                              num_attention_heads=2, num_key_value_heads=2, vocab_size=100,
                                              max_position_embeddings=32)),
    }
    for fam, model in families.items():
        model.save_pretrained(root / f"{fam}_base")
        for i, name in enumerate(("a", "b"), 1):
            ft = copy.deepcopy(model)
            g = torch.Generator().manual_seed(10 * i)
            with torch.no_grad():
                for p in ft.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
            ft.save_pretrained(root / f"{fam}_{name}")
            if fam == "llama" and name == "a":
                ft.save_pretrained(root / "llama_a_sharded", max_shard_size="40KB")
            if fam == "llama" and name == "b":
                ft.to(torch.bfloat16).save_pretrained(root / "llama_b_bf16")
                ft.to(torch.bfloat16).float().save_pretrained(root / "llama_b_rounded")
    _tokenizer(root / "llama_base", 0, TEMPLATE_A)
    _tokenizer(root / "llama_a", 7, TEMPLATE_B)
    _tokenizer(root / "llama_b", 0, TEMPLATE_A)
    return root


def _mergekit(cfg: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(copy.deepcopy(cfg)), str(out),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=0))


def _tensors(path) -> dict:
    inp = open_input(path)
    return {n: inp.get(n) for n in inp.names()}


def _configs(z):
    p = lambda name: str(z / name)  # noqa: E731
    cfgs = {
        # a gradient over layers, a filter conditional with a catch-all, a base listed among the inputs
        "linear_gradient_filter": {
            "merge_method": "linear", "base_model": p("llama_base"), "dtype": "float32",
            "models": [{"model": p("llama_base"), "parameters": {"weight": 1.0}},
                       {"model": p("llama_a_sharded"), "parameters": {"weight": [0.2, 0.8]}},
                       {"model": p("llama_b"), "parameters": {"weight": [{"filter": "mlp", "value": 0.5},
                                                                          {"value": 0.3}]}}]},
        # a model-level weight overriding the global one, lambda as a gradient
        "task_arithmetic_override": {
            "merge_method": "task_arithmetic", "base_model": p("gpt2_base"),
            "parameters": {"weight": 0.4, "lambda": [0.6, 1.2]},
            "models": [{"model": p("gpt2_a"), "parameters": {"weight": 1.0}}, {"model": p("gpt2_b")}]},
        "ties_density": {
            "merge_method": "ties", "base_model": p("llama_base"),
            "parameters": {"density": [0.3, 0.9], "weight": [{"filter": "self_attn", "value": 0.7}, {"value": 1}]},
            "models": [{"model": p("llama_a"), "parameters": {"density": 0.5}}, {"model": p("llama_b")}]},
    }
    extra = {
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": p("gpt2_base"),
                        "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05},
                        "models": [{"model": p("gpt2_a")}, {"model": p("gpt2_b")}]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": p("llama_base"),
                             "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05},
                             "models": [{"model": p("llama_a")}, {"model": p("llama_b")}]},
        "slerp": {"merge_method": "slerp", "base_model": p("llama_base"),
                  "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.7]}, {"value": 0.4}]},
                  "models": [{"model": p("llama_a")}]},
        "model_stock": {"merge_method": "model_stock", "base_model": p("gpt2_base"),
                        "models": [{"model": p("gpt2_a")}, {"model": p("gpt2_b")}]},
    }
    registered = merge_methods()
    cfgs.update({k: v for k, v in extra.items() if v["merge_method"] in registered})
    return cfgs


def test_matches_mergekit_tensor_by_tensor(zoo, tmp_path):
    cfgs = _configs(zoo)
    assert {"linear_gradient_filter", "task_arithmetic_override", "ties_density"} <= set(cfgs)
    for key, cfg in cfgs.items():
        ours, theirs = tmp_path / f"{key}_ours", tmp_path / f"{key}_mk"
        _mergekit(cfg, theirs)
        result = merge(cfg, ours, progress=False)
        a, b = _tensors(ours), _tensors(theirs)
        assert a.keys() == b.keys(), key
        assert result.tensors == len(a) and result.method == cfg["merge_method"]
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key} {name}: {m}")
        base = _tensors(cfg["base_model"])
        assert any(not torch.equal(a[n], base[n]) for n in a), key  # the merge did something


def test_output_loads_with_transformers_and_runs(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _configs(zoo)["ties_density"]
    out = tmp_path / "merged"
    result = merge(cfg, out, progress=False, shard_size=60_000)
    assert len([f for f in result.files if f.endswith(".safetensors")]) > 1  # sharded output
    assert result.bytes_written == sum(f.stat().st_size for f in out.iterdir())
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    merged = _tensors(out)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, merged[name], rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("w1 w2 w3 w40", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert logits.shape == (1, 4, 100) and torch.isfinite(logits).all()
    single = merge(cfg, tmp_path / "single", progress=False)
    assert single.files.count("model.safetensors") == 1
    assert all(torch.equal(merged[n], t) for n, t in _tensors(tmp_path / "single").items())


def test_crash_mid_merge_leaves_nothing(zoo, tmp_path):
    @merge_method("_boom_test", params=[WEIGHT], needs_base=True, paper="-", summary="-")
    def _boom(group, params):
        if ".layers.2." in group.name:
            raise RuntimeError("boom")
        return group.base

    cfg = {"merge_method": "_boom_test", "base_model": str(zoo / "llama_base"),
           "models": [{"model": str(zoo / "llama_a"), "parameters": {"weight": 1}}]}
    try:
        with pytest.raises(RuntimeError, match="boom") as err:
            merge(cfg, tmp_path / "out", progress=False, shard_size=20_000)  # several shards written first
    finally:
        merge_base._MERGES.pop("_boom_test", None)
    assert any("model.layers.2." in note for note in getattr(err.value, "__notes__", []))
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary directory


def test_mixed_dtypes_warn_and_upcast(zoo, tmp_path):
    def cfg(b):
        return {"merge_method": "task_arithmetic", "base_model": str(zoo / "llama_base"),
                "parameters": {"weight": 0.5},
                "models": [{"model": str(zoo / "llama_a")}, {"model": str(zoo / b)}]}

    with pytest.warns(UserWarning, match="differ in dtype.*bfloat16.*float32"):
        merge(cfg("llama_b_bf16"), tmp_path / "mixed", progress=False)
    merge(cfg("llama_b_rounded"), tmp_path / "rounded", progress=False)
    mixed, rounded = _tensors(tmp_path / "mixed"), _tensors(tmp_path / "rounded")
    assert all(t.dtype == torch.float32 for t in mixed.values())  # the base's dtype
    assert all(torch.equal(mixed[n], rounded[n]) for n in mixed)


def test_out_dtype_casts_and_updates_config(zoo, tmp_path):
    cfg = dict(_configs(zoo)["task_arithmetic_override"], out_dtype="bfloat16")
    merge(cfg, tmp_path / "bf16", progress=False)
    ref = merge(load_config(dict(cfg, out_dtype=None)), tmp_path / "f32", progress=False)  # a config object
    assert ref.tensors > 0
    low, high = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "f32")
    assert all(low[n].dtype == torch.bfloat16 and torch.equal(low[n], high[n].bfloat16()) for n in low)
    conf = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert [conf[k] for k in ("torch_dtype", "dtype") if k in conf] and \
        all(conf[k] == "bfloat16" for k in ("torch_dtype", "dtype") if k in conf)


def test_tokenizer_files_follow_tokenizer_source(zoo, tmp_path):
    from transformers import AutoTokenizer

    cfg = _configs(zoo)["ties_density"]
    merge(cfg, tmp_path / "default", progress=False)
    assert (tmp_path / "default" / "tokenizer.json").read_bytes() == (zoo / "llama_base" / "tokenizer.json").read_bytes()
    with pytest.warns(UserWarning, match="tokenizer of .* differs"):
        merge(dict(cfg, tokenizer_source=str(zoo / "llama_a")), tmp_path / "from_a", progress=False)
    assert (tmp_path / "from_a" / "tokenizer.json").read_bytes() == (zoo / "llama_a" / "tokenizer.json").read_bytes()
    merge(cfg, tmp_path / "none", progress=False, copy_tokenizer=False)
    assert not (tmp_path / "none" / "tokenizer.json").exists() and (tmp_path / "none" / "config.json").exists()
    literal = "{% for m in messages %}merged: {{ m['content'] }}{% endfor %}"
    merge(dict(cfg, chat_template=literal), tmp_path / "literal", progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "literal").chat_template == literal
    merge(dict(cfg, chat_template="auto", tokenizer_source=str(zoo / "llama_a")), tmp_path / "auto", progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "auto").chat_template == TEMPLATE_A  # base and b agree


def test_inputs_must_agree_before_any_merging(zoo, tmp_path):
    state = _tensors(zoo / "llama_a")
    dropped = sorted(state)[3]
    partial = tmp_path / "partial"
    partial.mkdir()
    save_file({k: v for k, v in state.items() if k != dropped}, partial / "model.safetensors")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(zoo / "llama_base"),
           "parameters": {"weight": 1}, "models": [{"model": str(partial)}]}
    with pytest.raises(GraftingError, match=rf"'{dropped}' is in .*llama_base but not in .*partial"):
        merge(cfg, tmp_path / "out", progress=False)
    with pytest.raises(GraftingError, match=r"'model.embed_tokens.weight' has shape \(100, 32\) in .*llama_base "
                                            r"but \(100, 16\) in .*narrow"):
        narrow = tmp_path / "narrow"
        narrow.mkdir()
        save_file({k: (v[:, :16].contiguous() if k == "model.embed_tokens.weight" else v) for k, v in state.items()},
                  narrow / "model.safetensors")
        merge(dict(cfg, models=[{"model": str(narrow)}]), tmp_path / "out", progress=False)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(GraftingError, match="pickle"):
        merge(dict(cfg, models=[{"model": str(pickled)}]), tmp_path / "out", progress=False)
    with pytest.raises(GraftingError, match="needs a base_model"):
        merge(dict(cfg, base_model=None, models=[{"model": str(zoo / "llama_a")}]), tmp_path / "out")
    # a weight given only for some tensors fails in planning, naming the first tensor it misses
    only_mlp = dict(cfg, parameters={}, models=[{"model": str(zoo / "llama_a"),
                                                 "parameters": {"weight": [{"filter": "mlp", "value": 1}]}}])
    with pytest.raises(GraftingError, match=r"llama_a'?: parameter 'weight' has no value for tensor '(?![^']*mlp)"):
        merge(only_mlp, tmp_path / "out", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(GraftingError, match="exists and is not empty"):
        merge(_configs(zoo)["ties_density"], tmp_path / "full", progress=False)
    assert not (tmp_path / "out").exists()


def test_seed_drives_random_methods(zoo, tmp_path):
    cfg = {"merge_method": "dare_ties", "base_model": str(zoo / "gpt2_base"),
           "parameters": {"weight": 0.5, "density": 0.5},
           "models": [{"model": str(zoo / "gpt2_a")}, {"model": str(zoo / "gpt2_b")}]}
    runs = [_tensors(merge(cfg, tmp_path / f"s{i}", seed=s, progress=False).output_dir)
            for i, s in enumerate((1, 1, 2))]
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(runs[0][name], runs[1][name]) and not torch.equal(runs[0][name], runs[2][name])


def test_graft_merge_cli(zoo, tmp_path, capsys):
    from grafting.cli.merge import parse_size, register

    parser = argparse.ArgumentParser(prog="graft")
    sub = parser.add_subparsers(dest="command")
    merge_parser = register(sub)
    conf = tmp_path / "merge.yaml"
    conf.write_text(yaml.safe_dump(_configs(zoo)["task_arithmetic_override"]))
    args = parser.parse_args(["merge", str(conf), str(tmp_path / "out"), "--no-progress", "--seed", "3",
                              "--out-shard-size", "50K", "--no-copy-tokenizer"])
    assert args.func(args) == 0
    assert "merged" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").exists() and (out / "mergekit_config.yml").exists()
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == yaml.safe_load(conf.read_text())
    assert parse_size("5B") == 5 * 10**9 and parse_size("500M") == 5 * 10**8 and parse_size("1000") == 1000
    assert parse_size("64KB") == 64_000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")
    helptext = merge_parser.format_help()
    for m in merge_methods().values():
        assert f"{m.name}: {m.summary}" in helptext and m.paper in helptext
        for p in m.params:
            assert f"{p.name} ({p.scope}, {p.type.__name__}, " in helptext
