"""The bi-level Engine: levels, alternation, outer steps through the inner problem, and its guards.

The ridge problem of test_hypergrad.py (closed-form hypergradient) checks that an outer step applies exactly the
hypergradient at the inner optimum; the rest uses small adapted models.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grafting as gf
from grafting.blo import Engine, Level, NonFiniteHypergradient, fused_attention_has_double_backward
from grafting.errors import GraftingError
from test_hypergrad import F64, closed_form, inner_value, make_data, outer_value, setup, w_star


class Ridge(nn.Module):
    def __init__(self, data):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(data.d, dtype=F64))
        self.lam = nn.Parameter(data.lam.clone())


def ridge_engine(method, data, warmup=0, unroll=1, inner_lr=0.2, outer_lr=1e-3, **kw):
    m = Ridge(data)
    inner = Level("inner", [m.w], lambda b: inner_value(data, m.w, m.lam), [None],
                  torch.optim.SGD([m.w], lr=inner_lr), module=m)
    outer = Level("outer", [m.lam], lambda b: outer_value(data, m.w), [None], torch.optim.SGD([m.lam], lr=outer_lr))
    return m, Engine([inner, outer], hypergradient=method, warmup=warmup, unroll=unroll, **kw)


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_outer_step_applies_the_closed_form_hypergradient(method):
    data = make_data()
    # a long warm-up puts w at w*(λ); the outer SGD step then moves λ by lr x the hypergradient
    m, engine = ridge_engine(method, data, warmup=400, iters=60, alpha=0.2)
    lam0 = m.lam.detach().clone()
    engine.step()
    assert torch.allclose(m.w.detach(), w_star(data, lam0), atol=1e-10)  # one more inner step: still there
    applied = (lam0 - m.lam.detach()) / 1e-3
    expected = closed_form(data, lam0)
    assert (applied - expected).norm() / expected.norm() < 1e-4


def test_unrolled_outer_step_is_reverse_mode_through_the_inner_steps():
    data = make_data()
    m, engine = ridge_engine("unrolled", data, unroll=3, inner_lr=0.1)
    w0, lam0 = m.w.detach().clone(), m.lam.detach().clone().requires_grad_(True)
    w = w0.clone().requires_grad_(True)
    for _ in range(3):  # the same three SGD steps, written out
        (g,) = torch.autograd.grad(inner_value(data, w, lam0), w, create_graph=True)
        w = w - 0.1 * g
    (expected,) = torch.autograd.grad(outer_value(data, w), lam0)
    summary = engine.step()
    applied = (lam0.detach() - m.lam.detach()) / 1e-3
    assert torch.allclose(applied, expected, rtol=1e-10, atol=1e-14)
    assert torch.allclose(m.w.detach(), w.detach(), rtol=1e-12)  # the inner level took those same steps
    assert engine.inner.steps == 3 and summary["step"] == 1


def test_alternation_warmup_and_logging():
    data = make_data()
    entries = []
    m, engine = ridge_engine("darts", data, warmup=4, unroll=2, log=entries.append)
    engine.run(3)
    levels = [e["level"] for e in entries]
    assert levels == ["inner"] * 4 + ["inner", "inner", "outer"] * 3
    assert engine.inner.steps == 10 and engine.outer.steps == 3 == engine.step_count
    assert all("hypergrad_norm" in e for e in entries if e["level"] == "outer")


def test_outer_training_lowers_the_validation_loss():
    data = make_data()
    m, engine = ridge_engine("cg", data, warmup=200, unroll=5, outer_lr=0.5, iters=20)
    engine.step()
    first = outer_value(data, m.w).item()
    engine.run(30)
    assert outer_value(data, m.w).item() < first - 1e-3


def test_darts_step_is_dartss_equation_with_the_real_inner_step_as_the_virtual_one():
    """unroll=2 with SGD at ξ: one plain inner step, then the last inner step at w (its backward also gives
    ∇_λ L_in(w)), the outer gradient at the stepped w' = w − ξ∇_w L_in(w), and the forward difference from w
    along u = ∇_w' L_out. For ridge ∇_λ L_in = e^λ ⊙ w², so that difference is exactly e^λ ⊙ (2wu + ε̂u²)."""
    data = make_data()
    xi, eps = 0.05, 0.5
    m, engine = ridge_engine("darts", data, unroll=2, inner_lr=xi, outer_lr=1e-3, eps=eps)
    engine.run(3)  # away from the start, still away from w*
    lam0 = m.lam.detach().clone().requires_grad_(True)
    w = m.w.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(inner_value(data, w, lam0), w)
    w = (w - xi * g).detach().requires_grad_(True)  # the plain inner step
    (g,) = torch.autograd.grad(inner_value(data, w, lam0), w)
    w_next = (w - xi * g).detach().requires_grad_(True)
    u, = torch.autograd.grad(outer_value(data, w_next), w_next)
    r = eps / u.norm()
    e = torch.exp(lam0.detach())
    expected = -xi * e * (2 * w.detach() * u + r * u ** 2)  # the outer loss does not read λ: no direct term
    summary = engine.step()
    applied = (lam0.detach() - m.lam.detach()) / 1e-3
    torch.testing.assert_close(applied, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m.w.detach(), w_next.detach(), rtol=1e-12, atol=1e-14)  # the inner level stepped
    assert engine.inner.steps == 8 and summary["step"] == 4
    # with a small radius it is DARTS' central difference (hypergradient(method="darts")) from the same point
    m2, small = ridge_engine("darts", data, unroll=2, inner_lr=xi, outer_lr=1e-3, eps=1e-4)
    small.run(3)
    small.inner_step()
    w_fn, lam_fn = nn.Parameter(m2.w.detach().clone()), nn.Parameter(m2.lam.detach().clone())
    (central,) = gf.blo.hypergradient(lambda: outer_value(data, w_fn), lambda: inner_value(data, w_fn, lam_fn),
                                      [w_fn], [lam_fn], method="darts", alpha=xi, eps=1e-4)
    small.unroll = 1
    small.step()
    assert ((lam_fn.detach() - m2.lam.detach()) / 1e-3 - central).norm() / central.norm() < 1e-3


def test_a_levels_regularizer_trains_it_and_is_left_out_of_the_finite_difference():
    data = make_data()
    calls = []

    def penalty(w):
        calls.append(1)
        return 0.3 * (w ** 4).sum()

    for method, per_step in (("darts", 1), ("neumann", 2), ("first_order", 1)):
        m, engine = ridge_engine(method, data, inner_lr=0.05, iters=3, alpha=0.05)
        engine.inner.regularizer = lambda m=m: penalty(m.w)
        w = m.w.detach().clone().requires_grad_(True)
        calls.clear()
        engine.step()
        # the inner step descended loss + regularizer; the hypergradient passes added it only where they need ∇_w
        (g,) = torch.autograd.grad(inner_value(data, w, m.lam.detach()) + 0.3 * (w ** 4).sum(), w)
        torch.testing.assert_close(m.w.detach(), (w - 0.05 * g).detach(), rtol=1e-12, atol=1e-14)
        assert len(calls) == per_step, method


def test_darts_finite_difference_replays_the_inner_steps_random_draws():
    """With dropout in the inner loss, ∇_λ L_in at w and at w + ε̂u must see one mask, else their difference
    divided by ε̂ is noise. With k the dropout-scaled mask, L_in = ‖Xw − y‖²/n + Σ e^λ (k ⊙ w)², so the
    difference is exactly e^λ k² (2wu + ε̂u²) for the mask the inner step drew, whatever the outer loss draws."""
    data = make_data(d=40)
    xi, eps = 0.05, 0.5
    m = Ridge(data)
    masks = []

    def inner_loss(b):
        keep = torch.nn.functional.dropout(torch.ones(data.d, dtype=F64), 0.5)
        masks.append(keep)
        return ((data.X @ m.w - data.y) ** 2).sum() / data.n + (torch.exp(m.lam) * (keep * m.w) ** 2).sum()

    def outer_loss(b):
        torch.rand(7)  # the outer pass draws too; the replay must not depend on it
        return outer_value(data, m.w)

    torch.manual_seed(0)
    with torch.no_grad():
        m.w.normal_()
    inner = Level("inner", [m.w], inner_loss, [None], torch.optim.SGD([m.w], lr=xi))
    outer = Level("outer", [m.lam], outer_loss, [None], torch.optim.SGD([m.lam], lr=1e-3))
    w0, lam0 = m.w.detach().clone(), m.lam.detach().clone()
    Engine([inner, outer], hypergradient="darts", eps=eps).step()
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    w1 = m.w.detach().clone().requires_grad_(True)
    (u,) = torch.autograd.grad(outer_value(data, w1), w1)
    k = masks[0]
    expected = -xi * torch.exp(lam0) * k ** 2 * (2 * w0 * u + (eps / u.norm()) * u ** 2)
    torch.testing.assert_close((lam0 - m.lam.detach()) / 1e-3, expected, rtol=1e-9, atol=1e-12)


def test_functional_darts_evaluates_both_points_with_one_set_of_random_draws():
    data, w, lam, outer, _ = setup(make_data(d=40))
    masks = []

    def inner():
        keep = torch.nn.functional.dropout(torch.ones(data.d, dtype=F64), 0.5)
        masks.append(keep)
        return inner_value(data, w * keep, lam)

    gf.blo.hypergradient(outer, inner, [w], [lam], method="darts", alpha=0.1)
    assert len(masks) == 3 and torch.equal(masks[1], masks[2])  # virtual step, then w+ and w- with one mask


def tiny_dora(seed=0):
    """A frozen base MLP with a DoRA adapter: directions at the inner level, magnitudes at the outer."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model = gf.adapt(base, gf.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], use_dora=True,
                                         init_lora_weights=False))
    groups = model.param_groups("default")
    return model, groups["weights"], groups["architecture"]


def test_frozen_base_never_changes_at_either_level():
    model, weights, arch = tiny_dora()
    frozen = [p for n, p in model.named_parameters() if "base_layer" in n]
    before = [p.detach().clone() for p in frozen]
    arch0 = [p.detach().clone() for p in arch]
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    xv, yv = torch.randn(16, 6), torch.randn(16, 3)
    for method in ("first_order", "darts", "neumann", "cg", "unrolled"):
        inner = Level("inner", weights, lambda b: ((model(x) - y) ** 2).mean(), [None],
                      torch.optim.AdamW(weights, lr=1e-2), module=model)
        outer = Level("outer", arch, lambda b: ((model(xv) - yv) ** 2).mean(), [None], torch.optim.AdamW(arch, lr=1e-2))
        Engine([inner, outer], hypergradient=method, unroll=2, frozen=frozen).run(2)
        assert all(torch.equal(b, p) for b, p in zip(before, frozen)), method
        assert all(p.grad is None for p in frozen), method
    assert any(not torch.equal(a, p) for a, p in zip(arch0, arch))


def test_nan_hypergradient_names_level_and_step():
    data = make_data()
    m, engine = ridge_engine("cg", data)
    engine.run(2)
    engine.outer.loss = lambda b: outer_value(data, m.w) * torch.sqrt(m.lam[0] - 1e9)  # nan from the outer level
    with pytest.raises(NonFiniteHypergradient, match=r"level 'outer', outer step 3"):
        engine.step()


def test_nan_inner_loss_names_level_and_step():
    data = make_data()
    m, engine = ridge_engine("darts", data)
    engine.run(1)
    engine.inner.loss = lambda b: inner_value(data, m.w, m.lam) * float("nan")
    with pytest.raises(GraftingError, match=r"level 'inner', step 2: the loss is nan"):
        engine.step()


def test_bad_setups_are_refused():
    data = make_data()
    m = Ridge(data)
    other = nn.Parameter(torch.zeros(2))

    def level(name, params, opt_params=None, **kw):
        return Level(name, params, lambda b: inner_value(data, m.w, m.lam), [None],
                     torch.optim.SGD(opt_params or params, lr=0.1), **kw)

    with pytest.raises(GraftingError, match="unknown hypergradient 'newton'"):
        Engine([level("i", [m.w]), level("o", [m.lam])], hypergradient="newton")
    with pytest.raises(GraftingError, match="3 levels"):
        Engine([level("i", [m.w]), level("o", [m.lam]), level("x", [other])])
    with pytest.raises(GraftingError, match="both level 'i' and level 'o'"):
        Engine([level("i", [m.w]), level("o", [m.w, m.lam])])
    with pytest.raises(GraftingError, match="optimizer must hold exactly"):
        Engine([level("i", [m.w], [m.w, other]), level("o", [m.lam])])
    with pytest.raises(GraftingError, match="frozen tensor #0 is also trained by level 'o'"):
        Engine([level("i", [m.w]), level("o", [m.lam])], frozen=[m.lam])
    with pytest.raises(GraftingError, match="give the inner Level its module="):
        Engine([level("i", [m.w]), level("o", [m.lam])], hypergradient="unrolled")
    with pytest.raises(GraftingError, match="yields no batches"):
        Engine([Level("i", [m.w], lambda b: m.w.sum(), [], torch.optim.SGD([m.w], lr=0.1)),
                level("o", [m.lam])]).step()


class CausalAttention(nn.Module):
    """nanoGPT's attention: the fused kernel, called with is_causal and no mask (its CPU kernel is flash)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def attention_engine(method):
    torch.manual_seed(0)
    model = gf.adapt(CausalAttention().requires_grad_(False),
                     gf.LoraConfig(r=2, target_modules=["qkv"], use_dora=True, init_lora_weights=False))
    groups = model.param_groups("default")
    x, xv = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    inner = Level("inner", groups["weights"], lambda b: model(x).square().mean(), [None],
                  torch.optim.SGD(groups["weights"], lr=1e-2))
    outer = Level("outer", groups["architecture"], lambda b: (model(xv) - xv).square().mean(), [None],
                  torch.optim.SGD(groups["architecture"], lr=1e-2))
    return Engine([inner, outer], hypergradient=method, iters=2), groups["architecture"]


def fused_kernel_lacks_double_backward() -> bool:
    q = torch.randn(1, 1, 3, 4, requires_grad=True)
    (g,) = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
                               .square().sum(), q, create_graph=True)
    try:
        torch.autograd.grad(g.sum(), q)
    except RuntimeError:
        return True
    return False


def test_attention_without_double_backward_runs_in_math_mode():
    assert fused_attention_has_double_backward() == (not fused_kernel_lacks_double_backward())
    engine, arch = attention_engine("cg")
    before = [p.detach().clone() for p in arch]
    summary = engine.step()
    assert summary["hypergrad_norm"] > 0 and torch.isfinite(torch.tensor(summary["hypergrad_norm"]))
    assert any(not torch.equal(b, p) for b, p in zip(before, arch))


def test_an_op_without_double_backward_gets_a_clear_error(monkeypatch):
    import grafting.blo.engine as engine_module
    # the probe is told the fused kernel is fine, so the engine does not switch to math attention: where the real
    # kernel lacks the derivative it must come out as a message, not as torch's RuntimeError; where it has one,
    # the step simply runs
    monkeypatch.setattr(engine_module, "fused_attention_has_double_backward", lambda: True)
    if fused_kernel_lacks_double_backward():
        with pytest.raises(GraftingError, match="needs second derivatives, but .*attention.* has no double "
                                                "backward.*use hypergradient 'darts' or 'first_order'"):
            attention_engine("cg")[0].step()
    else:
        assert attention_engine("cg")[0].step()["hypergrad_norm"] > 0
    attention_engine("darts")[0].step()  # darts needs no second derivative: the same model runs
