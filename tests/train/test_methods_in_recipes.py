"""Recipes pick any registered method (adapter.method), the trainer builds optimizer groups from the adapter's
parameter roles and calls the methods' per-step hooks."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import grafting as gf
from recipe_files import write_recipe
from grafting.train import load_recipe, train
from grafting.train import optim as optim_module


def with_adapter(path, **adapter):
    raw = yaml.safe_load(path.read_text())
    raw["adapter"] = {**raw["adapter"], **adapter}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_adapter_method_selects_the_config(tmp_path, tiny_model_dir, jsonl_data):
    r = with_adapter(write_recipe(tmp_path / "r.yaml", tiny_model_dir, *jsonl_data, tmp_path / "out"),
                     method="dora", exact_norm=True)
    cfg = load_recipe(r).adapter_config()
    assert isinstance(cfg, gf.DoraConfig) and cfg.method == "dora" and cfg.exact_norm and cfg.use_dora
    raw = yaml.safe_load(r.read_text())
    raw["adapter"] = {k: v for k, v in raw["adapter"].items() if k not in ("method", "exact_norm")}
    assert load_recipe(raw).adapter_config().method == "lora"  # the default method


@pytest.mark.parametrize("adapter,needle", [
    ({"method": "lorra"}, "unknown adapter method 'lorra'"),
    ({"method": "lora", "exact_norm": True}, "unknown field 'exact_norm'"),
    ({"method": "lora", "use_dora": True}, "build method 'dora', not 'lora'"),
    ({"init_lora_weights": "gausian"}, "did you mean 'gaussian'"),
    ({"init_lora_weights": "corda", "corda_config": {"corda_method": "pca"}}, "corda_method"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights"),
    ({"lora_alpha": 0}, "lora_alpha"),
])
def test_bad_method_sections_name_the_problem(tmp_path, tiny_model_dir, jsonl_data, adapter, needle):
    r = with_adapter(write_recipe(tmp_path / "r.yaml", tiny_model_dir, *jsonl_data, tmp_path / "out"), **adapter)
    with pytest.raises(gf.GraftingError, match=needle):
        load_recipe(r)


def test_group_lr_sets_each_role_s_learning_rate(tmp_path, tiny_model_dir, jsonl_data, monkeypatch):
    r = with_adapter(write_recipe(tmp_path / "r.yaml", tiny_model_dir, *jsonl_data, tmp_path / "out", max_steps=2),
                     method="dora")
    raw = yaml.safe_load(r.read_text())
    raw["optim"] = {"lr": 1e-3, "group_lr": {"architecture": 4e-3}, "head_lr": 2e-3}
    raw["schedule"] = {"name": "constant"}
    r.write_text(yaml.safe_dump(raw))
    seen = {}
    real = optim_module.set_lr

    def record(optimizer, lr, ratios):
        real(optimizer, lr, ratios)
        seen.update({g["role"]: (g["lr"], len(g["params"])) for g in optimizer.param_groups})

    monkeypatch.setattr("grafting.train.trainer.set_lr", record)
    train(r)
    assert seen["weights"][0] == pytest.approx(1e-3)
    assert seen["architecture"][0] == pytest.approx(4e-3)  # DoRA's magnitudes
    assert seen["saved"][0] == pytest.approx(2e-3)  # the classifier head, trained in full
    layers = 2 * 2  # query and value in 2 BERT layers
    assert seen["weights"][1] == 2 * layers and seen["architecture"][1] == layers


def test_group_lr_for_a_role_the_adapter_lacks_is_refused_before_training(tmp_path, tiny_model_dir, jsonl_data):
    r = write_recipe(tmp_path / "r.yaml", tiny_model_dir, *jsonl_data, tmp_path / "out")
    raw = yaml.safe_load(r.read_text())
    raw["optim"]["group_lr"] = {"architecture": 1e-3}  # plain LoRA has no architecture parameters
    r.write_text(yaml.safe_dump(raw))
    with pytest.raises(gf.GraftingError, match="group_lr.*architecture"):
        train(r)
    assert not (tmp_path / "out" / "adapter").exists()


def test_trainer_calls_per_step_hooks(tmp_path, tiny_model_dir, jsonl_data):
    from toy_method import step_recorder

    with step_recorder("test-steps") as (_, calls):
        r = with_adapter(write_recipe(tmp_path / "r.yaml", tiny_model_dir, *jsonl_data, tmp_path / "out",
                                      max_steps=3), method="test-steps")
        train(r)
    # the hook runs after the optimizer step and before the gradients are cleared (importance scores read them)
    assert [(step, total, len(layers), grads) for step, total, layers, grads in calls] == \
        [(1, 3, 4, True), (2, 3, 4, True), (3, 3, 4, True)]
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GRAFT_TEST_STEPS"


@pytest.mark.parametrize("bilevel", [False, True], ids=["plain", "bilevel"])
def test_inits_that_read_activations_see_the_first_training_batches(tmp_path, tiny_model_dir, jsonl_data, bilevel):
    from toy_method import calibration_recorder

    with calibration_recorder("test-calib") as (_, seen):
        r = with_adapter(write_recipe(tmp_path / "r.yaml", tiny_model_dir, *jsonl_data, tmp_path / "out",
                                      max_steps=1, batch_size=4, calibration_batches=2), method="test-calib")
        if bilevel:  # the bi-level trainer builds its model through the same path; it then refuses LoRA
            raw = yaml.safe_load(r.read_text())
            raw["bilevel"] = {}
            r.write_text(yaml.safe_dump(raw))
            with pytest.raises(gf.GraftingError, match="no architecture parameters"):
                train(r)
            assert len(seen) == 4 and all(s[1] == 32 for s in seen.values())  # its rows are a shuffled split
            return
        train(r)
        from grafting.train.trainer import load_data_and_model
        rows = load_data_and_model(load_recipe(r))[2]
    # every token position of the first 2 batches of 4 training rows, each batch padded to its longest row
    positions = sum(4 * max(len(row["input_ids"]) for row in rows[i:i + 4]) for i in (0, 4))
    assert list(seen.values()) == [torch.Size([positions, 32])] * 4  # query and value in 2 BERT layers


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_data_aware_inits_train_from_a_recipe(tmp_path, tiny_model_dir, jsonl_data, init):
    r = with_adapter(write_recipe(tmp_path / "r.yaml", tiny_model_dir, *jsonl_data, tmp_path / "out", max_steps=2,
                                  batch_size=4, calibration_batches=2), init_lora_weights=init)
    train(r)
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    if init == "eva":  # A from the activations, the base untouched; ranks redistributed over the layers
        assert saved["init_lora_weights"] == "eva" and saved["r"] == 4
    else:  # CorDA rewrote the base: saved as a plain LoRA against the original one (rank 2r)
        assert saved["init_lora_weights"] is True and saved["r"] == 8
