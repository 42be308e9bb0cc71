"""The contract every registered method must pass, on every layer kind it declares.

A new method joins this matrix by registering; nothing here names a method.
"""

from __future__ import annotations

import copy

import pytest
import torch

import grafting as gf
from conftest import KINDS, make_toy, randomize

CASES = [(m, k) for m in gf.method_names() for k in KINDS if k in gf.get_method(m).layer_kinds]


def config_for(method: str, **kw) -> gf.LoraConfig:
    # a method is reached through its config; the config's ``method`` property must name it
    cfg = gf.get_method(method).make_config(**{"r": 4, "lora_alpha": 8, "target_modules": ["target"], **kw})
    assert cfg.method == method
    return cfg


def adapted(method, kind, **kw):
    base = make_toy(kind)
    reference = copy.deepcopy(base)
    model = gf.adapt(base, config_for(method, **kw))
    return model, reference


@pytest.mark.parametrize("method,kind", CASES)
def test_zero_init_gives_base_output(method, kind):
    model, reference = adapted(method, kind)
    x = reference.make_input()
    torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method,kind", CASES)
def test_disabled_gives_base_output(method, kind):
    model, reference = adapted(method, kind)
    randomize(model)
    x = reference.make_input()
    assert not torch.allclose(model(x), reference(x), atol=1e-4)
    with model.disabled():
        torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize("method,kind", CASES)
def test_merge_equals_unmerged_and_unmerge_restores(method, kind):
    model, reference = adapted(method, kind)
    if not gf.get_method(method).mergeable:  # a method that declares itself unmergeable must refuse clearly
        with pytest.raises(gf.GraftingError, match="cannot be merged"):
            model.merge()
        return
    randomize(model)
    x = reference.make_input()
    before = model(x)
    model.merge()
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    model.unmerge()
    torch.testing.assert_close(model.base_model.target.base_layer.weight, reference.target.weight,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    plain = model.merge_and_unload()
    assert type(plain.target) is type(reference.target)
    torch.testing.assert_close(plain(x), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,kind", CASES)
def test_save_load_round_trip(method, kind, tmp_path):
    model, reference = adapted(method, kind)
    randomize(model)
    x = reference.make_input()
    model.save_adapter(tmp_path / "a")
    loaded = gf.load(copy.deepcopy(reference), tmp_path / "a")
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("method,kind", CASES)
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "train"])
@pytest.mark.parametrize("names", [["default", "other", None, "default"],  # per-row factors
                                   ["other", "default", None, "default", "other", "default", "default", None]],
                         ids=["rows", "shared"])  # rows share adapters: per-adapter factors, rows grouped
def test_mixed_batch_rows_equal_single_adapter(method, kind, grad, names):
    base = make_toy(kind)
    x = base.make_input(rows=len(names))
    model = gf.adapt(base, config_for(method))
    model.add_adapter("other", config_for(method, r=2))
    randomize(model)
    with torch.set_grad_enabled(grad):
        mixed = model(x, adapter_names=names)
        for i, name in enumerate(names):
            if name is None:
                with model.disabled():
                    single = model(x)
            else:
                model.set_active(name)
                single = model(x)
            torch.testing.assert_close(mixed[i], single[i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,kind", CASES)
def test_only_adapter_parameters_get_gradients(method, kind):
    model, reference = adapted(method, kind)
    model.add_adapter("idle", config_for(method))
    randomize(model)
    model(reference.make_input()).pow(2).sum().backward()
    for name, p in model.named_parameters():
        in_active = "adapters.default." in name
        assert p.requires_grad == in_active, name
        if in_active:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
