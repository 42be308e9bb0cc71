"""VeRA (arXiv 2310.11454): the paper's rule h = W0 x + Λ_b B Λ_d A x on small tensors, its parameter count, and
adapters crossing between peft and grafting in both directions (projections saved or regenerated from the key)."""

from __future__ import annotations

import pytest
import torch

import grafting as gf
from grafting.methods.vera import VeraConfig
from toys import Mlp as Net

peft = pytest.importorskip("peft")


def test_forward_is_the_papers_rule_with_sliced_shared_projections():
    net = Net()
    model = gf.adapt(net, VeraConfig(r=4, target_modules=["a", "b"], init_weights=False))
    shared = model.shared_tensors["default"]
    A, B = shared.vera_A, shared.vera_B
    assert A.shape == (4, 12) and B.shape == (10, 4)  # sized to the largest layer
    host = dict(model.hosts())["b"]
    ad = host.adapters["default"]
    x = torch.randn(5, 10)
    W0, b0 = host.base_layer.weight, host.base_layer.bias
    expect = x @ W0.t() + b0 + ad.vera_lambda_b * ((ad.vera_lambda_d * (x @ A[:, :10].t())) @ B[:6].t())
    torch.testing.assert_close(host(x), expect, atol=1e-6, rtol=1e-5)


def test_init_starts_at_the_base_and_the_parameter_count_is_out_plus_r():
    model = gf.adapt(Net(), VeraConfig(r=4, target_modules=["a", "b"], d_initial=0.1))
    for _, host in model.hosts():
        ad = host.adapters["default"]
        assert torch.all(ad.vera_lambda_b == 0) and torch.allclose(ad.vera_lambda_d, torch.full((4,), 0.1))
    x = torch.randn(3, 12)
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base)
    assert model.trainable_summary()["trainable"] == (10 + 4) + (6 + 4)
    assert not any(p.requires_grad for p in model.shared_tensors.parameters())


def test_shared_projections_equal_peft_for_the_same_key():
    theirs = peft.get_peft_model(Net(), peft.VeraConfig(r=4, target_modules=["a", "b"], projection_prng_key=7))
    ours = gf.adapt(Net(), VeraConfig(r=4, target_modules=["a", "b"], projection_prng_key=7))
    assert torch.equal(ours.shared_tensors["default"].vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(ours.shared_tensors["default"].vera_B, theirs.base_model.vera_B["default"])


@pytest.mark.parametrize("save_projection", [True, False])
@torch.no_grad()
def test_adapters_cross_between_peft_and_grafting(tmp_path, save_projection):
    x = torch.randn(4, 12)
    cfg = dict(r=4, target_modules=["a", "b"], projection_prng_key=3, save_projection=save_projection)
    theirs = peft.get_peft_model(Net(), peft.VeraConfig(init_weights=False, **cfg))
    theirs.save_pretrained(tmp_path / "peft")
    ours = gf.load(Net(), tmp_path / "peft")
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)

    mine = gf.adapt(Net(), VeraConfig(init_weights=False, **cfg))
    mine.save_adapter(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
    torch.testing.assert_close(loaded(x), mine(x), atol=1e-6, rtol=1e-5)
    back = gf.load(Net(), tmp_path / "ours")
    torch.testing.assert_close(back(x), mine(x), atol=0, rtol=0)


def test_vera_only_bias_trains_the_adapted_layers_biases():
    model = gf.adapt(Net(), VeraConfig(r=2, target_modules=["a"], bias="vera_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.a.base_layer.bias" in trainable and "base_model.head.bias" not in trainable


def test_bad_configs_are_refused_clearly():
    with pytest.raises(gf.GraftingError, match="'r' must be a positive integer"):
        VeraConfig(r=0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'bias' must be one of"):
        VeraConfig(bias="lora_only", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="vera_dropout"):
        VeraConfig(vera_dropout=1.5, target_modules=["a"])


@torch.no_grad()
def test_a_vera_adapter_merges_into_a_full_model_and_not_into_an_adapter(tmp_path):
    from safetensors.torch import save_file

    from grafting.merge import merge_adapters, open_input
    mine = gf.adapt(Net(), VeraConfig(r=4, target_modules=["a", "b"], init_weights=False))
    mine.save_adapter(tmp_path / "vera")
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in Net().state_dict().items()}, tmp_path / "base" / "model.safetensors")
    merged = open_input(tmp_path / "vera", base=open_input(tmp_path / "base"))
    hosts = dict(mine.hosts())
    for name in ("a", "b"):
        host = hosts[name]
        expect = host.base_layer.weight + host.methods["default"].delta_weight(host.adapters["default"], host)
        torch.testing.assert_close(merged.get(f"{name}.weight"), expect, atol=1e-6, rtol=1e-5)
    with pytest.raises(gf.GraftingError, match="'vera' adapter; merging into an adapter takes LoRA / DoRA"):
        merge_adapters([tmp_path / "vera", tmp_path / "vera"], "linear", tmp_path / "out")
    bare = gf.adapt(Net(), VeraConfig(r=4, target_modules=["a"], init_weights=False, save_projection=False))
    bare.save_adapter(tmp_path / "bare")
    with pytest.raises(gf.GraftingError, match="saved without its projections"):
        open_input(tmp_path / "bare", base=open_input(tmp_path / "base")).get("a.weight")
