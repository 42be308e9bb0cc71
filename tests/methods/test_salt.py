"""SALT (arXiv 2503.16055): W' = U ReLU(Σ') Vᵀ with Σ' = diag(α σ_top + β) ⊕ (diag(σ_rest) + X Y), built here
the way the official layer builds it (the full k × k matrix, ReLU elementwise) and compared with grafting's factored
forward; the init, the parameter count 2r + 2(k − r)·r_lora, the official penalty, sign-fixed SVDs, and files
holding only the trained tensors (the SVD is recomputed from the base on load and when merging from files)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import grafting as gf
from toys import make_toy
from grafting.methods.salt import SaltConfig, canonical_svd
from toys import Mlp as Net


def cfg(**kw):
    return SaltConfig(**{"r": 3, "r_lora": 2, "target_modules": ["a", "b"], **kw})


def sign_fixed(U, S, Vh):
    """The documented convention, applied by hand: each u_i's largest-magnitude entry is positive."""
    idx = U.abs().argmax(0)
    sign = torch.sign(U[idx, torch.arange(U.shape[1])])
    return U * sign, S, Vh * sign[:, None]


def official_weight(W_out_in, scale, shift, X, Y):
    """The official SALTLinear forward's weight: U ReLU(new_s) Vᵀ with new_s built as a full k × k matrix."""
    U, S, Vh = sign_fixed(*torch.linalg.svd(W_out_in, full_matrices=False))
    r = scale.shape[0]
    new_s = torch.diag(S)
    new_s[:r, :r] = torch.diag(scale * S[:r] + shift)
    new_s[r:, r:] += X @ Y
    assert (new_s < 0).any()  # the ReLU has something to cut
    return U @ F.relu(new_s) @ Vh


def set_trained(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.salt_scale.copy_(1 + 0.5 * torch.randn(adapter.salt_scale.shape, generator=g))
        adapter.salt_shift.copy_(0.3 * torch.randn(adapter.salt_shift.shape, generator=g))
        adapter.salt_shift[0] = -3 * adapter.salt_S[0]  # drives the top singular value below zero
        adapter.salt_X.copy_(torch.randn(adapter.salt_X.shape, generator=g))
        adapter.salt_Y.copy_(torch.randn(adapter.salt_Y.shape, generator=g))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding"])
def test_forward_is_the_official_rule(kind):
    toy = make_toy(kind)
    reference = copy.deepcopy(toy)
    W = toy.target.weight.detach().clone()
    model = gf.adapt(toy, SaltConfig(r=3, r_lora=2, target_modules=["target"]))
    host = dict(model.hosts())["target"]
    ad = host.adapters["default"]
    set_trained(ad)
    w_out_in = W.t() if kind in ("conv1d", "embedding") else W.reshape(W.shape[0], -1)
    new = official_weight(w_out_in, ad.salt_scale, ad.salt_shift, ad.salt_X, ad.salt_Y)
    new = new.t() if kind in ("conv1d", "embedding") else new.reshape(W.shape)
    with torch.no_grad():
        reference.target.weight.copy_(new)
    x = toy.make_input()
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


def test_init_is_the_base_and_the_count_is_the_papers():
    reference = Net()
    model = gf.adapt(Net(), cfg())
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
    k_a, k_b = 10, 6  # min(out, fan_in) of each layer
    assert model.trainable_summary()["trainable"] == sum(2 * 3 + 2 * (k - 3) * 2 for k in (k_a, k_b))
    ad = dict(model.hosts())["a"].adapters["default"]
    assert torch.all(ad.salt_scale == 1) and torch.all(ad.salt_shift == 0) and torch.all(ad.salt_Y == 0)
    assert ad.salt_X.abs().sum() > 0  # X random (Kaiming-uniform, ReLU gain), Y = 0: the product starts at 0
    assert ad.salt_X.abs().max() <= (6 / 2) ** 0.5
    assert not any(p.requires_grad for n, p in model.named_parameters() if "salt_U" in n or "salt_S" in n)
    assert {n.rsplit(".", 1)[-1] for n, _ in model.named_buffers() if ".adapters." in n} == {
        "salt_U", "salt_S", "salt_Vh"}


def test_the_svd_sign_is_fixed_whatever_the_algorithm_returns():
    W = Net().a.weight.detach().double()
    U, S, Vh = canonical_svd(W)
    torch.testing.assert_close((U * S) @ Vh, W.float(), atol=1e-5, rtol=1e-5)
    top = U.abs().argmax(0)
    assert torch.all(U[top, torch.arange(U.shape[1])] > 0)
    # another routine's signs (float64, some pairs flipped) give the same factors once fixed
    U2, S2, Vh2 = torch.linalg.svd(W, full_matrices=False)
    flip = torch.tensor([1.0, -1.0] * (S2.shape[0] // 2), dtype=torch.float64)
    U3, _, Vh3 = sign_fixed(U2 * flip, S2, Vh2 * flip[:, None])
    torch.testing.assert_close(U3.float(), U, atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh3.float(), Vh, atol=1e-5, rtol=0)


def test_penalty_is_the_official_one():
    model = gf.adapt(Net(), cfg(reg_multiplier=0.7))
    assert model.regularizer() == 0  # α = 1, β = 0, X Y = 0
    expected = 0.0
    for i, (_, host) in enumerate(model.hosts()):
        ad = host.adapters["default"]
        set_trained(ad, seed=i)
        top = ad.salt_S[:3]
        expected += torch.linalg.norm(torch.diag(ad.salt_scale * top + ad.salt_shift) - torch.diag(top), "fro") \
            + torch.linalg.norm(ad.salt_X @ ad.salt_Y, "fro")
    torch.testing.assert_close(model.regularizer(), 0.7 * expected)
    assert gf.adapt(Net(), cfg()).regularizer() == 0  # reg_multiplier 0: no penalty


@torch.no_grad()
def test_files_hold_only_the_trained_tensors_and_merge_from_disk(tmp_path):
    from safetensors.torch import save_file

    from grafting.merge import open_input
    model = gf.adapt(Net(), cfg(init_weights=False))
    for i, (_, host) in enumerate(model.hosts()):
        set_trained(host.adapters["default"], seed=i)
    x = torch.randn(4, 12)
    model.save_adapter(tmp_path / "salt")
    keys = gf.AdapterReader(tmp_path / "salt").keys()
    assert sorted(k.rsplit(".", 1)[-1] for k in keys if ".a." in k) == ["salt_X", "salt_Y", "salt_scale",
                                                                       "salt_shift"]
    loaded = gf.load(Net(), tmp_path / "salt")
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-5)

    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in Net().state_dict().items()}, tmp_path / "base" / "model.safetensors")
    merged = open_input(tmp_path / "salt", base=open_input(tmp_path / "base"))
    for name, host in model.hosts():
        expect = host.base_layer.weight + host.methods["default"].delta_weight(host.adapters["default"], host)
        torch.testing.assert_close(merged.get(f"{name}.weight"), expect, atol=1e-5, rtol=1e-5)
    with pytest.raises(gf.GraftingError, match="pass base_weight"):
        gf.AdapterReader(tmp_path / "salt").delta_weight("a")
    with pytest.raises(gf.GraftingError, match="singular values"):
        gf.AdapterReader(tmp_path / "salt").delta_weight("a", torch.randn(10, 8))


def test_bad_configs_are_refused_clearly():
    for field, value in (("r", 0), ("r_lora", 1.5), ("reg_multiplier", -1), ("init_weights", "yes")):
        with pytest.raises(gf.GraftingError, match=f"'{field}' must be"):
            cfg(**{field: value})
    with pytest.raises(gf.GraftingError, match="r=7 exceeds the 6 singular values of module 'b'"):
        gf.adapt(Net(), cfg(r=7))
