"""Hypergradients against a ridge regression whose hypergradient has a closed form.

Inner: L_in(w, λ) = ‖X w − y‖²/n + Σ_j e^{λ_j} w_j²  (one penalty per feature, so dL_out/dλ is a vector).
Outer: L_out(w) = ‖X_v w − y_v‖²/n_v.
With A(λ) = XᵀX/n + diag(e^λ) and b = Xᵀy/n, the inner optimum is w*(λ) = A⁻¹ b. Differentiating A w* = b in
λ_j (implicit function theorem): A ∂w*/∂λ_j = −e^{λ_j} w*_j e_j, so with g = ∇L_out(w*) = 2 X_vᵀ(X_v w* − y_v)/n_v

    dL_out/dλ = gᵀ ∂w*/∂λ = −e^λ ⊙ w* ⊙ (A⁻¹ g),

which is also −∂²L_in/∂λ∂w · H⁻¹ g with H = 2A and ∂²L_in/∂λ_j∂w = 2 e^{λ_j} w_j e_j. The closed form is itself
checked against central finite differences of λ ↦ L_out(w*(λ)), everything in float64.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from grafting.blo import METHODS, NonFiniteHypergradient, hypergradient, unrolled_hypergradient
from grafting.errors import GraftingError

F64 = torch.float64


def make_data(d: int = 5, n: int = 40, nv: int = 30, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g, dtype=F64)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=F64)
    Xv = torch.randn(nv, d, generator=g, dtype=F64)
    yv = Xv @ (w_true + 0.3 * torch.randn(d, generator=g, dtype=F64)) + 0.5 * torch.randn(nv, generator=g, dtype=F64)
    lam = -2.0 + 2.0 * torch.rand(d, generator=g, dtype=F64)
    return SimpleNamespace(X=X, y=y, Xv=Xv, yv=yv, lam=lam, n=n, nv=nv, d=d)


def system(data, lam):
    return data.X.T @ data.X / data.n + torch.diag(torch.exp(lam)), data.X.T @ data.y / data.n


def w_star(data, lam):
    A, b = system(data, lam)
    return torch.linalg.solve(A, b)


def inner_value(data, w, lam):
    return ((data.X @ w - data.y) ** 2).sum() / data.n + (torch.exp(lam) * w ** 2).sum()


def outer_value(data, w):
    return ((data.Xv @ w - data.yv) ** 2).sum() / data.nv


def closed_form(data, lam):
    w = w_star(data, lam)
    g = 2 * data.Xv.T @ (data.Xv @ w - data.yv) / data.nv
    return -torch.exp(lam) * w * torch.linalg.solve(system(data, lam)[0], g)


def lambda_max_h(data):
    return float(torch.linalg.eigvalsh(2 * system(data, data.lam)[0]).max())


def setup(data=None, direct=None, at=None):
    """Parameters at w*(λ) (or ``at``) and the two zero-argument losses; ``direct`` adds c·λ to the outer loss."""
    data = data or make_data()
    w = nn.Parameter(w_star(data, data.lam) if at is None else at.clone())
    lam = nn.Parameter(data.lam.clone())

    def outer():
        value = outer_value(data, w)
        return value if direct is None else value + (direct * lam).sum()

    return data, w, lam, outer, lambda: inner_value(data, w, lam)


def rel(a, b):
    a = torch.cat([t.reshape(-1) for t in a])
    b = torch.cat([t.reshape(-1) for t in b])
    return float((a - b).norm() / b.norm())


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0))


# ---------------------------------------------------------------- the reference itself


def test_closed_form_matches_finite_differences():
    data = make_data()
    h = 1e-6
    fd = torch.zeros(data.d, dtype=F64)
    for j in range(data.d):
        e = torch.zeros(data.d, dtype=F64)
        e[j] = h
        up, down = outer_value(data, w_star(data, data.lam + e)), outer_value(data, w_star(data, data.lam - e))
        fd[j] = (up - down) / (2 * h)
    exact = closed_form(data, data.lam)
    assert exact.norm() > 1e-2, "a vanishing hypergradient would make every comparison below vacuous"
    assert rel([fd], [exact]) < 1e-7


# ---------------------------------------------------------------- accuracy per method


def test_cg_matches_closed_form():
    data, w, lam, outer, inner = setup()
    (hg,) = hypergradient(outer, inner, [w], [lam], method="cg", iters=20)
    assert hg.shape == lam.shape and hg.dtype == F64
    assert rel([hg], [closed_form(data, data.lam)]) < 1e-4
    (one,) = hypergradient(outer, inner, [w], [lam], method="cg", iters=1)
    assert rel([one], [closed_form(data, data.lam)]) > 1e-3, "one CG step should not already be exact"


def test_neumann_converges_as_terms_are_added():
    data, w, lam, outer, inner = setup()
    alpha = 1.0 / lambda_max_h(data)
    exact = closed_form(data, data.lam)
    errors = [rel(hypergradient(outer, inner, [w], [lam], method="neumann", iters=k, alpha=alpha), [exact])
              for k in (1, 5, 20, 100)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4, errors


def test_neumann_equals_unrolling_from_the_optimum():
    """From w* (a fixed point), K+1 SGD steps of size α differentiate to −α Σ_{j=0}^{K} ∂²L_in/∂λ∂w (I − αH)^j g:
    exactly the K-term Neumann hypergradient (Lorraine et al., Sec. 3), for any K and α."""
    data, w, lam, outer, inner = setup()
    alpha = 0.7 / lambda_max_h(data)
    for k in (1, 3):
        neumann = hypergradient(outer, inner, [w], [lam], method="neumann", iters=k, alpha=alpha)
        unrolled = unrolled_hypergradient(lambda ws: outer_value(data, ws[0]),
                                          lambda ws: inner_value(data, ws[0], lam), [w], [lam], steps=k + 1, lr=alpha)
        assert rel(neumann, unrolled) < 1e-10, k


def test_cg_stops_once_converged():
    """CG solves a d-dimensional SPD system in d steps; iterations past that are not run (they would only stir
    rounding noise), so asking for many more changes no bit of the result."""
    data, w, lam, outer, inner = setup(make_data(d=20, seed=2))
    few = hypergradient(outer, inner, [w], [lam], method="cg", iters=20)
    many = hypergradient(outer, inner, [w], [lam], method="cg", iters=60)
    assert torch.equal(few[0], many[0])
    assert rel(few, [closed_form(data, data.lam)]) < 1e-10


def test_unrolled_from_the_optimum_matches_closed_form():
    data, w, lam, _, _ = setup()
    hg = unrolled_hypergradient(lambda ws: outer_value(data, ws[0]), lambda ws: inner_value(data, ws[0], lam),
                                [w], [lam], steps=300, lr=0.5 / lambda_max_h(data))
    assert rel(hg, [closed_form(data, data.lam)]) < 1e-4


def test_unrolled_converging_from_zero_matches_closed_form():
    data, w, lam, _, _ = setup(at=torch.zeros(5, dtype=F64))
    hg = unrolled_hypergradient(lambda ws: outer_value(data, ws[0]), lambda ws: inner_value(data, ws[0], lam),
                                [w], [lam], steps=400, lr=0.5 / lambda_max_h(data))
    assert rel(hg, [closed_form(data, data.lam)]) < 1e-4
    assert torch.equal(w.detach(), torch.zeros(5, dtype=F64))


def test_darts_follows_its_equation():
    """Away from the optimum, so the virtual step matters, with a quartic term κ Σ e^{λ_j} w_j⁴ added to the inner
    loss so that the finite difference of eq. 8 depends on its radius ε̂ = eps/‖∇_{w'} L_out‖. With
    ∇_λ L_in = e^λ ⊙ (w² + κ w⁴), the central difference along u = ∇_{w'} L_out(w') is exactly
    e^λ ⊙ (2 w u + κ (4 w³ u + 4 w u³ ε̂²)), so the result must be ∇_λ L_out(w') − ξ times that."""
    data = make_data()
    c = torch.linspace(-0.2, 0.3, 5, dtype=F64)
    w0 = w_star(data, data.lam) + 0.3 * torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=F64)
    _, w, lam, outer, _ = setup(data, direct=c, at=w0)
    kappa, xi, eps = 0.5, 0.1, 0.5
    inner = lambda: inner_value(data, w, lam) + kappa * (torch.exp(lam) * w ** 4).sum()  # noqa: E731
    (hg,) = hypergradient(outer, inner, [w], [lam], method="darts", alpha=xi, eps=eps)
    e = torch.exp(data.lam)
    grad_in = 2 * (data.X.T @ (data.X @ w0 - data.y)) / data.n + 2 * e * w0 + 4 * kappa * e * w0 ** 3
    u = 2 * data.Xv.T @ (data.Xv @ (w0 - xi * grad_in) - data.yv) / data.nv
    r = eps / u.norm()
    expected = c - xi * e * (2 * w0 * u + kappa * (4 * w0 ** 3 * u + 4 * w0 * u ** 3 * r ** 2))
    torch.testing.assert_close(hg, expected, rtol=1e-8, atol=1e-10)


def test_darts_points_the_right_way():
    data, w, lam, outer, inner = setup()
    (hg,) = hypergradient(outer, inner, [w], [lam], method="darts", alpha=0.1)
    assert cosine(hg, closed_form(data, data.lam)) > 0.5


def test_first_order_is_exactly_the_direct_term():
    data, w, lam, outer, inner = setup()
    (hg,) = hypergradient(outer, inner, [w], [lam], method="first_order")
    assert torch.equal(hg, torch.zeros_like(lam)), "no direct λ term in this outer loss"

    c = torch.tensor([0.05, -0.03, 0.04, 0.02, -0.01], dtype=F64)
    data, w, lam, outer, inner = setup(direct=c)
    (hg,) = hypergradient(outer, inner, [w], [lam], method="first_order")
    assert torch.equal(hg, c)
    exact = c + closed_form(data, data.lam)
    assert cosine(hg, exact) > 0
    (full,) = hypergradient(outer, inner, [w], [lam], method="cg", iters=20)
    assert rel([full], [exact]) < 1e-4, "the direct term is added to the implicit one"
    (darts,) = hypergradient(outer, inner, [w], [lam], method="darts", alpha=0.1)
    assert cosine(darts, exact) > 0


# ---------------------------------------------------------------- several tensors of different shapes


def split_problem():
    """Inner W (2, 3) and v (2,); outer λ₁ (2, 3), one per entry of W, and a scalar λ₂ shared by both entries of
    v: the same ridge over w = (vec W, v), λ = (vec λ₁, λ₂, λ₂), so dL/dλ₂ is the sum of its two entries."""
    data = make_data(d=8, seed=1)
    data.lam = torch.cat([data.lam[:6], data.lam[6:].mean().expand(2)])  # λ₂ shared by the last two features
    w0 = w_star(data, data.lam)
    W, v = nn.Parameter(w0[:6].reshape(2, 3).clone()), nn.Parameter(w0[6:].clone())
    lam1, lam2 = nn.Parameter(data.lam[:6].reshape(2, 3).clone()), nn.Parameter(data.lam[6].clone())

    def full_w(ws=None):
        a, b = ws if ws is not None else (W, v)
        return torch.cat([a.reshape(-1), b])

    def full_lam():
        return torch.cat([lam1.reshape(-1), lam2.expand(2)])

    h = closed_form(data, data.lam)
    exact = [h[:6].reshape(2, 3), h[6:].sum()]
    return SimpleNamespace(data=data, inner=[W, v], outer=[lam1, lam2], exact=exact, full_w=full_w,
                           outer_loss=lambda: outer_value(data, full_w()),
                           inner_loss=lambda: inner_value(data, full_w(), full_lam()),
                           outer_ws=lambda ws: outer_value(data, full_w(ws)),
                           inner_ws=lambda ws: inner_value(data, full_w(ws), full_lam()))


def test_several_inner_and_outer_tensors():
    p = split_problem()
    hg = hypergradient(p.outer_loss, p.inner_loss, p.inner, p.outer, method="cg", iters=30)
    assert [t.shape for t in hg] == [torch.Size([2, 3]), torch.Size([])]
    assert rel(hg, p.exact) < 1e-4
    un = unrolled_hypergradient(p.outer_ws, p.inner_ws, p.inner, p.outer, steps=400,
                                lr=0.5 / lambda_max_h(p.data))
    assert rel(un, p.exact) < 1e-4
    for method in ("neumann", "darts", "first_order"):
        out = hypergradient(p.outer_loss, p.inner_loss, p.inner, p.outer, method=method,
                            alpha=0.1 if method == "darts" else 1.0 / lambda_max_h(p.data), iters=100)
        assert [t.shape for t in out] == [torch.Size([2, 3]), torch.Size([])], method


# ---------------------------------------------------------------- no side effects


@pytest.mark.parametrize("method", METHODS + ("unrolled",))
def test_parameters_and_grads_untouched(method):
    data = make_data()
    w0 = w_star(data, data.lam) + 0.2  # off the optimum, so the DARTS virtual step really moves w
    data, w, lam, outer, inner = setup(data, at=w0)
    w.grad = torch.randn(5, dtype=F64)
    grad_before, w_before, lam_before = w.grad.clone(), w.detach().clone(), lam.detach().clone()
    if method == "unrolled":
        out = unrolled_hypergradient(lambda ws: outer_value(data, ws[0]), lambda ws: inner_value(data, ws[0], lam),
                                     [w], [lam], steps=5, lr=0.05)
    else:
        out = hypergradient(outer, inner, [w], [lam], method=method, alpha=0.05)
    assert torch.equal(w.detach(), w_before) and torch.equal(lam.detach(), lam_before)
    assert torch.equal(w.grad, grad_before) and lam.grad is None
    assert not out[0].requires_grad


@pytest.mark.parametrize("failure", ["raises", "non-scalar"])
def test_darts_restores_inner_params_when_a_loss_fails(failure):
    data, w, lam, _, inner = setup(at=torch.ones(5, dtype=F64))

    def outer():  # called at the virtual point w'
        if failure == "raises":
            raise RuntimeError("boom")
        return data.Xv @ w

    with pytest.raises(RuntimeError if failure == "raises" else GraftingError):
        hypergradient(outer, inner, [w], [lam], method="darts")
    assert torch.equal(w.detach(), torch.ones(5, dtype=F64))


# ---------------------------------------------------------------- validation


def test_unknown_method_lists_valid_ones():
    _, w, lam, outer, inner = setup()
    with pytest.raises(GraftingError) as err:
        hypergradient(outer, inner, [w], [lam], method="newton")
    assert all(m in str(err.value) for m in METHODS)


@pytest.mark.parametrize("kwargs,name", [({"iters": 0}, "iters"), ({"iters": 2.5}, "iters"), ({"alpha": 0.0}, "alpha"),
                                         ({"alpha": -1.0}, "alpha"), ({"eps": 0.0}, "eps"), ({"eps": -0.01}, "eps")])
def test_bad_numbers_are_named(kwargs, name):
    _, w, lam, outer, inner = setup()
    with pytest.raises(GraftingError, match=name):
        hypergradient(outer, inner, [w], [lam], **kwargs)


@pytest.mark.parametrize("kwargs,name", [({"steps": 0, "lr": 0.1}, "steps"), ({"steps": 3, "lr": 0.0}, "lr")])
def test_unrolled_bad_numbers_are_named(kwargs, name):
    data, w, lam, _, _ = setup()
    with pytest.raises(GraftingError, match=name):
        unrolled_hypergradient(lambda ws: outer_value(data, ws[0]), lambda ws: inner_value(data, ws[0], lam),
                               [w], [lam], **kwargs)


def test_bad_parameter_lists():
    data, w, lam, outer, inner = setup()
    frozen = torch.zeros(5, dtype=F64)
    with pytest.raises(GraftingError, match="inner parameter 1 .*does not require grad"):
        hypergradient(outer, inner, [w, frozen], [lam])
    with pytest.raises(GraftingError, match="outer parameter 0 .*does not require grad"):
        hypergradient(outer, inner, [w], [frozen])
    with pytest.raises(GraftingError, match="same tensor"):
        hypergradient(outer, inner, [w], [lam, w])
    with pytest.raises(GraftingError, match="same tensor"):
        unrolled_hypergradient(lambda ws: outer_value(data, ws[0]), lambda ws: inner_value(data, ws[0], lam),
                               [w], [w], steps=1, lr=0.1)
    with pytest.raises(GraftingError, match="not a leaf"):
        hypergradient(outer, inner, [w * 2], [lam])


@pytest.mark.parametrize("method,which", [(m, "outer_loss") for m in METHODS]
                         + [(m, "inner_loss") for m in METHODS if m != "first_order"])  # first_order never calls it
def test_non_scalar_loss(method, which):
    data, w, lam, outer, inner = setup()
    vector = lambda: data.X @ w + lam.sum()  # noqa: E731
    losses = (vector, inner) if which == "outer_loss" else (outer, vector)
    with pytest.raises(GraftingError, match=f"{which} must return a scalar tensor, got shape \\(40,\\)"):
        hypergradient(*losses, [w], [lam], method=method)


@pytest.mark.parametrize("method", METHODS + ("unrolled",))
def test_loss_independent_of_inner_params(method):
    data, w, lam, _, _ = setup()
    good_outer = lambda ws: outer_value(data, ws[0])  # noqa: E731
    good_inner = lambda ws: inner_value(data, ws[0], lam)  # noqa: E731
    cases = [("outer_loss", lambda ws: (lam ** 2).sum(), good_inner),
             ("outer_loss", lambda ws: torch.tensor(1.0), good_inner)]
    if method != "first_order":
        cases.append(("inner_loss", good_outer, lambda ws: torch.exp(lam).sum()))
    for name, out_loss, in_loss in cases:
        with pytest.raises(GraftingError, match=f"{name} does not depend on any of the inner parameters"):
            if method == "unrolled":
                unrolled_hypergradient(out_loss, in_loss, [w], [lam], steps=2, lr=0.1)
            else:
                hypergradient(lambda: out_loss([w]), lambda: in_loss([w]), [w], [lam], method=method)


def test_unrolled_losses_must_use_the_unrolled_tensors():
    """Reading the parameters instead of the argument sees no unrolled value: caught, not silently first order."""
    data, w, lam, outer, inner = setup()
    with pytest.raises(GraftingError, match="outer_loss does not depend"):
        unrolled_hypergradient(lambda ws: outer(), lambda ws: inner_value(data, ws[0], lam), [w], [lam],
                               steps=2, lr=0.1)


# ---------------------------------------------------------------- non-finite results


@pytest.mark.parametrize("method", METHODS + ("unrolled",))
def test_nan_in_one_outer_tensor_is_located(method):
    p = split_problem()
    lam2 = p.outer[1]
    nan_direct = lambda: torch.sqrt(lam2 - 10.0)  # noqa: E731  # nan value, nan derivative for λ₂ only
    with pytest.raises(NonFiniteHypergradient) as err:
        if method == "unrolled":
            unrolled_hypergradient(lambda ws: p.outer_ws(ws) + nan_direct(), p.inner_ws, p.inner, p.outer,
                                   steps=3, lr=0.05)
        else:
            hypergradient(lambda: p.outer_loss() + nan_direct(), p.inner_loss, p.inner, p.outer, method=method,
                          alpha=0.05)
    assert isinstance(err.value, GraftingError)
    assert err.value.method == method and err.value.index == 1
    assert method in str(err.value) and "outer tensor 1" in str(err.value)


@pytest.mark.parametrize("method", ["darts", "neumann", "cg"])
def test_nan_inner_loss_raises(method):
    _, w, lam, outer, inner = setup()
    before = w.detach().clone()
    with pytest.raises(NonFiniteHypergradient, match=f"{method} hypergradient for outer tensor 0"):
        hypergradient(outer, lambda: inner() * float("nan"), [w], [lam], method=method, alpha=0.05)
    assert torch.equal(w.detach(), before)


def test_non_finite_error_survives_pickling():
    err = NonFiniteHypergradient("cg hypergradient for outer tensor 2 is not finite", method="cg", index=2)
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.method, back.index) == (str(err), "cg", 2)


def test_cg_says_when_non_positive_curvature_leaves_only_the_first_order_term():
    # a concave inner loss: H is negative definite, so CG cannot take a step; the result must be the first-order
    # one, and the user must be told rather than handed it silently
    w = torch.ones(3, dtype=F64, requires_grad=True)
    lam = torch.tensor([0.5, -0.2, 0.1], dtype=F64, requires_grad=True)
    inner = lambda: -(w ** 2).sum() + (lam * w).sum()  # noqa: E731
    outer = lambda: (w ** 2).sum() + (lam ** 2).sum()  # noqa: E731
    with pytest.warns(RuntimeWarning, match="non-positive curvature"):
        (g,) = hypergradient(outer, inner, [w], [lam], method="cg", iters=5)
    (first,) = hypergradient(outer, inner, [w], [lam], method="first_order")
    assert torch.equal(g, first)
