"""Hydra (arXiv 2309.06922): h = W0 x + b + s·(B_p A_p x + B_s A_s W0 x) on small tensors (long and short inputs),
the official code's merge formula, the parameter count, the zero init, merging from adapter files with the base
weight, and config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grafting as gf
from grafting.methods.hydra import HydraConfig
from toys import Mlp as Net


def cfg(**kw):
    return HydraConfig(**{"hydra_par_r": 2, "hydra_seq_r": 3, "scale": 0.5, "target_modules": ["a", "b"], **kw})


@pytest.mark.parametrize("tokens", [7, 2], ids=["long", "short"])  # >= r_s stacks A_s W0; < r_s runs W0 x first
def test_forward_is_the_papers_rule(tokens):
    model = gf.adapt(Net(), cfg(init_weights=False))
    host = dict(model.hosts())["b"]
    ad = host.adapters["default"]
    assert ad.par_A.shape == (2, 10) and ad.par_B.shape == (6, 2)
    assert ad.seq_A.shape == (3, 6) and ad.seq_B.shape == (6, 3)  # the sequential branch acts on the output
    x = torch.randn(tokens, 10)
    W0, b0 = host.base_layer.weight, host.base_layer.bias
    pre = x @ W0.t()
    expect = pre + b0 + 0.5 * ((x @ ad.par_A.t()) @ ad.par_B.t() + (pre @ ad.seq_A.t()) @ ad.seq_B.t())
    torch.testing.assert_close(host(x), expect, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_merge_is_the_official_reparameterization():
    model = gf.adapt(Net(), cfg(init_weights=False))
    ads = {n: h.adapters["default"] for n, h in model.hosts()}
    W0 = {n: h.base_layer.weight.clone() for n, h in model.hosts()}
    x = torch.randn(4, 12)
    before = model(x)
    plain = model.merge_and_unload()
    for name in ("a", "b"):
        ad = ads[name]
        # vtab1k/hydra.py, in its (in, out) layout: W0 + scale·(W_p + W0 @ W_s)
        Wp, Ws = ad.par_A.t() @ ad.par_B.t(), ad.seq_A.t() @ ad.seq_B.t()
        expect = W0[name].t() + 0.5 * (Wp + W0[name].t() @ Ws)
        torch.testing.assert_close(getattr(plain, name).weight, expect.t(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plain(x), before, atol=1e-5, rtol=1e-4)


def test_init_starts_at_the_base_and_trains_both_branches():
    model = gf.adapt(Net(), cfg())
    for _, host in model.hosts():
        ad = host.adapters["default"]
        assert torch.all(ad.par_B == 0) and torch.all(ad.seq_B == 0)
        assert ad.par_A.abs().sum() > 0 and ad.seq_A.abs().sum() > 0
    x = torch.randn(3, 12)
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base)
    model(x).pow(2).sum().backward()
    for _, host in model.hosts():
        ad = host.adapters["default"]
        assert ad.par_B.grad.abs().sum() > 0 and ad.seq_B.grad.abs().sum() > 0  # A ≠ 0: both Bs move at once


def test_parameter_count_is_r_p_times_in_plus_out_plus_r_s_times_two_out():
    model = gf.adapt(Net(), cfg())
    assert model.trainable_summary()["trainable"] == (2 * (12 + 10) + 3 * 2 * 10) + (2 * (10 + 6) + 3 * 2 * 6)
    both = gf.adapt(Net(), HydraConfig(r=4, target_modules=["b"]))
    assert both.trainable_summary()["trainable"] == 4 * (10 + 6) + 4 * 2 * 6  # r sets both ranks


def test_the_sequential_branch_follows_the_base_weight():
    model = gf.adapt(Net(), cfg(init_weights=False, target_modules=["b"]))
    host = dict(model.hosts())["b"]
    method, ad = host.methods["default"], host.adapters["default"]
    with torch.no_grad():
        dw = method.delta_weight(ad, host)
        host.base_layer.weight.mul_(2)
        dw2 = method.delta_weight(ad, host)
    parallel = 0.5 * ad.par_B @ ad.par_A
    torch.testing.assert_close(dw2 - parallel, 2 * (dw - parallel), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_an_adapter_file_merges_into_its_base_and_needs_it(tmp_path):
    from safetensors.torch import save_file

    from grafting.io.peft_format import inspect_adapter
    from grafting.io.reader import AdapterReader
    from grafting.merge import open_input
    mine = gf.adapt(Net(), cfg(init_weights=False))
    mine.save_adapter(tmp_path / "hydra")
    back = gf.load(Net(), tmp_path / "hydra")
    x = torch.randn(4, 12)
    torch.testing.assert_close(back(x), mine(x), atol=0, rtol=0)
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in Net().state_dict().items()}, tmp_path / "base" / "model.safetensors")
    merged = open_input(tmp_path / "hydra", base=open_input(tmp_path / "base"))
    for name, host in mine.hosts():
        expect = host.base_layer.weight + host.methods["default"].delta_weight(host.adapters["default"], host)
        torch.testing.assert_close(merged.get(f"{name}.weight"), expect, atol=1e-6, rtol=1e-5)
    reader = AdapterReader(tmp_path / "hydra")
    with pytest.raises(gf.GraftingError, match="needs the base weight"):
        reader.delta_weight("a")
    info = inspect_adapter(tmp_path / "hydra")
    assert info["method"] == "hydra" and info["ranks"] == [2 + 3] and info["parameters"] == 172


def test_dropout_acts_on_the_bottleneck_and_only_in_training():
    model = gf.adapt(Net(), cfg(init_weights=False, dropout=0.5, target_modules=["b"]))
    host = dict(model.hosts())["b"]
    method, ad = host.methods["default"], host.adapters["default"]
    x = torch.randn(8, 10)
    model.train()
    assert not method.deterministic(ad)
    assert not torch.allclose(host(x), host(x))
    model.eval()
    assert method.deterministic(ad)
    torch.testing.assert_close(host(x), x @ (host.base_layer.weight + method.delta_weight(ad, host)).t()
                               + host.base_layer.bias, atol=1e-6, rtol=1e-5)


def test_bad_configs_are_refused_clearly():
    with pytest.raises(gf.GraftingError, match="'r' must be a positive integer"):
        HydraConfig(r=0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'hydra_seq_r' must be a positive integer"):
        HydraConfig(hydra_seq_r=-1, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'scale' must be a finite non-zero number"):
        HydraConfig(scale=0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'dropout' must be a number in"):
        HydraConfig(dropout=1.0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'init_weights' must be true or false"):
        HydraConfig(init_weights="yes", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="does not support embedding layers"):
        gf.adapt(nn.Sequential(nn.Embedding(5, 4)), HydraConfig(target_modules=["0"]))
