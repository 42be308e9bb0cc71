"""RandLoRA (arXiv 2502.00987): the paper's rule ΔW = s·Σ_j B_j Λ_j A Γ_j on small tensors (both orientations),
its parameter count, its zero-update init, and adapters crossing between peft and grafting in both directions
(bases saved, or regenerated from the key bit for bit, dense and sparse)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grafting as gf
from grafting.methods.randlora import RandLoraConfig

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        # a: fan_in 12 > out 10 (scalings on the output side); b: fan_in 6 < out 10 (on the input side)
        self.a, self.b, self.head = nn.Linear(12, 10), nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.head(torch.tanh(self.b(h[..., :6])))


TARGETS = ["a", "b"]


@pytest.mark.parametrize("module", ["a", "b"])
def test_forward_is_the_papers_sum_of_scaled_random_bases(module):
    model = gf.adapt(Net(), RandLoraConfig(r=4, randlora_alpha=8, target_modules=TARGETS, init_weights=False))
    shared = model.shared_tensors["default"]
    A, B = shared.randlora_A, shared.randlora_B
    assert A.shape == (4, 1, 10) and B.shape == (12, 3, 4)  # min_g = 10, max_g = 12, n_g = ceil(10 / 4)
    host = dict(model.hosts())[module]
    ad = host.adapters["default"]
    fan_in, out = host.in_features, host.out_features
    lo, hi = min(fan_in, out), max(fan_in, out)
    with torch.no_grad():  # distinct Γ_j (as training makes them): the terms' sum has full rank
        ad.randlora_gamma.copy_(torch.randn(ad.randlora_gamma.shape))
    lam, gam = ad.randlora_lambda, ad.randlora_gamma
    n = lam.shape[1]
    assert n == -(-lo // 4)
    # term j, written on the smaller side: B_j (hi x r) diag(λ over the r rows it pairs with) A diag(γ_j)
    dw = torch.zeros(hi, lo)
    for j in range(n):
        for k in range(4):
            i = k * n + j  # row of the flattened (r, n, lo) scaled A
            bj, bk = divmod(i, 4)  # the flattened B column it meets (peft's order)
            dw += torch.outer(B[:hi, bj, bk], lam[k, j] * A[k, 0, :lo] * gam[j])
    dw = dw * (8 / 4)
    if lo != fan_in:
        dw = dw.t()
    x = torch.randn(5, fan_in)
    W0, b0 = host.base_layer.weight, host.base_layer.bias
    torch.testing.assert_close(host(x), x @ (W0 + dw).t() + b0, atol=1e-5, rtol=1e-5)
    A_f, B_f, s = host.methods["default"].low_rank(ad)
    assert A_f.shape == (n * 4, fan_in) and B_f.shape == (out, n * 4) and n * 4 >= lo  # full concatenated rank
    assert torch.linalg.matrix_rank((B_f @ A_f).detach()) == lo  # a full-rank update, unlike LoRA / VeRA


def test_init_starts_at_the_base_and_the_parameter_count_is_n_times_r_plus_min():
    model = gf.adapt(Net(), RandLoraConfig(r=4, target_modules=TARGETS))
    for _, host in model.hosts():
        ad = host.adapters["default"]
        lo = min(host.in_features, host.out_features)
        n = -(-lo // 4)
        assert torch.all(ad.randlora_lambda == 0)
        assert torch.all(ad.randlora_gamma == 1 / max(n, lo))
    x = torch.randn(3, 12)
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base)
    # a: min 10 -> n 3, 3·(4 + 10); b: min 6 -> n 2, 2·(4 + 6)
    assert model.trainable_summary()["trainable"] == 3 * (4 + 10) + 2 * (4 + 6)
    assert not any(p.requires_grad for p in model.shared_tensors.parameters())


@pytest.mark.parametrize("variant", [{}, {"sparse": True}, {"very_sparse": True}])
def test_shared_bases_and_init_equal_peft_for_the_same_key(variant):
    cfg = dict(r=3, target_modules=TARGETS, projection_prng_key=7, **variant)
    theirs = peft.get_peft_model(Net(), peft.RandLoraConfig(**cfg))
    ours = gf.adapt(Net(), RandLoraConfig(**cfg))
    assert torch.equal(ours.shared_tensors["default"].randlora_A, theirs.base_model.randlora_A["default"])
    assert torch.equal(ours.shared_tensors["default"].randlora_B, theirs.base_model.randlora_B["default"])
    hosts = dict(ours.hosts())
    for name in TARGETS:
        layer = getattr(theirs.base_model.model, name)
        ad = hosts[name].adapters["default"]
        assert torch.equal(ad.randlora_lambda, layer.randlora_lambda["default"])
        assert torch.equal(ad.randlora_gamma, layer.randlora_gamma["default"])


@pytest.mark.parametrize("save_projection", [True, False])
@torch.no_grad()
def test_adapters_cross_between_peft_and_grafting(tmp_path, save_projection):
    x = torch.randn(4, 12)
    cfg = dict(r=4, randlora_alpha=16, target_modules=TARGETS, projection_prng_key=3,
               save_projection=save_projection)
    theirs = peft.get_peft_model(Net(), peft.RandLoraConfig(init_weights=False, **cfg))
    theirs.save_pretrained(tmp_path / "peft")
    ours = gf.load(Net(), tmp_path / "peft")
    with theirs.disable_adapter():
        assert not torch.allclose(theirs(x), ours(x), atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    reader = gf.AdapterReader(tmp_path / "peft")  # peft's per-layer copies of the bases belong to their layers
    assert reader.modules() == TARGETS and all(e.role != "full" for e in reader)
    if save_projection:
        host = dict(ours.hosts())["a"]
        torch.testing.assert_close(reader.delta_weight("a", host.base_layer.weight),
                                   host.methods["default"].delta_weight(host.adapters["default"], host))

    mine = gf.adapt(Net(), RandLoraConfig(init_weights=False, **cfg))
    mine.save_adapter(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
    torch.testing.assert_close(loaded(x), mine(x), atol=1e-5, rtol=1e-5)
    back = gf.load(Net(), tmp_path / "ours")
    torch.testing.assert_close(back(x), mine(x), atol=0, rtol=0)


@torch.no_grad()
def test_peft_merge_equals_grafting_delta_weight():
    theirs = peft.get_peft_model(Net(), peft.RandLoraConfig(r=4, target_modules=TARGETS, init_weights=False))
    ours = gf.adapt(Net(), RandLoraConfig(r=4, target_modules=TARGETS))
    hosts = dict(ours.hosts())
    for name in TARGETS:
        layer = getattr(theirs.base_model.model, name)
        ad = hosts[name].adapters["default"]
        ad.randlora_lambda.copy_(layer.randlora_lambda["default"])
        ad.randlora_gamma.copy_(layer.randlora_gamma["default"])
        dw = hosts[name].methods["default"].delta_weight(ad, hosts[name])
        torch.testing.assert_close(dw, layer.get_delta_weight("default"), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_file_merges_into_a_full_model_given_the_base(tmp_path):
    from safetensors.torch import save_file

    from grafting.merge import open_input
    mine = gf.adapt(Net(), RandLoraConfig(r=4, target_modules=TARGETS, init_weights=False))
    mine.save_adapter(tmp_path / "rl")
    assert gf.AdapterReader(tmp_path / "rl").factors("a") is None
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in Net().state_dict().items()}, tmp_path / "base" / "model.safetensors")
    merged = open_input(tmp_path / "rl", base=open_input(tmp_path / "base"))
    for name, host in mine.hosts():
        expect = host.base_layer.weight + host.methods["default"].delta_weight(host.adapters["default"], host)
        torch.testing.assert_close(merged.get(f"{name}.weight"), expect, atol=1e-5, rtol=1e-5)
    from grafting.io.peft_format import inspect_adapter
    assert inspect_adapter(tmp_path / "rl")["ranks"] == [8, 12]  # n·r: 2·4 for b, 3·4 for a


def test_bad_configs_are_refused_clearly():
    with pytest.raises(gf.GraftingError, match="'r' must be a positive integer"):
        RandLoraConfig(r=0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'randlora_alpha' must be a positive number"):
        RandLoraConfig(randlora_alpha=0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'bias' must be one of"):
        RandLoraConfig(bias="lora_only", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="randlora_dropout"):
        RandLoraConfig(randlora_dropout=1.0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'sparse' must be true or false"):
        RandLoraConfig(sparse="yes", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'projection_prng_key' must be an integer"):
        RandLoraConfig(projection_prng_key=1.5, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="does not support embedding"):
        gf.adapt(nn.Sequential(nn.Embedding(5, 4)), RandLoraConfig(target_modules=["0"]))
