"""DyLoRA (arXiv 2210.07558): the truncated forward (α/b)·B[:, :b]A[:b], the per-step rank distribution p_B, the
frozen mode's gradients (only component b), the chosen inference rank, and the plain-LoRA export in peft."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import grafting as gf
from grafting.methods.dylora import DyLoraConfig, sampled_rank, set_eval_rank
from toys import Mlp as Net

peft = pytest.importorskip("peft")


def adapted(**kw):
    cfg = dict(r=6, lora_alpha=12, target_modules=["a", "b"], init_lora_weights=False)
    return gf.adapt(Net(), DyLoraConfig(**{**cfg, **kw}))


def expected_out(host, x, b):
    ad = host.adapters["default"]
    W0, b0 = host.base_layer.weight, host.base_layer.bias
    return x @ W0.t() + b0 + (12 / b) * (x @ ad.lora_A[:b].t()) @ ad.lora_B[:, :b].t()


def test_training_forward_uses_the_sampled_rank_and_eval_the_chosen_rank():
    model = adapted()
    host = dict(model.hosts())["a"]
    x = torch.randn(4, 12)
    torch.testing.assert_close(host(x), expected_out(host, x, 6))  # before the first on_step: eval_rank = r
    model.on_step(3, 10)
    b = sampled_rank(model.peft_config["default"], 3)
    assert all(h.adapters["default"].train_rank == b for _, h in model.hosts())  # one b for the whole model
    torch.testing.assert_close(host(x), expected_out(host, x, b), atol=1e-6, rtol=1e-5)
    model.eval()
    torch.testing.assert_close(host(x), expected_out(host, x, 6), atol=1e-6, rtol=1e-5)
    set_eval_rank(model, 2)
    torch.testing.assert_close(host(x), expected_out(host, x, 2), atol=1e-6, rtol=1e-5)
    dw = host.methods["default"].delta_weight(host.adapters["default"], host)
    ad = host.adapters["default"]
    torch.testing.assert_close(dw, 6 * ad.lora_B[:, :2] @ ad.lora_A[:2])


def test_sampled_ranks_are_uniform_over_r_min_to_r_and_reproducible():
    cfg = DyLoraConfig(r=6, r_min=2, target_modules=["a"], dylora_seed=5)
    ranks = [sampled_rank(cfg, t) for t in range(3000)]
    counts = Counter(ranks)
    assert set(counts) == {2, 3, 4, 5, 6}
    for k in range(2, 7):  # 600 expected each; 5 standard deviations of a binomial is about 110
        assert abs(counts[k] - 600) < 110, counts
    assert ranks == [sampled_rank(cfg, t) for t in range(3000)]  # a pure function of (seed, step): resumable
    other = DyLoraConfig(r=6, r_min=2, target_modules=["a"], dylora_seed=6)
    assert ranks[:50] != [sampled_rank(other, t) for t in range(50)]


@pytest.mark.parametrize("frozen", [True, False])
def test_gradients_reach_only_component_b_in_frozen_mode(frozen):
    model = adapted(dylora_frozen=frozen)
    step = next(t for t in range(100) if 1 < sampled_rank(model.peft_config["default"], t) < 6)
    model.on_step(step, 100)
    b = sampled_rank(model.peft_config["default"], step)
    model(torch.randn(4, 12)).pow(2).sum().backward()
    ad = dict(model.hosts())["a"].adapters["default"]
    live = [b - 1] if frozen else list(range(b))
    for j in range(6):
        a_grad, b_grad = ad.lora_A.grad[j].abs().sum(), ad.lora_B.grad[:, j].abs().sum()
        assert (a_grad > 0) == (j in live) and (b_grad > 0) == (j in live), (j, b)


def test_parameter_count_init_and_bad_configs():
    model = gf.adapt(Net(), DyLoraConfig(r=4, target_modules=["a", "b"]))
    assert model.trainable_summary()["trainable"] == 4 * (12 + 10) + 4 * (10 + 6)
    x = torch.randn(3, 12)
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base)  # B = 0: training starts from the base model
    with pytest.raises(gf.GraftingError, match="'r_min'"):
        DyLoraConfig(r=4, r_min=5, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'eval_rank'"):
        DyLoraConfig(r=4, eval_rank=0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'dylora_frozen'"):
        DyLoraConfig(dylora_frozen="yes", target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'use_rslora'"):
        DyLoraConfig(use_rslora=True, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'rank_pattern'"):
        DyLoraConfig(rank_pattern={"a": 2}, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="not a DyLoRA adapter"):
        set_eval_rank(gf.adapt(Net(), gf.LoraConfig(target_modules=["a"])), 2)


@torch.no_grad()
def test_export_is_plain_lora_at_the_eval_rank_and_native_keeps_every_rank(tmp_path):
    model = adapted(eval_rank=3).eval()
    x = torch.randn(4, 12)
    expect = model(x)
    model.save_adapter(tmp_path / "export")
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path / "export").eval()
    torch.testing.assert_close(theirs(x), expect, atol=1e-6, rtol=1e-5)
    assert gf.load(Net(), tmp_path / "export").peft_config["default"].r == 3

    model.save_adapter(tmp_path / "native", export=False)
    native = gf.load(Net(), tmp_path / "native").eval()
    assert native.peft_config["default"].method == "dylora"
    torch.testing.assert_close(native(x), expect, atol=0, rtol=0)
    set_eval_rank(native, 5)  # every component was saved: another rank can be chosen after loading
    set_eval_rank(model, 5)
    torch.testing.assert_close(native(x), model(x), atol=0, rtol=0)


@torch.no_grad()
def test_a_changed_eval_rank_is_never_served_stale_in_mixed_batches():
    model = adapted().eval()
    model.add_adapter("other", DyLoraConfig(r=6, lora_alpha=12, target_modules=["a", "b"], init_lora_weights=False))
    x = torch.randn(2, 12)
    model(x, adapter_names=["default", "other"])
    set_eval_rank(model, 1)
    mixed = model(x, adapter_names=["default", "other"])
    model.set_active("default")
    torch.testing.assert_close(mixed[0], model(x)[0], atol=1e-6, rtol=1e-5)
    fresh = copy.deepcopy(model)
    set_eval_rank(fresh, 6)
    assert not torch.allclose(fresh(x)[0], mixed[0], atol=1e-4)
