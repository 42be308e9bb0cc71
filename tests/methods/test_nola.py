"""NOLA (arXiv 2310.02556): ΔW = s·(Σ β_j B_j)(A_0 + Σ α_i A_i) on small tensors, k + l trained numbers per layer,
the official init (the base at start, β trainable from step one), bases regenerated from the seed per module name
(independent of the other targets), adapter files holding only the coefficients."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import grafting as gf
from grafting.methods.nola import NolaConfig
from toys import Mlp as Net


def cfg(**kw):
    return NolaConfig(**{"r": 3, "num_basis_A": 5, "num_basis_B": 4, "lora_alpha": 6, "target_modules": ["a", "b"],
                         **kw})


def test_forward_is_the_linear_combination_rule():
    model = gf.adapt(Net(), cfg(init_weights=False))
    host = dict(model.hosts())["b"]
    ad = host.adapters["default"]
    assert ad.nola_A_bases.shape == (5, 3, 10) and ad.nola_B_bases.shape == (4, 6, 3)
    A = ad.nola_A0 + sum(ad.nola_alpha[i] * ad.nola_A_bases[i] for i in range(5))
    B = sum(ad.nola_beta[j] * ad.nola_B_bases[j] for j in range(4))
    x = torch.randn(5, 10)
    W0, b0 = host.base_layer.weight, host.base_layer.bias
    expect = x @ W0.t() + b0 + (6 / 3) * (x @ A.t()) @ B.t()
    torch.testing.assert_close(host(x), expect, atol=1e-5, rtol=1e-5)
    # the official code's bases: U(-1, 1)/sqrt(k); A_0 Kaiming-uniform (a = sqrt(5)): U(-1/sqrt(fan_in), ...)
    assert ad.nola_A_bases.abs().max() <= 1 / math.sqrt(5) and ad.nola_B_bases.abs().max() <= 1 / math.sqrt(4)
    assert ad.nola_A0.abs().max() <= 1 / math.sqrt(10)


def test_parameter_count_is_k_plus_l_per_layer_whatever_the_rank():
    for r in (1, 4):
        model = gf.adapt(Net(), cfg(r=r, num_basis_A=7, num_basis_B=2))
        assert model.trainable_summary()["trainable"] == 2 * (7 + 2)


def test_init_is_the_base_and_beta_gets_gradients_from_the_first_step():
    model = gf.adapt(Net(), cfg())
    x = torch.randn(3, 12)
    with model.disabled():
        base = model(x)
    out = model(x)
    torch.testing.assert_close(out, base)
    out.pow(2).sum().backward()
    for _, host in model.hosts():
        ad = host.adapters["default"]
        assert torch.all(ad.nola_alpha == 0) and torch.all(ad.nola_beta == 0)
        assert ad.nola_beta.grad.abs().sum() > 0  # A = A_0 ≠ 0: not a stationary point
        assert torch.all(ad.nola_alpha.grad == 0)  # B = 0 at init


def test_bases_come_from_the_seed_and_the_module_name_only():
    both = dict(gf.adapt(Net(), cfg(seed=4)).hosts())["b"].adapters["default"]
    alone = dict(gf.adapt(Net(), cfg(seed=4, target_modules=["b"])).hosts())["b"].adapters["default"]
    for name in ("nola_A0", "nola_A_bases", "nola_B_bases"):
        assert torch.equal(getattr(both, name), getattr(alone, name))
    # the documented derivation, written out: adapter files rely on it staying the same
    digest = hashlib.sha256(b"4:b").digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    a0 = nn.init.kaiming_uniform_(torch.empty(3, 10), a=math.sqrt(5), generator=g)
    a = torch.empty(5, 3, 10).uniform_(-1, 1, generator=g) / math.sqrt(5)
    b = torch.empty(4, 6, 3).uniform_(-1, 1, generator=g) / math.sqrt(4)
    assert torch.equal(both.nola_A0, a0) and torch.equal(both.nola_A_bases, a) and torch.equal(both.nola_B_bases, b)
    other = dict(gf.adapt(Net(), cfg(seed=5)).hosts())["b"].adapters["default"]
    assert not torch.equal(other.nola_A_bases, both.nola_A_bases)
    model = gf.adapt(Net(), cfg(seed=4))
    a, b = (dict(model.hosts())[m].adapters["default"] for m in ("a", "b"))
    assert not torch.equal(a.nola_B_bases[:, :6], b.nola_B_bases)  # layers get their own bases


@torch.no_grad()
def test_the_file_holds_only_coefficients_and_loading_regenerates_the_bases(tmp_path):
    x = torch.randn(4, 12)
    mine = gf.adapt(Net(), cfg(init_weights=False, seed=11))
    mine.save_adapter(tmp_path / "nola")
    saved = load_file(tmp_path / "nola" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "base_model.model.a.nola_alpha": (5,), "base_model.model.a.nola_beta": (4,),
        "base_model.model.b.nola_alpha": (5,), "base_model.model.b.nola_beta": (4,)}
    assert not [k for k in mine.state_dict() if "_bases" in k or "A0" in k]  # regenerated, never stored
    back = gf.load(Net(), tmp_path / "nola")
    assert back.peft_config["default"].seed == 11
    torch.testing.assert_close(back(x), mine(x), atol=0, rtol=0)
    with back.disabled():
        assert not torch.allclose(back(x), mine(x), atol=1e-4)


@torch.no_grad()
def test_a_file_merges_into_a_full_model_given_the_base(tmp_path):
    from safetensors.torch import save_file

    from grafting.merge import open_input
    mine = gf.adapt(Net(), cfg(init_weights=False))
    mine.save_adapter(tmp_path / "nola")
    assert gf.AdapterReader(tmp_path / "nola").factors("a") is None
    with pytest.raises(gf.GraftingError, match="needs the base weight"):
        gf.AdapterReader(tmp_path / "nola").delta_weight("a")
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in Net().state_dict().items()}, tmp_path / "base" / "model.safetensors")
    merged = open_input(tmp_path / "nola", base=open_input(tmp_path / "base"))
    for name, host in mine.hosts():
        expect = host.base_layer.weight + host.methods["default"].delta_weight(host.adapters["default"], host)
        torch.testing.assert_close(merged.get(f"{name}.weight"), expect, atol=1e-5, rtol=1e-5)


def test_bad_configs_are_refused_clearly():
    for field in ("r", "num_basis_A", "num_basis_B"):
        with pytest.raises(gf.GraftingError, match=f"'{field}' must be a positive integer"):
            NolaConfig(**{field: 0}, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'seed' must be an integer"):
        NolaConfig(seed="0", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'lora_alpha' must be a positive number"):
        NolaConfig(lora_alpha=-1, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="lora_dropout"):
        NolaConfig(lora_dropout=1.0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'bias' must be one of"):
        NolaConfig(bias="lora_only", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="unknown field 'num_basis'"):
        NolaConfig(num_basis=4)
