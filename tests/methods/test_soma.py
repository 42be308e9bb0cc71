"""SoMA (arXiv 2412.04077): the minor-component factors A₀ = √(S/s) Vᵀ, B₀ = U √(S/s) over the last r singular
components, kept as frozen buffers so that W x + s·(B A − B₀A₀) x equals the paper's W_res x + s·B A x while the
base weight stays untouched (outputs, gradients, dropout); saving as a rank-2r LoRA peft loads or natively, ΔW
from files, the annealed weight decay applied by on_step, and a packed base left byte for byte as it was."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import grafting as gf
from grafting.methods.soma import SomaConfig, annealed_weight_decay
from toys import KINDS, assert_rows_match, make_toy, randomize
from toys import Mlp as Net

peft = pytest.importorskip("peft")


def adapted(**kw):
    return gf.adapt(Net(), SomaConfig(**{"r": 3, "lora_alpha": 6, "target_modules": ["a", "b"], **kw}))


def paper_form(host, x, dropped=None):
    """The paper's h = W_res x + b + s·B A x, W_res = W − s·B₀A₀ formed by hand (float64), from the host's own
    factors; ``dropped``: the adapter branch's input after dropout (the residual base sees x itself)."""
    ad = host.adapters["default"]
    s = ad.scaling
    W = host.base_layer.weight.double()
    residual = W - s * ad.soma_B0.double() @ ad.soma_A0.double()
    xd = x if dropped is None else dropped
    return (x.double() @ residual.t() + host.base_layer.bias.double()
            + s * (xd.double() @ ad.lora_A.double().t()) @ ad.lora_B.double().t())


def test_the_split_keeps_the_minor_components_in_the_adapter_and_the_base_untouched():
    W = Net().a.weight.detach().clone()
    model = adapted()
    host = dict(model.hosts())["a"]
    ad = host.adapters["default"]
    assert torch.equal(host.base_layer.weight, W)  # the base weight is never written
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    root = (S[-3:] / 2.0).sqrt()  # s = α/r = 2: the official code divides S by the scale first
    A0, B0 = ad.soma_A0.double(), ad.soma_B0.double()
    assert torch.equal(ad.lora_A, ad.soma_A0) and torch.equal(ad.lora_B, ad.soma_B0)  # A, B start at A₀, B₀
    torch.testing.assert_close(A0.norm(dim=1), root, atol=1e-6, rtol=1e-5)  # A₀ = √(S/s) Vᵀ, B₀ = U √(S/s)
    torch.testing.assert_close(B0.norm(dim=0), root, atol=1e-6, rtol=1e-5)
    for j in range(3):  # each component is the j-th smallest singular triplet (sign-free: u vᵀ)
        torch.testing.assert_close(2.0 * torch.outer(B0[:, j], A0[j]),
                                   S[7 + j] * torch.outer(U[:, 7 + j], Vh[7 + j]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(2.0 * B0 @ A0, U[:, -3:] @ torch.diag(S[-3:]) @ Vh[-3:], atol=1e-6, rtol=1e-5)
    assert not any(b.requires_grad for b in (ad.soma_A0, ad.soma_B0))
    assert "soma_A0" not in ad.state_dict() and "soma_B0" not in ad.state_dict()  # recomputed, never saved

    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), Net()(x), atol=1e-6, rtol=1e-5)  # training starts at the base model
    # r(in + out) trainable per layer: A, B; the buffers are not parameters
    assert model.trainable_summary()["trainable"] == 3 * (12 + 10) + 3 * (10 + 6)

    with torch.no_grad():  # "trained": the forward is the paper's residual form, computed by hand
        for p in (ad.lora_A, ad.lora_B):
            p.add_(0.1 * torch.randn_like(p))
    xg = x.clone().requires_grad_(True)
    out = host(xg)
    torch.testing.assert_close(out.double(), paper_form(host, x), atol=1e-5, rtol=1e-5)
    # and so are the gradients of A, B and of the input
    g = torch.randn_like(out)
    out.backward(g)
    ours = (ad.lora_A.grad.clone(), ad.lora_B.grad.clone(), xg.grad.clone())
    A, B = (ad.lora_A.detach().clone().requires_grad_(True), ad.lora_B.detach().clone().requires_grad_(True))
    xp = x.clone().requires_grad_(True)
    residual = W - 2.0 * ad.soma_B0 @ ad.soma_A0
    (F.linear(xp, residual, host.base_layer.bias) + 2.0 * (xp @ A.t()) @ B.t()).backward(g)
    for mine, theirs in zip(ours, (A.grad, B.grad, xp.grad)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)

    with model.disabled():  # the true base, not a residual
        torch.testing.assert_close(model(x), Net()(x), atol=0, rtol=0)
    model.delete_adapter("default")
    assert torch.equal(host.base_layer.weight, W)


def test_dropout_acts_on_the_trained_branch_only_as_in_the_paper():
    model = adapted(lora_dropout=0.5)
    model.train()
    host = dict(model.hosts())["a"]
    ad = host.adapters["default"]
    with torch.no_grad():
        for p in (ad.lora_A, ad.lora_B):
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(6, 12)
    torch.manual_seed(7)
    out = host(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)  # the same mask
    assert not torch.equal(dropped, x)
    torch.testing.assert_close(out.double(), paper_form(host, x, dropped), atol=1e-5, rtol=1e-5)
    # dropping the frozen −s·B₀A₀ part as well would be a different function: check the test can tell
    wrong = paper_form(host, dropped)
    assert not torch.allclose(out.double(), wrong, atol=1e-3)
    model.eval()  # no dropout at inference: deterministic and equal to the paper's form on x
    torch.testing.assert_close(host(x).double(), paper_form(host, x), atol=1e-5, rtol=1e-5)


def test_soma_and_lora_share_a_layer_and_a_mixed_batch():
    model = adapted()
    model.add_adapter("second", SomaConfig(r=2, lora_alpha=2, target_modules=["a", "b"]))
    model.add_adapter("plain", gf.LoraConfig(r=2, target_modules=["a"]))
    randomize(model)
    x = torch.randn(5, 12)
    assert_rows_match(model, x, ["default", "plain", None, "second", "default"])
    model.delete_adapter("second")
    model.delete_adapter("plain")
    with model.disabled():
        torch.testing.assert_close(model(x), Net()(x), atol=0, rtol=0)


def trained(model):
    with torch.no_grad():
        for _, host in model.hosts():
            for p in host.adapters["default"].parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_the_default_save_is_a_rank_2r_lora_peft_loads(kind, tmp_path):
    model = gf.adapt(make_toy(kind), SomaConfig(r=3, lora_alpha=6, target_modules=["target"]))
    randomize(model)
    x = make_toy(kind).make_input()
    expect = model(x)
    model.save_adapter(tmp_path / "lora")
    theirs = peft.PeftModel.from_pretrained(make_toy(kind), tmp_path / "lora")
    cfg = theirs.peft_config["default"]
    assert (cfg.peft_type.value, cfg.r, cfg.lora_alpha) == ("LORA", 6, 12)  # α/r kept
    torch.testing.assert_close(theirs(x), expect, atol=1e-5, rtol=1e-5)
    ours = gf.load(make_toy(kind), tmp_path / "lora")
    assert ours.peft_config["default"].method == "lora"
    torch.testing.assert_close(ours(x), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", [{"export": False}, {"convert_init": False}])
@torch.no_grad()
def test_the_native_form_holds_the_trained_factors_and_reloads_onto_the_base(how, tmp_path):
    from grafting.io.peft_format import read_tensors
    model = trained(adapted())
    x = torch.randn(4, 12)
    expect = model(x)
    model.save_adapter(tmp_path / "native", **how)
    tensors = read_tensors(tmp_path / "native")
    assert sorted(tensors) == sorted(f"base_model.model.{m}.lora_{f}.weight" for m in "ab" for f in "AB")
    ad = dict(model.hosts())["a"].adapters["default"]
    assert torch.equal(tensors["base_model.model.a.lora_A.weight"], ad.lora_A)  # rank r: A, not [A; A₀]
    native = gf.load(Net(), tmp_path / "native")  # A₀, B₀ recomputed from the base it is loaded onto
    assert native.peft_config["default"].method == "soma"
    torch.testing.assert_close(native(x), expect, atol=1e-6, rtol=1e-5)
    other = dict(native.hosts())["a"].adapters["default"]
    assert torch.equal(other.soma_A0, ad.soma_A0) and torch.equal(other.soma_B0, ad.soma_B0)


@torch.no_grad()
def test_delta_from_a_native_file_needs_the_base(tmp_path):
    from grafting.io.peft_format import read_tensors
    model = trained(adapted())
    model.save_adapter(tmp_path / "native", export=False)
    tensors = read_tensors(tmp_path / "native")
    method, cfg = gf.get_method("soma"), model.peft_config["default"]
    layer = {"lora_A": tensors["base_model.model.a.lora_A.weight"],
             "lora_B": tensors["base_model.model.a.lora_B.weight"]}
    assert method.factors_from_tensors(layer, cfg, "a", "linear", {}) is None
    dw = method.delta_weight_from_tensors(layer, cfg, "a", "linear", {}, base_weight=Net().a.weight)
    merged = model.merge_and_unload()
    torch.testing.assert_close(Net().a.weight + dw, merged.a.weight, atol=1e-6, rtol=1e-5)
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
    before = {n: {k: t.detach().clone() for k, t in ad[n].state_dict(keep_vars=True).items()}
              for n in ("default", "idle")}
    buffers = (ad["default"].soma_A0.clone(), ad["default"].soma_B0.clone())
    model.on_step(26, 100)  # the 26th step: λ at t = 25
    lam = 1e-5 + (0.05 - 1e-5) * (1 + math.cos(math.pi * 0.25)) / 2
    for k in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ad["default"], k), before["default"][k] * (1 - 0.5 * lam))
        assert torch.equal(getattr(ad["idle"], k), before["idle"][k])  # not active: not trained, not decayed
    assert torch.equal(ad["default"].soma_A0, buffers[0]) and torch.equal(ad["default"].soma_B0, buffers[1])
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
    with pytest.raises(gf.GraftingError, match="'use_dora'"):
        SomaConfig(use_dora=True, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="r=12 exceeds the 10 singular components"):
        gf.adapt(Net(), SomaConfig(r=12, target_modules=["a"]))


@torch.no_grad()
def test_a_packed_base_keeps_its_bytes_and_the_adapter_starts_at_it(tmp_path):
    from test_host_protocol import packed_model
    base = packed_model()
    q = base[0]
    packed, scales = q.packed.clone(), q.scales.clone()
    reference = copy.deepcopy(base)
    model = gf.adapt(base, SomaConfig(r=3, lora_alpha=3, target_modules=["0"]))
    assert torch.equal(q.packed, packed) and torch.equal(q.scales, scales)  # never re-quantized
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=1e-5)
    host = dict(model.hosts())["0"]
    ad = host.adapters["default"]
    W = q.dequantize().double()  # the minor components are those of the dequantized weight
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(ad.soma_B0.double() @ ad.soma_A0.double(), U[:, -3:] @ torch.diag(S[-3:]) @ Vh[-3:],
                               atol=1e-5, rtol=1e-5)
    randomize(model)
    expect = q(x) + (x @ ad.lora_A.t()) @ ad.lora_B.t() - (x @ ad.soma_A0.t()) @ ad.soma_B0.t()
    torch.testing.assert_close(host(x), expect, atol=1e-5, rtol=1e-5)
    model.save_adapter(tmp_path / "native", export=False)
    model.delete_adapter("default")
    assert torch.equal(q.packed, packed) and torch.equal(q.scales, scales)
    model.load_adapter(tmp_path / "native", "again")  # A₀, B₀ recomputed from the packed base
    model.set_active("again")
    torch.testing.assert_close(host(x), expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(q.packed, packed) and torch.equal(q.scales, scales)
