"""Host layers: folding one adapter's ΔW into the weight for long inputs without gradients."""

from __future__ import annotations

import pytest
import torch

import grafting as gf
from conftest import make_toy, randomize


def adapted(kind, method, dropout=0.0):
    model = gf.adapt(make_toy(kind), gf.LoraConfig(r=2, lora_alpha=4, target_modules=["target"],
                                                   use_dora=method == "dora", lora_dropout=dropout))
    randomize(model)
    return model, dict(model.hosts())["target"]


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_folded_forward_equals_adapter_forward(kind, method):
    model, host = adapted(kind, method)
    model.eval()
    x = model.base_model.make_input(rows=4)  # 20 tokens: past the fold point of a 12 -> 10 layer
    weight_before = host.base_layer.weight.detach().clone()
    with torch.no_grad():
        assert host._fold_pays("default", x)
        folded = host(x)
    unfolded = host(x)  # gradients on: the adapter's own two matmuls
    assert not host._fold_pays("default", x)
    torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=1e-5)
    assert torch.equal(host.base_layer.weight, weight_before)  # folded per call, never written into the base
    assert not folded.requires_grad


def test_fold_only_where_it_is_exact_and_cheaper():
    model, host = adapted("linear", "lora", dropout=0.5)
    long, short = torch.randn(4, 5, 12), torch.randn(1, 1, 12)
    with torch.no_grad():
        model.train()
        assert not host._fold_pays("default", long)  # dropout is active: the merged weight is not the forward
        model.eval()
        assert host._fold_pays("default", long)
        assert not host._fold_pays("default", short)  # 1 token: two thin matmuls cost less than a fold
        assert not host._fold_pays("default", long.double())  # dtype differs from the factors
    model.eval()
    assert not host._fold_pays("default", long)  # trainable factors with gradients on
    for p in model.parameters():
        p.requires_grad_(False)
    assert host._fold_pays("default", long)  # frozen adapter: nothing needs a gradient through the weight


def test_conv2d_is_never_folded():
    model, host = adapted("conv2d", "lora")
    with torch.no_grad():
        assert not host._fold_pays("default", torch.randn(8, 3, 6, 6))
