"""Derivatives of adapted models, checked against finite differences: reverse, forward, Hessian-vector products.

Stated behaviour (docs/concepts.md, "Derivatives"):
- LoRA and DoRA with ``exact_norm=True``: every derivative is the derivative of the forward itself. Reverse
  gradients, forward-mode JVPs (``torch.func.jvp``, ``forward_ad``) and HVPs (reverse-over-reverse and
  forward-over-reverse) all match central finite differences, on inputs long enough that the per-call fold would
  be used if it did not step aside.
- DoRA (default, detached norm, as the paper's Sec. 4.3 and peft): derivatives of every order and mode are those
  of the surrogate with the norm frozen at its current value (built here independently): reverse == forward ==
  finite differences of that surrogate, != finite differences of the forward; reverse-over-reverse ==
  forward-over-reverse == finite differences of the surrogate's gradient, a symmetric Hessian.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import grafting as gf
from toys import make_toy, randomize

EPS = 1e-6
MODES = {"lora": lambda **kw: gf.LoraConfig(**kw),
         "dora-exact": lambda **kw: gf.DoraConfig(exact_norm=True, **kw),
         "dora-detached": lambda **kw: gf.DoraConfig(**kw)}


def setup(mode):
    torch.manual_seed(0)
    model = gf.adapt(make_toy("linear"), MODES[mode](r=2, lora_alpha=4, target_modules=["target"])).double()
    randomize(model)
    model.eval()
    x = make_toy("linear").make_input(rows=4).double()  # 20 tokens: past the fold point of a 12 -> 10 layer
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, x, theta


def loss_fn(model, x):
    def f(theta):
        return torch.func.functional_call(model, theta, (x,)).pow(2).sum()
    return f


def direction(theta, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in theta.items()}


def shifted(theta, v, eps):
    return {n: theta[n] + eps * v[n] for n in theta}


def dot(a, b):
    return sum((a[n] * b[n]).sum() for n in a)


def fd(f, theta, v):
    with torch.no_grad():
        return (f(shifted(theta, v, EPS)) - f(shifted(theta, v, -EPS))) / (2 * EPS)


def reverse_grad(f, theta, create_graph=False):
    leaves = {n: p.clone().requires_grad_(True) for n, p in theta.items()}
    grads = torch.autograd.grad(f(leaves), list(leaves.values()), create_graph=create_graph)
    return leaves, dict(zip(leaves, grads))


def surrogate(model, theta0):
    """The detached-norm DoRA forward written out by hand: g = m / n0 with n0 = ||W + s·B0·A0|| at theta0."""
    host = dict(model.hosts())["target"]
    W, b, s = host.base_layer.weight.detach(), host.base_layer.bias.detach(), host.adapters["default"].scaling
    key = "base_model.target.adapters.default."
    n0 = (W + s * theta0[key + "lora_B"] @ theta0[key + "lora_A"]).norm(dim=1)
    head = model.base_model.head

    def f(theta, x):
        A, B, m = theta[key + "lora_A"], theta[key + "lora_B"], theta[key + "lora_magnitude"]
        h = (m / n0) * (x @ W.t() + s * (x @ A.t()) @ B.t()) + b
        return torch.nn.functional.linear(torch.tanh(h), head.weight.detach(), head.bias.detach()).pow(2).sum()
    return f


@pytest.mark.parametrize("mode", MODES)
def test_first_derivatives_reverse_and_forward_mode(mode):
    model, x, theta = setup(mode)
    f = loss_fn(model, x)
    v = direction(theta)
    _, g = reverse_grad(f, theta)
    with torch.no_grad():  # no reverse graph: the fold would engage here for a plain forward
        _, jvp = torch.func.jvp(f, (theta,), (v,))
        with fwAD.dual_level():  # the other forward-mode API: dual tensors
            dual = {n: fwAD.make_dual(theta[n], v[n]) for n in theta}
            fw = fwAD.unpack_dual(f(dual)).tangent
    torch.testing.assert_close(jvp, dot(g, v))  # forward mode agrees with reverse mode in every mode
    torch.testing.assert_close(fw, jvp)
    if mode == "dora-detached":
        sur = surrogate(model, theta)
        torch.testing.assert_close(dot(g, v), fd(lambda t: sur(t, x), theta, v), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(dot(g, v), fd(f, theta, v), rtol=1e-3)  # the norm's share is left out
    else:
        torch.testing.assert_close(dot(g, v), fd(f, theta, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_hessian_vector_products(mode):
    model, x, theta = setup(mode)
    f = loss_fn(model, x)
    v, u = direction(theta, 1), direction(theta, 2)
    # the function whose second derivatives every mode must give: the forward, or the fixed-norm surrogate
    reference = (lambda t: surrogate(model, theta)(t, x)) if mode == "dora-detached" else f

    def grad_at(t):
        return reverse_grad(reference, t)[1]

    leaves, g = reverse_grad(f, theta, create_graph=True)  # reverse over reverse: H v
    rr = dict(zip(leaves, torch.autograd.grad(dot(g, v), list(leaves.values()))))
    _, fr = torch.func.jvp(lambda t: torch.func.grad(f)(t), (theta,), (v,))  # forward over reverse: H v
    fd_hv = {n: (a - b) / (2 * EPS) for (n, a), b in zip(grad_at(shifted(theta, v, EPS)).items(),
                                                         grad_at(shifted(theta, v, -EPS)).values())}
    torch.testing.assert_close(dot(rr, u), dot(fd_hv, u), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dot(fr, u), dot(fd_hv, u), rtol=1e-4, atol=1e-6)
    _, fr_u = torch.func.jvp(lambda t: torch.func.grad(f)(t), (theta,), (u,))
    torch.testing.assert_close(dot(fr_u, v), dot(fr, u), rtol=1e-6, atol=1e-8)  # a Hessian: symmetric


def test_bilevel_hypergradient_equals_finite_differences():
    """One unrolled inner step, then the outer loss; d outer / d magnitude through the inner step (exact norm)."""
    model, x, theta = setup("dora-exact")
    f = loss_fn(model, x)
    x_val = make_toy("linear").make_input(rows=3, seed=7).double()
    f_val = loss_fn(model, x_val)
    mag = "base_model.target.adapters.default.lora_magnitude"

    def outer(m, create_graph):
        t = {**theta, mag: m}
        leaves = {n: (p if n == mag else p.clone().requires_grad_(True)) for n, p in t.items()}
        inner = f(leaves)
        grads = torch.autograd.grad(inner, [leaves[n] for n in leaves if n != mag], create_graph=create_graph)
        fast = dict(leaves)
        for n, gr in zip([n for n in leaves if n != mag], grads):
            fast[n] = leaves[n] - 0.05 * gr
        return f_val(fast)

    m0 = theta[mag].clone().requires_grad_(True)
    (hyper,) = torch.autograd.grad(outer(m0, create_graph=True), [m0])
    v = torch.randn(m0.shape, generator=torch.Generator().manual_seed(3), dtype=m0.dtype)
    with torch.enable_grad():
        numeric = (outer(theta[mag] + EPS * v, False) - outer(theta[mag] - EPS * v, False)) / (2 * EPS)
    torch.testing.assert_close((hyper * v).sum(), numeric.detach(), rtol=1e-4, atol=1e-7)
