"""Sealed adapters (grafting.hashing.seal): mixed calls trust a sealed adapter's content hash, and every way the
model's own methods can change an adapter drops its seal, so those changes are still served."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import grafting as gf
from grafting.hashing import unseal
from grafting.io.peft_format import fill_adapter
from test_model import Net
from toys import assert_rows_match


def lora(r=4):
    return gf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


X, NAMES = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), ["b", "default", None]


def sealed_model():
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora())
    model.add_adapter("b", lora())
    model.eval()
    assert model.seal_adapters() == ["default", "b"]
    return model


def adapter_b(model):
    return dict(model.hosts())["layers.0.q_proj"].adapters["b"]


def mixed(model):
    with torch.no_grad():
        return model(X, adapter_names=NAMES)


def edit_outside(model):
    with torch.no_grad():
        adapter_b(model).lora_B.add_(0.5)


def test_mixed_calls_trust_a_sealed_hash_until_unsealed():
    model = sealed_model()
    before = mixed(model)
    digest = model.content_hash("b")
    edit_outside(model)  # breaks the seal's promise: mixed calls do not see it, which makes the seal cheap
    assert model.content_hash("b") != digest  # the hash itself is always checked in full
    torch.testing.assert_close(mixed(model), before)
    assert "b" in model._routing.sealed
    unseal(model, ["b"])
    with torch.no_grad():
        assert_rows_match(model, X, NAMES)
    assert not torch.allclose(mixed(model)[0], before[0])


def _reregister(model):
    a = adapter_b(model)
    a.lora_A = torch.nn.Parameter(a.lora_A.detach().clone())


def _train_mode(model):
    model.train()
    model.eval()


def _train_submodule(model):
    model.base_model.layers[0].train()
    model.eval()


def _train_adapter(model):
    model.train_adapter("b", True)
    model.train_adapter("b", False)


def _move(model):
    model.double()
    model.float()


def _move_submodule(model):
    model.base_model.layers[0].double()
    model.base_model.layers[0].float()


def _grad_call(model):
    model(X, adapter_names=NAMES)


def _grad_single(model):
    model.set_active("b")
    model(X).sum().backward()  # a training step's forward in eval mode, without adapter_names
    model.set_active("default")


def _load_state_dict(model):
    model.load_state_dict(model.state_dict())


def _module_apply(model):
    model.apply(lambda m: None)


def _on_step(model):
    model.set_active("b")
    model.on_step(1, 10)
    model.set_active("default")


def _fill(model, tmp_path):
    model.save_adapter(tmp_path / "b", name="b")
    fill_adapter(model, tmp_path / "b", "b")


@pytest.mark.parametrize("trigger", [_reregister, _train_mode, _train_submodule, _train_adapter, _move,
                                     _move_submodule, _grad_call, _grad_single, _load_state_dict, _module_apply,
                                     _on_step, _fill])
def test_every_change_through_the_model_drops_the_seal(trigger, tmp_path):
    model = sealed_model()
    mixed(model)
    trigger(model, tmp_path) if trigger is _fill else trigger(model)
    edit_outside(model)  # now an edit like a training step's is served
    with torch.no_grad():
        assert_rows_match(model, X, NAMES)
    assert "b" not in model._routing.sealed


def test_a_grad_enabled_call_checks_sealed_adapters_in_full():
    model = sealed_model()
    edit_outside(model)
    out = model(X, adapter_names=NAMES)  # e.g. a training step's forward: it must see the current weights
    assert "b" not in model._routing.sealed and "default" not in model._routing.sealed
    with torch.no_grad():
        torch.testing.assert_close(out, mixed(model))
        assert_rows_match(model, X, NAMES)


def test_adapters_in_training_mode_are_not_sealed_and_copies_start_unsealed():
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora())
    model.add_adapter("b", lora())
    model.eval()
    model.train_adapter("b", True)
    assert model.seal_adapters() == ["default"]
    model.train_adapter("b", False)
    assert model.seal_adapters(["b"]) == ["b"]
    with pytest.raises(gf.GraftingError, match="unknown adapter|no adapter"):
        model.seal_adapters(["nobody"])
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other._routing.sealed == {}
        edit_outside(other)
        with torch.no_grad():
            assert_rows_match(other, X, NAMES)


def test_deleting_a_sealed_adapter_and_adding_another_under_its_name_serves_the_new_one():
    model = sealed_model()
    mixed(model)
    model.delete_adapter("b")
    assert "b" not in model._routing.sealed
    torch.manual_seed(5)
    model.add_adapter("b", lora())
    model.eval()
    with torch.no_grad():
        assert_rows_match(model, X, NAMES)


def test_dylora_eval_rank_changes_drop_the_seal():
    from grafting.methods.dylora import set_eval_rank
    torch.manual_seed(0)
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = gf.adapt(Net(), gf.DyLoraConfig(**cfg))
    model.add_adapter("b", gf.DyLoraConfig(**cfg))
    model.eval()
    model.seal_adapters()
    before = mixed(model)
    set_eval_rank(model, 2, "b")
    with torch.no_grad():
        assert_rows_match(model, X, NAMES)
    assert not torch.allclose(mixed(model)[0], before[0])
