"""LoLDU (arXiv 2410.13618): the paper's rule h = (W_res + σ P L_r diag(z) U_r) x on small tensors, r + 1 trained
parameters per layer, the LU initialisation (starts at the base; the ablation inits), and adapters that hold only
z and σ on disk, their factors recomputed from the base at load and when merging from files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grafting as gf
from grafting.methods.loldu import LolduConfig


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.head = nn.Linear(12, 10), nn.Linear(10, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def trained(model, seed=0):
    """Move z and σ away from their initial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("vector_z", "scaling_factor")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@torch.no_grad()
def test_forward_is_the_papers_rule_with_the_residual_base():
    r, alpha = 3, 2.0
    model = trained(gf.adapt(Net(), LolduConfig(r=r, lora_alpha=alpha, target_modules=["a"])))
    host = dict(model.hosts())["a"]
    ad = host.adapters["default"]
    W, b0 = host.base_layer.weight.double(), host.base_layer.bias.double()
    # the paper's factors, by hand: W = P L D U with L, U unit-triangular
    P, L, U = torch.linalg.lu(W)
    D = U.diagonal()
    Uu = U / D[:, None]
    torch.testing.assert_close(P @ L @ torch.diag(D) @ Uu, W)
    s0 = alpha / r
    W_res = W - s0 * P @ L[:, :r] @ torch.diag(D[:r]) @ Uu[:r]  # the official code's residual base
    z, s = ad.vector_z.double(), ad.scaling_factor.double()
    x = torch.randn(4, 12, dtype=torch.float64)
    expect = x @ (W_res + s * P @ L[:, :r] @ torch.diag(z) @ Uu[:r]).t() + b0
    torch.testing.assert_close(host(x.float()).double(), expect, atol=1e-5, rtol=1e-5)
    assert host.base_layer.weight.equal(Net().a.weight)  # the base itself is never rewritten


def test_lu_init_starts_at_the_base_and_trains_r_plus_one_per_layer():
    model = gf.adapt(Net(), LolduConfig(r=4, lora_alpha=1.0, target_modules=["a", "b"]))
    for name, host in model.hosts():
        ad = host.adapters["default"]
        pivots = torch.linalg.lu(host.base_layer.weight.double())[2].diagonal()[:4]
        torch.testing.assert_close(ad.vector_z.double(), pivots)  # z = D_r
        assert ad.scaling_factor.item() == pytest.approx(0.25)  # σ = α / r
        assert not ad.loldu_L.requires_grad and not ad.loldu_U.requires_grad
    assert model.trainable_summary()["trainable"] == (4 + 1) + (4 + 1)
    x = torch.randn(3, 12)
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base, atol=0, rtol=0)


@pytest.mark.parametrize("init_method", ["zeros", "ones", "constant"])
@torch.no_grad()
def test_ablation_inits_start_z_elsewhere_over_the_same_residual(init_method):
    model = gf.adapt(Net(), LolduConfig(r=2, target_modules=["a"], init_method=init_method))
    host = dict(model.hosts())["a"]
    ad = host.adapters["default"]
    P, L, U = torch.linalg.lu(host.base_layer.weight.double())
    D = U.diagonal()[:2]
    want = {"zeros": torch.zeros(2), "ones": torch.ones(2), "constant": D.mean().expand(2)}[init_method]
    torch.testing.assert_close(ad.vector_z.double(), want.double())
    Lr, Ur = P @ L[:, :2], U[:2] / D[:, None]
    dw = 0.5 * Lr @ torch.diag(want.double() - D) @ Ur  # σ₀ (z₀ − D_r): W_res + σ₀ L z₀ U − W
    torch.testing.assert_close(host.methods["default"].delta_weight(ad, host).double(), dw, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_the_file_holds_only_z_and_sigma_and_loading_redecomposes_the_base(tmp_path):
    from safetensors.torch import load_file
    model = trained(gf.adapt(Net(), LolduConfig(r=3, target_modules=["a", "b"])))
    model.save_adapter(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "base_model.model.a.vector_z": (3,), "base_model.model.a.scaling_factor": (),
        "base_model.model.b.vector_z": (3,), "base_model.model.b.scaling_factor": ()}
    x = torch.randn(4, 12)
    loaded = gf.load(Net(), tmp_path / "a")
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-5)
    # the factors come from the base it is loaded onto: another base gives another L, U
    other = gf.load(Net(seed=1), tmp_path / "a")
    ours, theirs = dict(loaded.hosts())["a"].adapters["default"], dict(other.hosts())["a"].adapters["default"]
    assert torch.equal(ours.vector_z, theirs.vector_z) and not torch.allclose(ours.loldu_U, theirs.loldu_U)


@torch.no_grad()
def test_merging_from_files_redecomposes_the_base_weight(tmp_path):
    from safetensors.torch import save_file

    from grafting.io.peft_format import inspect_adapter
    from grafting.merge import open_input
    model = trained(gf.adapt(Net(), LolduConfig(r=3, lora_alpha=3.0, target_modules=["a", "b"])))
    model.save_adapter(tmp_path / "loldu")
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in Net().state_dict().items()}, tmp_path / "base" / "model.safetensors")
    merged = open_input(tmp_path / "loldu", base=open_input(tmp_path / "base"))
    hosts = dict(model.hosts())
    for name in ("a", "b"):
        host = hosts[name]
        expect = host.base_layer.weight + host.methods["default"].delta_weight(host.adapters["default"], host)
        torch.testing.assert_close(merged.get(f"{name}.weight"), expect, atol=1e-6, rtol=1e-5)
    assert inspect_adapter(tmp_path / "loldu")["ranks"] == [3]
    with pytest.raises(gf.GraftingError, match="LDU decomposition.*pass base_weight"):
        gf.AdapterReader(tmp_path / "loldu").delta_weight("a")


@torch.no_grad()
def test_conv2d_uses_the_flattened_kernel_view():
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))
    torch.manual_seed(0)
    w, bias = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    model = trained(gf.adapt(net, LolduConfig(r=2, target_modules=["0"])))
    host = dict(model.hosts())["0"]
    ad = host.adapters["default"]
    P, L, U = torch.linalg.lu(w.reshape(5, -1).double())
    D = U.diagonal()[:2]
    dw = (P @ L[:, :2]) @ torch.diag(ad.scaling_factor.double() * ad.vector_z.double() - 0.5 * D) @ (U[:2] / D[:, None])
    x = torch.randn(2, 3, 6, 6)
    expect = torch.nn.functional.conv2d(x, (w.double() + dw.reshape(w.shape)).float(), bias, padding=1)
    torch.testing.assert_close(model(x), expect, atol=1e-5, rtol=1e-5)


def test_bad_configs_and_shapes_are_refused_clearly():
    with pytest.raises(gf.GraftingError, match="'r' must be a positive integer"):
        LolduConfig(r=0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'lora_alpha' must be a positive number"):
        LolduConfig(lora_alpha=0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'init_method' must be one of"):
        LolduConfig(init_method="kaiming", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'bias' must be one of"):
        LolduConfig(bias="lora_only", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match=r"module 'b'.*'r' = 8 exceeds min\(out_features, fan_in\) = 6"):
        gf.adapt(Net(), LolduConfig(r=8, target_modules=["b"]))
    rank_one = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        rank_one[0].weight.copy_(torch.outer(torch.arange(1.0, 5.0), torch.ones(4)))
    with pytest.raises(gf.GraftingError, match=r"layer '0'.*zero pivot among its first r = 2"):
        gf.adapt(rank_one, LolduConfig(r=2, target_modules=["0"]))
