"""MiSS / Bone (arXiv 2409.15371): the three forms' rules on small tensors (balance, mini, bat), parameter counts,
adapters crossing between peft and grafting in both directions per form, merged weights equal to peft's, merging
from files, and shapes the method cannot handle refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grafting as gf
from grafting.methods.miss import MissConfig
from toys import Mlp as Net

peft = pytest.importorskip("peft")


# r = 5 does not divide a's in_features (12): the last shard is partial
FORMS = {"balance": dict(r=5, init_weights=True), "mini": dict(r=5, mini_r=2, init_weights="mini"),
         "bat": dict(r=2, init_weights="bat")}
METHOD = {"balance": "miss", "mini": "miss-mini", "bat": "miss-bat"}


def randomized(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "miss_block" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def expected_delta(form: str, D: torch.Tensor, W: torch.Tensor, r: int) -> torch.Tensor:
    """ΔW entry by entry, straight from the paper's / peft's definition."""
    out, fan_in = W.shape
    dw = torch.zeros(out, fan_in)
    for o in range(out):
        for j in range(fan_in):
            if form == "balance":
                dw[o, j] = D[j % r, o]
            elif form == "mini":
                dw[o, j] = D[j % r, o % D.shape[1]]
    if form == "bat":
        for bo in range(out // r):
            for bi in range(fan_in // r):
                blk = W[bo * r:(bo + 1) * r, bi * r:(bi + 1) * r]
                dw[bo * r:(bo + 1) * r, bi * r:(bi + 1) * r] = blk @ D[bo] + D[bo]
    return dw


@pytest.mark.parametrize("form", FORMS)
@torch.no_grad()
def test_forward_is_the_rule_of_each_form(form):
    cfg = MissConfig(target_modules=["a"], **FORMS[form])
    assert cfg.method == METHOD[form]
    model = randomized(gf.adapt(Net(), cfg))
    host = dict(model.hosts())["a"]
    D, W, b0 = host.adapters["default"].miss_block, host.base_layer.weight, host.base_layer.bias
    dw = expected_delta(form, D, W, cfg.r)
    assert dw.abs().sum() > 0
    x = torch.randn(4, 12)
    torch.testing.assert_close(host(x), x @ (W + dw).t() + b0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(host.methods["default"].delta_weight(host.adapters["default"], host), dw,
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("form,per_layer", [("balance", lambda r, m, out: r * out),
                                            ("mini", lambda r, m, out: r * m),
                                            ("bat", lambda r, m, out: out * r)])
def test_starts_at_the_base_and_trains_the_papers_parameter_count(form, per_layer):
    fields = FORMS[form]
    model = gf.adapt(Net(), MissConfig(target_modules=["a", "b"], **fields))
    r, mini_r = fields["r"], fields.get("mini_r", 1)
    assert model.trainable_summary()["trainable"] == per_layer(r, mini_r, 10) + per_layer(r, mini_r, 6)
    x = torch.randn(3, 12)
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base)


def test_init_false_is_a_random_balance_block():
    model = gf.adapt(Net(), MissConfig(r=4, target_modules=["a"], init_weights=False))
    assert model.peft_config["default"].method == "miss"
    block = dict(model.hosts())["a"].adapters["default"].miss_block
    assert block.shape == (4, 10) and block.abs().min() > 0


@pytest.mark.parametrize("form", FORMS)
@torch.no_grad()
def test_adapters_cross_between_peft_and_grafting(tmp_path, form):
    x = torch.randn(4, 12)
    fields = dict(target_modules=["a", "b"], **FORMS[form])
    theirs = randomized(peft.get_peft_model(Net(), peft.MissConfig(**fields)), seed=1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = gf.load(Net(), tmp_path / "peft")
    assert ours.peft_config["default"].method == METHOD[form]
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)

    mine = randomized(gf.adapt(Net(), MissConfig(**fields)), seed=2)
    mine.save_adapter(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
    torch.testing.assert_close(loaded(x), mine(x), atol=1e-6, rtol=1e-5)
    back = gf.load(Net(), tmp_path / "ours")
    torch.testing.assert_close(back(x), mine(x), atol=0, rtol=0)

    # merged weights equal peft's merge (bat folds W(I + D) + D, the others add the shared block)
    merged_peft, merged_ours = loaded.merge_and_unload(), mine.merge_and_unload()
    for name in ("a", "b"):
        torch.testing.assert_close(getattr(merged_ours, name).weight, getattr(merged_peft, name).weight,
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
@torch.no_grad()
def test_merging_from_files_uses_the_base_weight(tmp_path, form):
    from safetensors.torch import save_file

    from grafting.io.peft_format import inspect_adapter
    from grafting.merge import open_input
    mine = randomized(gf.adapt(Net(), MissConfig(target_modules=["a", "b"], **FORMS[form])))
    mine.save_adapter(tmp_path / "miss")
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in Net().state_dict().items()}, tmp_path / "base" / "model.safetensors")
    merged = open_input(tmp_path / "miss", base=open_input(tmp_path / "base"))
    hosts = dict(mine.hosts())
    for name in ("a", "b"):
        host = hosts[name]
        expect = host.base_layer.weight + host.methods["default"].delta_weight(host.adapters["default"], host)
        torch.testing.assert_close(merged.get(f"{name}.weight"), expect, atol=1e-6, rtol=1e-5)
    info = inspect_adapter(tmp_path / "miss")
    assert info["ranks"] == [FORMS[form]["r"]]


def test_unmerging_bat_inverts_the_block_affine_map():
    model = randomized(gf.adapt(Net(), MissConfig(r=2, target_modules=["a"], init_weights="bat")))
    host = dict(model.hosts())["a"]
    w0 = host.base_layer.weight.detach().clone()
    model.merge()
    assert not torch.allclose(host.base_layer.weight, w0)
    model.unmerge()
    torch.testing.assert_close(host.base_layer.weight, w0, atol=1e-6, rtol=1e-6)


def test_bad_configs_and_shapes_are_refused_clearly():
    with pytest.raises(gf.GraftingError, match="'r' must be a positive integer"):
        MissConfig(r=0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'mini_r' must be a positive integer"):
        MissConfig(mini_r=0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'init_weights' must be one of"):
        MissConfig(init_weights="bone", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="miss_dropout"):
        MissConfig(miss_dropout=1.0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'bias' must be one of"):
        MissConfig(bias="lora_only", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match=r"module 'a'.*'r' = 16 exceeds its in_features \(12\)"):
        gf.adapt(Net(), MissConfig(r=16, target_modules=["a"]))  # peft's default r = 64 on a small layer
    with pytest.raises(gf.GraftingError, match=r"'r' = 4 must divide in_features \(12\) and out_features \(10\)"):
        gf.adapt(Net(), MissConfig(r=4, target_modules=["a"], init_weights="bat"))
    with pytest.raises(gf.GraftingError, match=r"'mini_r' = 3 must divide out_features \(10\)"):
        gf.adapt(Net(), MissConfig(r=2, mini_r=3, target_modules=["a"], init_weights="mini"))
    with pytest.raises(gf.GraftingError, match="does not support conv2d"):
        gf.adapt(nn.Sequential(nn.Conv2d(3, 4, 3)), MissConfig(r=2, target_modules=["0"]))
