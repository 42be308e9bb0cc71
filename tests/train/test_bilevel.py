"""graft train with a bilevel: section: AutoLoRA, BiLoRA, BiDoRA end to end on a tiny model, and the guards."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import grafting as gf
from recipe_files import write_recipe
from grafting.train import load_recipe, train

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def bilevel_recipe(tmp_path, model_dir, data, method, out="out", **bilevel):
    path = write_recipe(tmp_path / f"{method}.yaml", model_dir, *data, tmp_path / out, max_steps=6)
    raw = yaml.safe_load(path.read_text())
    raw["adapter"] = {**raw["adapter"], "method": method}
    raw["bilevel"] = {"hypergradient": "darts", "unroll": 2, "outer_lr": 0.05, "outer_fraction": 0.3, **bilevel}
    path.write_text(yaml.safe_dump(raw))
    return path


def peft_outputs_match(adapter_dir, model_dir, ours_model_fn):
    """peft loads the written adapter unchanged and gives grafting's outputs on the same base."""
    base = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    ours = gf.load(transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3),
                   adapter_dir).eval()
    ids = torch.randint(1000, 2000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    return cfg


def test_autolora_finds_ranks_then_retrains_plain_lora(tmp_path, tiny_model_dir, jsonl_data):
    r = bilevel_recipe(tmp_path, tiny_model_dir, jsonl_data, "autolora", retrain_steps=3)
    result = train(r)
    out = tmp_path / "out"
    found = json.loads((out / "ranks.json").read_text())
    assert found["r"] == 4 and set(found["ranks"]) and all(1 <= v <= 4 for v in found["ranks"].values())
    cfg = peft_outputs_match(out / "adapter", tiny_model_dir, None)
    # the written LoRA has exactly the found rank in each layer
    from safetensors.torch import load_file
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    for module, rank in found["ranks"].items():
        key = f"base_model.model.{module}.lora_A.weight"
        assert tensors[key].shape[0] == rank, module
    assert cfg["rank_pattern"] and not cfg["use_dora"]
    for name in ("bilevel.png", "ranks.png", "loss.png", "metrics.jsonl", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("outer") == 3 and kinds.count("inner") == 6 and "retrain" in kinds
    assert result.steps == 6 + 3


@pytest.mark.parametrize("method,hypergradient", [("bilora", "cg"), ("bidora", "darts")])
def test_bilora_and_bidora_train_both_levels_and_export(tmp_path, tiny_model_dir, jsonl_data, method, hypergradient):
    r = bilevel_recipe(tmp_path, tiny_model_dir, jsonl_data, method, hypergradient=hypergradient, iters=2)
    result = train(r)
    out = tmp_path / "out"
    cfg = peft_outputs_match(out / "adapter", tiny_model_dir, None)
    assert cfg["use_dora"] == (method == "bidora")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    outer = [e for e in lines if e["kind"] == "outer"]
    assert len(outer) == 3 and all(e["hypergrad_norm"] > 0 for e in outer)
    assert result.after["loss"] > 0


def test_outer_level_moves_only_the_architecture(tmp_path, tiny_model_dir, jsonl_data):
    """BiLoRA's λ starts at 0; after the run it is not, while the frozen base is untouched."""
    r = bilevel_recipe(tmp_path, tiny_model_dir, jsonl_data, "bilora")
    train(r)
    from safetensors.torch import load_file
    base = transformers.AutoModel.from_pretrained(tiny_model_dir)
    tensors = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    a = [v for k, v in tensors.items() if k.endswith("lora_A.weight")]
    assert a and all(t.abs().sum() > 0 for t in a)  # diag(λ)·Q folded in: λ moved off zero
    again = transformers.AutoModel.from_pretrained(tiny_model_dir)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), again.parameters()))


@pytest.mark.parametrize("change,needle", [
    ({"bilevel": {"hypergradient": "newton"}}, "bilevel.hypergradient"),
    ({"bilevel": {"unrol": 2}}, "did you mean 'bilevel.unroll'"),
    ({"bilevel": {"outer_lr": 0}}, "bilevel.outer_lr"),
])
def test_bad_bilevel_sections_are_refused_before_training(tmp_path, tiny_model_dir, jsonl_data, change, needle):
    r = bilevel_recipe(tmp_path, tiny_model_dir, jsonl_data, "bilora")
    raw = yaml.safe_load(r.read_text())
    raw["bilevel"] = change["bilevel"]
    with pytest.raises(gf.GraftingError, match=needle):
        load_recipe(raw)


def test_method_without_architecture_and_tiny_outer_split(tmp_path, tiny_model_dir, jsonl_data):
    r = bilevel_recipe(tmp_path, tiny_model_dir, jsonl_data, "lora")
    with pytest.raises(gf.GraftingError, match="method 'lora' has no architecture parameters"):
        train(r)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before any training
    r = bilevel_recipe(tmp_path, tiny_model_dir, jsonl_data, "bilora", out="out2", outer_fraction=0.01)
    with pytest.raises(gf.GraftingError, match="the outer split has 1 rows"):
        train(r)
