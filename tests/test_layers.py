"""Host layers: folding one adapter's ΔW into the weight for long inputs without gradients."""

from __future__ import annotations

import pytest
import torch

import grafting as gf
from toys import make_toy, randomize


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


class ScaledLinear(torch.nn.Linear):
    """A Linear subclass with its own forward: folding W + ΔW into F.linear would skip the scaling."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_no_fold_when_the_base_layer_is_not_a_plain_matmul():
    model, host = adapted("linear", "lora")
    model.eval()
    x = torch.randn(4, 5, 12)
    with torch.no_grad():
        assert host._fold_pays("default", x)
        handle = host.base_layer.register_forward_hook(lambda m, i, o: o * 3)
        assert not host._fold_pays("default", x)  # the hook must see (and may change) the base output
        hooked = host(x)
        handle.remove()
        torch.testing.assert_close(hooked, host(x) + 2 * host.base_layer(x))  # hook: 3·base; fold: 1·base

        host.base_layer.forward = lambda inp: torch.nn.functional.linear(inp, host.base_layer.weight)
        assert not host._fold_pays("default", x)  # an instance-level forward (accelerate's offload hooks)
        del host.base_layer.forward

    torch.manual_seed(1)
    scaled = ScaledLinear(12, 10)
    model = gf.adapt(torch.nn.Sequential(scaled), gf.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        host = dict(model.hosts())["0"]
        assert not host._fold_pays("default", x)
        a = host.adapters["default"]
        expected = scaled(x) + (x @ a.lora_A.t() @ a.lora_B.t()) * a.scaling  # the base's own forward, then ΔW
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_dora_merge_into_bf16_base_rounds_once():
    model, host = adapted("linear", "dora")
    host.base_layer.to(torch.bfloat16)
    a = host.adapters["default"]
    w32 = host.base_layer.weight.float()
    with torch.no_grad():
        direction = w32 + (a.lora_B @ a.lora_A) * a.scaling
        g = a.lora_magnitude / direction.norm(dim=1)  # Eq. (5): m / ||W0 + s·BA||_c, computed here in fp32
        expected = (g[:, None] * direction).to(torch.bfloat16)
        merged, _ = host.methods["default"].merge(a, host)
    assert torch.equal(merged.to(torch.bfloat16), expected)
