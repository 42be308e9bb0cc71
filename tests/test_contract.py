"""The contract every registered method must pass, on every layer kind it declares.

A new method joins this matrix by registering; nothing here names a method. tests/toy_method.py registers a
method from outside the package (own config and peft_type, a shared buffer, frozen per-layer buffers, a
full-rank delta), so the matrix also proves that a plug-in needs no edit to grafting.
"""

from __future__ import annotations

import copy

import pytest
import torch

import grafting as gf
import toy_method  # noqa: F401  (registers "toy-shared")
from toys import KINDS, assert_rows_match, make_toy, randomize

CASES = [(m, k) for m in gf.method_names() for k in KINDS if k in gf.get_method(m).layer_kinds]


def config_for(method: str, **kw) -> gf.AdapterConfig:
    # a method is reached through its config; the config's ``method`` property must name it
    m = gf.get_method(method)
    cfg = m.make_config(**{"target_modules": ["target"], **m.tiny_fields, **kw})
    assert cfg.method == method
    return cfg


def test_the_toy_plug_in_is_in_the_matrix():
    assert "toy-shared" in {m for m, _ in CASES}


def adapted(method, kind, **kw):
    base = make_toy(kind)
    reference = copy.deepcopy(base)
    model = gf.adapt(base, config_for(method, **kw))
    return model, reference


def base_after_init(model, reference):
    """The reference network with the model's base weights as they are after adapting: an init that rewrites
    the base (a PiSSA-like residual, some methods' default) makes that the base which disabling the
    adapter and unmerging give back; for every other method it is the reference itself."""
    if not gf.get_method(model.peft_config["default"].method).changes_base(model.peft_config["default"]):
        return reference
    twin = copy.deepcopy(reference)
    with torch.no_grad():
        twin.target.weight.copy_(model.base_model.target.base_layer.weight)
    return twin


@pytest.mark.parametrize("method,kind", CASES)
def test_zero_init_gives_base_output(method, kind):
    model, reference = adapted(method, kind)
    x = reference.make_input()
    if not gf.get_method(method).starts_at_base:  # declared: its init changes the function on purpose
        assert not torch.allclose(model(x), reference(x), atol=1e-4)
        return
    torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method,kind", CASES)
def test_disabled_gives_base_output(method, kind):
    model, reference = adapted(method, kind)
    base = base_after_init(model, reference)
    randomize(model)
    x = reference.make_input()
    assert not torch.allclose(model(x), reference(x), atol=1e-4)
    with model.disabled():
        torch.testing.assert_close(model(x), base(x))


@pytest.mark.parametrize("method,kind", CASES)
def test_merge_equals_unmerged_and_unmerge_restores(method, kind):
    model, reference = adapted(method, kind)
    if not gf.get_method(method).mergeable:  # a method that declares itself unmergeable must refuse clearly
        with pytest.raises(gf.GraftingError, match="cannot be merged"):
            model.merge()
        return
    base = base_after_init(model, reference)
    randomize(model)
    x = reference.make_input()
    before = model(x)
    model.merge()
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    model.unmerge()
    torch.testing.assert_close(model.base_model.target.base_layer.weight, base.target.weight,
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
    model.add_adapter("other", config_for(method))
    randomize(model)
    with torch.set_grad_enabled(grad):
        assert_rows_match(model, x, names)


@pytest.mark.parametrize("method,kind", CASES)
def test_only_adapter_parameters_get_gradients(method, kind):
    model, reference = adapted(method, kind)
    model.add_adapter("idle", config_for(method))
    randomize(model)
    model(reference.make_input()).pow(2).sum().backward()
    for name, p in model.named_parameters():
        # the active adapter's own tensors, and its trained model-level tensors (shared by its layers)
        in_active = "adapters.default." in name or name.startswith("shared_tensors.default.")
        assert p.requires_grad == in_active, name
        if in_active:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("method,kind", CASES)
def test_param_groups_cover_exactly_the_trainable_parameters(method, kind):
    model, _ = adapted(method, kind)
    model.add_adapter("idle", config_for(method))
    groups = model.param_groups()
    grouped = [id(p) for ps in groups.values() for p in ps]
    assert len(grouped) == len(set(grouped))  # no parameter in two groups
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    assert model.param_groups("idle") == {}  # an inactive adapter is frozen: nothing of it to optimise
    model.set_active("idle")
    idle = {id(p) for ps in model.param_groups().values() for p in ps}
    assert idle and idle.isdisjoint(set(grouped))


@pytest.mark.parametrize("method,kind", CASES)
def test_stack_and_state_follow_dtype_changes(method, kind):
    base = make_toy(kind)
    x = base.make_input(rows=3)
    model = gf.adapt(base, config_for(method))
    model.add_adapter("other", config_for(method))
    randomize(model)
    names = ["other", None, "default"]
    with torch.no_grad():
        before = model(x, adapter_names=names)
        model.double()
        xd = x.double() if x.is_floating_point() else x
        after = model(xd, adapter_names=names)
    assert after.dtype == torch.float64
    torch.testing.assert_close(after, before.double(), atol=1e-5, rtol=1e-4)
