"""SoMA (arXiv 2412.04077): the minor-component split W = W_res + s·B A with A = √(S/s) Vᵀ, B = U √(S/s) over the
last r singular components, the residual base and its undoing, saving against the original base (a plain LoRA
peft loads) or natively, ΔW from files, and the annealed weight decay applied by on_step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import grafting as gf
from grafting.methods.soma import SomaConfig, annealed_weight_decay

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(12, 10), nn.Linear(10, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def adapted(**kw):
    return gf.adapt(Net(), SomaConfig(**{"r": 3, "lora_alpha": 6, "target_modules": ["a", "b"], **kw}))


@torch.no_grad()
def test_init_takes_the_minor_components_and_leaves_the_residual_as_base():
    W = Net().a.weight.double()
    model = adapted()
    host = dict(model.hosts())["a"]
    ad = host.adapters["default"]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = (S[-3:] / 2.0).sqrt()  # s = α/r = 2: the official code divides S by the scale first
    A, B = ad.lora_A.double(), ad.lora_B.double()
    torch.testing.assert_close(A.norm(dim=1), root, atol=1e-6, rtol=1e-5)  # A = √(S/s) Vᵀ, B = U √(S/s)
    torch.testing.assert_close(B.norm(dim=0), root, atol=1e-6, rtol=1e-5)
    for j in range(3):  # each component is the j-th smallest singular triplet (sign-free: u v^T)
        torch.testing.assert_close(2.0 * torch.outer(B[:, j], A[j]),
                                   S[7 + j] * torch.outer(U[:, 7 + j], Vh[7 + j]), atol=1e-6, rtol=1e-5)
    residual = host.base_layer.weight.double()
    torch.testing.assert_close(residual, W - U[:, -3:] @ torch.diag(S[-3:]) @ Vh[-3:], atol=1e-6, rtol=1e-5)
    kept = torch.linalg.svdvals(residual)
    torch.testing.assert_close(kept[:7], S[:7], atol=1e-5, rtol=1e-5)  # the principal part is untouched
    assert kept[7:].abs().max() < 1e-5  # the minor part now lives in the adapter
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), Net()(x), atol=1e-6, rtol=1e-5)  # training starts at the base model
    expect = x @ residual.float().t() + host.base_layer.bias + 2.0 * (x @ ad.lora_A.t()) @ ad.lora_B.t()
    torch.testing.assert_close(host(x), expect, atol=1e-6, rtol=1e-5)
    assert model.trainable_summary()["trainable"] == 3 * (12 + 10) + 3 * (10 + 6)
    model.delete_adapter("default")
    torch.testing.assert_close(host.base_layer.weight, Net().a.weight, atol=1e-6, rtol=1e-6)


def trained(model):
    with torch.no_grad():
        for _, host in model.hosts():
            for p in host.adapters["default"].parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


@torch.no_grad()
def test_saved_adapter_applies_to_the_original_base_in_peft_and_natively(tmp_path):
    model = trained(adapted())
    x = torch.randn(4, 12)
    expect = model(x)
    model.save_adapter(tmp_path / "lora")  # a rank-2r LoRA against the original base
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path / "lora")
    assert theirs.peft_config["default"].r == 6
    torch.testing.assert_close(theirs(x), expect, atol=1e-5, rtol=1e-5)
    model.save_adapter(tmp_path / "native", convert_init=False)
    native = gf.load(Net(), tmp_path / "native")
    assert native.peft_config["default"].method == "soma"
    torch.testing.assert_close(native(x), expect, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_delta_from_a_native_file_is_against_the_original_base(tmp_path):
    from grafting.io.peft_format import read_tensors
    model = trained(adapted())
    model.save_adapter(tmp_path / "native", convert_init=False)
    tensors = read_tensors(tmp_path / "native")
    method, cfg = gf.get_method("soma"), model.peft_config["default"]
    layer = {"lora_A": tensors["base_model.model.a.lora_A.weight"],
             "lora_B": tensors["base_model.model.a.lora_B.weight"]}
    dw = method.delta_weight_from_tensors(layer, cfg, "a", "linear", {}, base_weight=Net().a.weight)
    merged = model.merge_and_unload()
    torch.testing.assert_close(Net().a.weight + dw, merged.a.weight, atol=1e-5, rtol=1e-5)
    with pytest.raises(gf.GraftingError, match="needs the base"):
        method.delta_weight_from_tensors(layer, cfg, "a", "linear", {})


def test_the_annealed_weight_decay_follows_the_papers_cosine():
    cfg = SomaConfig(target_modules=["a"])
    assert annealed_weight_decay(cfg, 0, 100) == pytest.approx(0.05)
    assert annealed_weight_decay(cfg, 50, 100) == pytest.approx((0.05 + 1e-5) / 2)
    assert annealed_weight_decay(cfg, 100, 100) == pytest.approx(1e-5)
    model = adapted(soma_decay_lr=0.5)  # a large rate so the shrink is visible
    model.add_adapter("idle", SomaConfig(r=3, lora_alpha=6, target_modules=["a", "b"]))
    ad = dict(model.hosts())["a"].adapters
    before = {n: ad[n].lora_A.detach().clone() for n in ("default", "idle")}
    model.on_step(26, 100)  # the 26th step: λ at t = 25
    lam = 1e-5 + (0.05 - 1e-5) * (1 + math.cos(math.pi * 0.25)) / 2
    torch.testing.assert_close(ad["default"].lora_A, before["default"] * (1 - 0.5 * lam))
    assert torch.equal(ad["idle"].lora_A, before["idle"])  # not active: not trained, not decayed
    off = adapted(soma_decay_lr=0.0)
    a0 = dict(off.hosts())["a"].adapters["default"].lora_A.detach().clone()
    off.on_step(1, 10)
    assert torch.equal(dict(off.hosts())["a"].adapters["default"].lora_A, a0)


def test_bad_configs_are_refused_clearly():
    with pytest.raises(gf.GraftingError, match="'soma_weight_decay_min'"):
        SomaConfig(soma_weight_decay=0.01, soma_weight_decay_min=0.1, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'soma_decay_lr'"):
        SomaConfig(soma_decay_lr=-1.0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'init_lora_weights'"):
        SomaConfig(init_lora_weights="pissa", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'use_rslora'"):
        SomaConfig(use_rslora=True, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="r=12 exceeds the 10 singular components"):
        gf.adapt(Net(), SomaConfig(r=12, target_modules=["a"]))


@torch.no_grad()
def test_on_a_packed_base_the_residual_is_requantized_and_the_adapter_adds_the_minor_part():
    from test_host_protocol import PackedInt4Linear, packed_model
    base = packed_model()
    q = base[0]
    W = q.dequantize().clone()
    model = gf.adapt(base, SomaConfig(r=3, lora_alpha=3, target_modules=["0"]))
    ad = dict(model.hosts())["0"].adapters["default"]
    expected = PackedInt4Linear((W.double() - ad.lora_B.double() @ ad.lora_A.double()).float(), q.bias)
    assert torch.equal(q.packed, expected.packed) and torch.equal(q.scales, expected.scales)
    x = torch.randn(4, 12)
    torch.testing.assert_close(model.base_model[0](x), q(x) + (x @ ad.lora_A.t()) @ ad.lora_B.t())
