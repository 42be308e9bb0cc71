"""LaMDA (arXiv 2406.12832): the path h = W0 x + s·B S A x on small tensors, A frozen, the r x r core trained,
B frozen column by column by the step schedule, the spectral init, and the plain-LoRA export in peft."""

from __future__ import annotations

import pytest
import torch

import grafting as gf
from grafting.methods.lamda import LamdaConfig, frozen_columns
from toys import Mlp as Net

peft = pytest.importorskip("peft")


def adapted(**kw):
    cfg = dict(r=4, lora_alpha=8, target_modules=["a", "b"], init_lora_weights=False)
    return gf.adapt(Net(), LamdaConfig(**{**cfg, **kw}))


def test_forward_is_w0x_plus_s_B_S_A_x():
    model = adapted()
    host = dict(model.hosts())["b"]
    ad = host.adapters["default"]
    x = torch.randn(5, 10)
    W0, b0 = host.base_layer.weight, host.base_layer.bias
    expect = x @ W0.t() + b0 + 2.0 * ((x @ ad.lora_A.t()) @ ad.lamda_S.t()) @ ad.lora_B.t()
    torch.testing.assert_close(host(x), expect, atol=1e-6, rtol=1e-5)
    dw = host.methods["default"].delta_weight(ad, host)
    torch.testing.assert_close(dw, 2.0 * ad.lora_B @ ad.lamda_S @ ad.lora_A)


def test_trainable_count_init_and_the_frozen_seeded_projection():
    model = gf.adapt(Net(), LamdaConfig(r=4, target_modules=["a", "b"]))
    # S (r x r) and B (out x r) train; A (r x fan_in) is a frozen buffer
    assert model.trainable_summary()["trainable"] == (16 + 10 * 4) + (16 + 6 * 4)
    assert not any("lora_A" in n for n, _ in model.named_parameters())
    x = torch.randn(3, 12)
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base)  # B = 0 at init
    again = gf.adapt(Net(), LamdaConfig(r=4, target_modules=["a", "b"]))
    hosts, hosts2 = dict(model.hosts()), dict(again.hosts())
    assert torch.equal(hosts["a"].adapters["default"].lora_A, hosts2["a"].adapters["default"].lora_A)
    other = gf.adapt(Net(), LamdaConfig(r=4, target_modules=["a", "b"], lamda_seed=1))
    assert not torch.equal(hosts["a"].adapters["default"].lora_A, dict(other.hosts())["a"].adapters["default"].lora_A)


def test_b_freezes_column_by_column_and_completely_after_eta_t():
    assert [frozen_columns(4, 0.3, t, 100) for t in (0, 7, 8, 15, 22, 29, 30, 90)] == [0, 0, 1, 2, 2, 3, 4, 4]
    assert frozen_columns(4, 0.0, 0, 100) == 4
    model = adapted(lamda_freeze_fraction=0.5)
    ad = dict(model.hosts())["a"].adapters["default"]
    for step, k in ((0, 0), (25, 2), (50, 4)):
        model.zero_grad(set_to_none=True)
        model.on_step(step, 100)
        assert ad.frozen_b == k
        model(torch.randn(4, 12)).pow(2).sum().backward()
        assert ad.lamda_S.grad.abs().sum() > 0  # the core always trains
        if k == 4:
            assert ad.lora_B.grad is None  # out of the graph: the optimizer skips it entirely
            continue
        col = ad.lora_B.grad.abs().sum(0)
        assert torch.all(col[:k] == 0) and torch.all(col[k:] > 0), (k, col)


@torch.no_grad()
def test_svd_init_uses_the_top_singular_vectors_and_keeps_the_base():
    model = adapted(lamda_init="svd")
    host = dict(model.hosts())["a"]
    ad = host.adapters["default"]
    U, _, Vh = torch.linalg.svd(host.base_layer.weight)
    torch.testing.assert_close(ad.lora_A, Vh[:4])
    torch.testing.assert_close(ad.lora_B, U[:, :4])
    assert not ad.lamda_S.any()
    torch.testing.assert_close(host.base_layer.weight, Net().a.weight)


@torch.no_grad()
def test_export_is_plain_lora_in_peft_and_native_keeps_the_three_factors(tmp_path):
    model = adapted()
    for _, host in model.hosts():
        host.adapters["default"].lamda_S.normal_()
    x = torch.randn(4, 12)
    expect = model(x)
    model.save_adapter(tmp_path / "export")
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path / "export")
    torch.testing.assert_close(theirs(x), expect, atol=1e-5, rtol=1e-5)
    model.save_adapter(tmp_path / "native", export=False)
    native = gf.load(Net(), tmp_path / "native", is_trainable=True)
    assert native.peft_config["default"].method == "lamda"
    torch.testing.assert_close(native(x), expect, atol=0, rtol=0)


def test_bad_configs_are_refused_clearly():
    with pytest.raises(gf.GraftingError, match="'lamda_freeze_fraction'"):
        LamdaConfig(lamda_freeze_fraction=1.5, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'init_lora_weights'"):
        LamdaConfig(init_lora_weights="pissa", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'lamda_init'"):
        LamdaConfig(lamda_init="pissa", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'use_dora'"):
        LamdaConfig(use_dora=True, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'lamda_seed'"):
        LamdaConfig(lamda_seed=1.5, target_modules=["a"])
