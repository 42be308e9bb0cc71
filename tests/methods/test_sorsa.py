"""SORSA (arXiv 2409.00055): W = W_res + s·U_p diag(S_p) V_pᵀ from the base's SVD, checked by hand on small
tensors in both placements (frozen part in the adapter / residual written into the base), the parameter count
r(out + fan_in + 1), the orthonormal regularizer's closed form and weighting, and files that apply to the original
base whichever placement trained them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grafting as gf
from grafting.io.peft_format import inspect_adapter
from grafting.methods.sorsa import SorsaConfig, orthonormal_penalty
from toys import Mlp as Net


def cfg(**kw):
    return SorsaConfig(**{"r": 3, "target_modules": ["a", "b"], **kw})


def perturb(model, scale=0.2):
    """Move the trained triplets away from their init (training would), keeping them near it."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn_like(p) * scale)


def residual_and_triplets(W, r, s):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return W - s * U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], (Vh[:r], S[:r], U[:, :r])


@pytest.mark.parametrize("residual_base", [False, True])
def test_forward_is_the_papers_rule(residual_base):
    net = Net()
    W, b0 = net.a.weight.detach().clone(), net.a.bias.detach().clone()
    model = gf.adapt(net, cfg(alpha=6, residual_base=residual_base))
    perturb(model)
    host = dict(model.hosts())["a"]
    ad = host.adapters["default"]
    s = 6 / 3
    W_res, (A0, S0, B0) = residual_and_triplets(W, 3, s)
    torch.testing.assert_close(ad.sorsa_A0, A0)
    torch.testing.assert_close(ad.sorsa_B0, B0)
    x = torch.randn(5, 12)
    expect = x @ W_res.t() + b0 + s * ((x @ ad.sorsa_A.t()) * ad.sorsa_S) @ ad.sorsa_B.t()
    torch.testing.assert_close(host(x), expect, atol=1e-5, rtol=1e-5)
    base_now = host.base_layer.weight
    torch.testing.assert_close(base_now, W_res if residual_base else W, atol=1e-6, rtol=0)
    # merging folds exactly the trained part into the layer
    model.merge()
    torch.testing.assert_close(host.base_layer.weight, W_res + s * (ad.sorsa_B * ad.sorsa_S) @ ad.sorsa_A,
                               atol=1e-5, rtol=1e-5)


def test_dropout_acts_on_the_trained_branch_only():
    net = Net()
    W, b0 = net.a.weight.detach().clone(), net.a.bias.detach().clone()
    model = gf.adapt(net, cfg(dropout=0.5, target_modules=["a"]))
    perturb(model)
    host = dict(model.hosts())["a"]
    ad = host.adapters["default"]
    W_res, _ = residual_and_triplets(W, 3, 1.0)
    x = torch.randn(4, 12)
    torch.manual_seed(5)
    out = host(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.5, training=True)
    expect = x @ W_res.t() + b0 + ((xd @ ad.sorsa_A.t()) * ad.sorsa_S) @ ad.sorsa_B.t()
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("residual_base", [False, True])
def test_init_is_the_base_and_the_count_is_r_times_out_plus_in_plus_one(residual_base):
    reference = Net()
    model = gf.adapt(Net(), cfg(residual_base=residual_base))
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
    assert model.trainable_summary()["trainable"] == 3 * (10 + 12 + 1) + 3 * (6 + 10 + 1)
    assert set(model.param_groups()) == {"weights"}


def test_regularizer_is_the_official_mean_of_frobenius_norms_scaled_by_gamma_over_lr():
    model = gf.adapt(Net(), cfg(gamma=4e-4, learning_rate=2e-5))
    assert model.regularizer().abs() < 1e-3  # singular vectors start orthonormal
    perturb(model)
    adapters = [h.adapters["default"] for _, h in model.hosts()]
    total = 0.0
    for ad in adapters:
        A, B = ad.sorsa_A.detach(), ad.sorsa_B.detach()
        total += torch.linalg.norm(A @ A.T - torch.eye(3), "fro") + torch.linalg.norm(B.T @ B - torch.eye(3), "fro")
    expected = (4e-4 / 2e-5) * total / (2 * len(adapters))
    reg = model.regularizer()
    torch.testing.assert_close(reg, expected)
    reg.backward()
    grads = [ad.sorsa_A.grad for ad in adapters] + [ad.sorsa_B.grad for ad in adapters]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert all(ad.sorsa_S.grad is None for ad in adapters)  # singular values are not regularized
    # without the learning rate the weight is γ itself
    plain = gf.adapt(Net(), cfg(gamma=0.5))
    perturb(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain.regularizer(), 0.5 * sum(
            orthonormal_penalty(h.adapters["default"].sorsa_A, h.adapters["default"].sorsa_B)
            for _, h in plain.hosts()) / 4)
    assert gf.adapt(Net(), cfg(gamma=0)).regularizer() == 0


@pytest.mark.parametrize("residual_base", [False, True])
@pytest.mark.parametrize("convert_init", [True, False])
@torch.no_grad()
def test_saved_adapters_apply_to_the_original_base(tmp_path, residual_base, convert_init):
    import json
    model = gf.adapt(Net(), cfg(alpha=4, residual_base=residual_base))
    perturb(model)
    x = torch.randn(4, 12)
    model.save_adapter(tmp_path / "a", convert_init=convert_init)
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SORSA"
    assert saved["residual_base"] is (residual_base and not convert_init)
    loaded = gf.load(Net(), tmp_path / "a")
    torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    # merging from the file alone (rank-2r factors against the original base) gives the same layer
    reader = gf.AdapterReader(tmp_path / "a")
    assert inspect_adapter(tmp_path / "a")["ranks"] == [3]  # from the header: r, not the 2r of the factors
    original = Net()
    A, B, s = reader.factors("a")
    merged = model.merge_and_unload()
    torch.testing.assert_close(original.a.weight + s * B @ A, merged.a.weight, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_deleting_a_residual_adapter_restores_the_base():
    net = Net()
    W = net.a.weight.detach().clone()
    model = gf.adapt(net, cfg(residual_base=True))
    assert not torch.allclose(model.base_model.a.base_layer.weight, W, atol=1e-3)
    model.add_adapter("keep", cfg(target_modules=["b"]))
    model.delete_adapter("default")
    torch.testing.assert_close(model.base_model.a.base_layer.weight, W, atol=1e-6, rtol=0)


def test_bad_configs_are_refused_clearly():
    for field, value in (("r", 0), ("alpha", -1.0), ("dropout", 1.0), ("gamma", -1e-4), ("learning_rate", 0),
                         ("residual_base", "yes")):
        with pytest.raises(gf.GraftingError, match=f"'{field}' must be"):
            cfg(**{field: value})
    with pytest.raises(gf.GraftingError, match="r=7 exceeds"):
        gf.adapt(Net(), cfg(r=7, target_modules=["b"]))
    with pytest.raises(gf.GraftingError, match="does not support embedding"):
        gf.adapt(nn.Sequential(nn.Embedding(5, 4)), cfg(target_modules=["0"]))


def test_training_step_keeps_the_frozen_part_frozen():
    model = gf.adapt(Net(), cfg())
    host = dict(model.hosts())["a"]
    ad = host.adapters["default"]
    frozen = {k: getattr(ad, k).clone() for k in ("sorsa_A0", "sorsa_S0", "sorsa_B0")}
    W = host.base_layer.weight.detach().clone()
    opt = torch.optim.SGD([p for ps in model.param_groups().values() for p in ps], lr=0.1)
    (model(torch.randn(6, 12)).pow(2).sum() + model.regularizer()).backward()
    opt.step()
    assert all(torch.equal(getattr(ad, k), v) for k, v in frozen.items())
    assert torch.equal(host.base_layer.weight, W)
    assert not torch.equal(ad.sorsa_A, frozen["sorsa_A0"])
    copy.deepcopy(model)  # an adapted model stays copyable (buffers, not captured tensors)
