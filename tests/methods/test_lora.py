"""LoRA (arXiv:2106.09685, Eq. 3) and rsLoRA (arXiv:2312.03732) against the papers' rules on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import grafting as gf
from toys import make_toy, randomize


def adapter_of(model):
    return dict(model.hosts())["target"].adapters["default"]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_rule(use_rslora):
    toy = make_toy("linear")
    W, b = toy.target.weight.detach().clone(), toy.target.bias.detach().clone()
    model = gf.adapt(toy, gf.LoraConfig(r=4, lora_alpha=6, target_modules=["target"], use_rslora=use_rslora))
    randomize(model)
    a = adapter_of(model)
    scale = 6 / math.sqrt(4) if use_rslora else 6 / 4
    x = torch.randn(3, 12)
    expected = x @ W.T + b + scale * (x @ a.lora_A.T @ a.lora_B.T)
    torch.testing.assert_close(model.base_model.target(x), expected)


def test_conv1d_rule_is_transposed_linear():
    toy = make_toy("conv1d")
    W, b = toy.target.weight.detach().clone(), toy.target.bias.detach().clone()  # W: (in, out)
    model = gf.adapt(toy, gf.LoraConfig(r=3, lora_alpha=3, target_modules=["target"]))
    randomize(model)
    a = adapter_of(model)
    x = torch.randn(2, 12)
    torch.testing.assert_close(model.base_model.target(x), x @ W + b + x @ a.lora_A.T @ a.lora_B.T)


def test_conv2d_rule():
    toy = make_toy("conv2d")
    W, b = toy.target.weight.detach().clone(), toy.target.bias.detach().clone()
    model = gf.adapt(toy, gf.LoraConfig(r=2, lora_alpha=4, target_modules=["target"]))
    randomize(model)
    a = adapter_of(model)
    x = torch.randn(2, 3, 5, 5)
    dW = (a.lora_B.reshape(10, 2) @ a.lora_A.reshape(2, -1)).reshape(W.shape)
    torch.testing.assert_close(model.base_model.target(x), F.conv2d(x, W + 2.0 * dW, b, padding=1),
                               atol=1e-5, rtol=1e-4)


def test_embedding_rule():
    toy = make_toy("embedding")
    E = toy.target.weight.detach().clone()
    model = gf.adapt(toy, gf.LoraConfig(r=2, lora_alpha=2, target_modules=["target"]))
    randomize(model)
    a = adapter_of(model)
    ids = torch.tensor([[0, 3, 19]])
    torch.testing.assert_close(model.base_model.target(ids), F.embedding(ids, E + (a.lora_B @ a.lora_A).T))


def test_inits():
    torch.manual_seed(0)
    kaiming = adapter_of(gf.adapt(make_toy("linear"), gf.LoraConfig(r=64, target_modules=["target"])))
    assert torch.count_nonzero(kaiming.lora_B) == 0
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) on fan_in 12
    assert kaiming.lora_A.abs().max() <= bound and kaiming.lora_A.abs().max() > 0.8 * bound
    gauss = adapter_of(gf.adapt(make_toy("linear"), gf.LoraConfig(r=64, init_lora_weights="gaussian",
                                                                   target_modules=["target"])))
    assert torch.count_nonzero(gauss.lora_B) == 0
    assert gauss.lora_A.std().item() == pytest.approx(1 / 64, rel=0.1)
    nonzero = adapter_of(gf.adapt(make_toy("linear"), gf.LoraConfig(init_lora_weights=False,
                                                                     target_modules=["target"])))
    assert torch.count_nonzero(nonzero.lora_B) == nonzero.lora_B.numel()
    emb = adapter_of(gf.adapt(make_toy("embedding"), gf.LoraConfig(target_modules=["target"])))
    assert torch.count_nonzero(emb.lora_A) == 0 and torch.count_nonzero(emb.lora_B) > 0


def test_low_rank_form_matches_delta_weight():
    model = gf.adapt(make_toy("linear"), gf.LoraConfig(r=3, lora_alpha=5, target_modules=["target"]))
    randomize(model)
    host = dict(model.hosts())["target"]
    method = gf.get_method("lora")
    A, B, s = method.low_rank(host.adapters["default"])
    torch.testing.assert_close(s * B @ A, method.delta_weight(host.adapters["default"], host))
