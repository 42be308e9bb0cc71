"""DoRA (arXiv:2402.09353) against Eq. (5) and Sec. 4.3 on small tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import grafting as gf
from toys import make_toy, randomize


def dora_model(kind="linear", r=3, alpha=6):
    toy = make_toy(kind)
    W = toy.target.weight.detach().clone()
    b = None if kind == "embedding" else toy.target.bias.detach().clone()
    model = gf.adapt(toy, gf.LoraConfig(r=r, lora_alpha=alpha, use_dora=True, target_modules=["target"]))
    return model, W, b, dict(model.hosts())["target"].adapters["default"]


def test_magnitude_starts_at_column_norm():
    model, W, _, a = dora_model()
    torch.testing.assert_close(a.lora_magnitude, W.norm(dim=1))  # per output feature


def test_linear_matches_eq5():
    model, W, b, a = dora_model()
    randomize(model)
    s = 6 / 3
    V = W + s * a.lora_B @ a.lora_A
    W_prime = a.lora_magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
    x = torch.randn(4, 12)
    torch.testing.assert_close(model.base_model.target(x), F.linear(x, W_prime, b), atol=1e-5, rtol=1e-5)


def test_conv2d_and_embedding_match_eq5():
    model, W, b, a = dora_model("conv2d", r=2, alpha=2)
    randomize(model)
    V = W + (a.lora_B.reshape(10, 2) @ a.lora_A.reshape(2, -1)).reshape(W.shape)
    W_prime = a.lora_magnitude.view(-1, 1, 1, 1) * V / V.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(model.base_model.target(x), F.conv2d(x, W_prime, b, padding=1), atol=1e-5, rtol=1e-4)

    model, E, _, a = dora_model("embedding", r=2, alpha=2)
    randomize(model)
    V = E + (a.lora_B @ a.lora_A).T  # (vocab, dim); PEFT's magnitude is per embedding dimension
    E_prime = a.lora_magnitude[None, :] * V / V.norm(dim=0, keepdim=True)
    ids = torch.tensor([[1, 5, 7]])
    torch.testing.assert_close(model.base_model.target(ids), F.embedding(ids, E_prime), atol=1e-5, rtol=1e-5)


def test_norm_is_a_constant_for_gradients():
    """Sec. 4.3: gradients flow as if ||W + sBA|| were a constant."""
    model, W, b, a = dora_model()
    randomize(model)
    x = torch.randn(4, 12)
    model.base_model.target(x).pow(2).sum().backward()
    A = a.lora_A.detach().clone().requires_grad_()
    B = a.lora_B.detach().clone().requires_grad_()
    m = a.lora_magnitude.detach().clone().requires_grad_()
    V = W + 2.0 * B @ A
    W_prime = m[:, None] * V / V.norm(dim=1, keepdim=True).detach()
    F.linear(x, W_prime, b).pow(2).sum().backward()
    for ours, ref in ((a.lora_A, A), (a.lora_B, B), (a.lora_magnitude, m)):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-4, rtol=1e-4)


def test_cached_norm_follows_parameter_updates():
    model, W, b, a = dora_model()
    randomize(model)
    model.eval()
    x = torch.randn(2, 12)
    model(x)  # fills the cache
    with torch.no_grad():
        a.lora_A.add_(0.5)
        a.lora_magnitude.mul_(2.0)
    V = W + 2.0 * a.lora_B @ a.lora_A
    W_prime = a.lora_magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
    torch.testing.assert_close(model.base_model.target(x), F.linear(x, W_prime, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_in_mixed_batch_with_lora(kind):
    model, *_ = dora_model(kind)
    model.add_adapter("plain", gf.LoraConfig(r=2, target_modules=["target"], init_lora_weights=False))
    randomize(model)
    x = make_toy(kind).make_input(rows=3)
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", "plain", None])
        for i, name in enumerate(["default", "plain"]):
            model.set_active(name)
            torch.testing.assert_close(mixed[i], model(x)[i], atol=1e-5, rtol=1e-4)
