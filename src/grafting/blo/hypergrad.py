"""Hypergradients: the derivative of an outer loss through the optimum of an inner problem.

Bi-level optimization trains outer parameters λ (architecture weights, DoRA magnitudes, hyperparameters)
against an outer loss L_out(w*(λ), λ) where the inner parameters w*(λ) minimize an inner loss L_in(w, λ).
By the implicit function theorem (∇_w L_in(w*, λ) = 0 holds for every λ) the total derivative is

    dL_out/dλ = ∂L_out/∂λ − ∂²L_in/∂λ∂w · H⁻¹ · ∂L_out/∂w,        H = ∂²L_in/∂w²,

evaluated at the current inner values, which the caller has (approximately) optimized. The methods differ only
in how they approximate H⁻¹ · ∂L_out/∂w:

- ``first_order``: drop the indirect term (inner parameters treated as constants).
- ``darts``: Liu et al., "DARTS", arXiv 1806.09055, eq. 7-8: one virtual SGD step stands in for w*, and the
  mixed second derivative is a central finite difference, so no second-order autograd is needed.
- ``neumann``: Lorraine et al., arXiv 1911.02590, Alg. 3: H⁻¹ ≈ α Σ_{j=0}^{K} (I − αH)^j, converging when
  0 < α < 2/λ_max(H).
- ``cg``: conjugate gradient on H v = ∂L_out/∂w (Rajeswaran et al., iMAML, arXiv 1909.04630, Sec. 3;
  Pedregosa, HOAG, arXiv 1602.02355, Alg. 1): converges in at most dim(w) iterations for a positive-definite H.

``unrolled_hypergradient`` is the exact reverse-mode derivative through K explicit SGD steps (Maclaurin et al.,
arXiv 1502.03492; Franceschi et al., arXiv 1703.01785), the reference the implicit methods approximate.

Everything uses ``torch.autograd.grad``, never ``backward``: ``.grad`` of every parameter is left as it was, so
a caller's optimizers see only what they put there themselves.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Sequence

import torch

from ..errors import GraftingError

METHODS = ("first_order", "darts", "neumann", "cg")

Tensors = list[torch.Tensor]


class NonFiniteHypergradient(GraftingError):
    """A hypergradient came out nan or inf; ``method`` and ``index`` (the outer tensor) say where.

    Callers that know more (the engine's level and step) re-raise with their context and the same fields."""

    def __init__(self, message: str, method: str | None = None, index: int | None = None):
        super().__init__(message)
        self.method = method
        self.index = index

    def __reduce__(self):
        # Keep the fields across pickling (worker processes report errors by pickling them).
        return (type(self), (str(self), self.method, self.index))


def hypergradient(outer_loss: Callable[[], torch.Tensor], inner_loss: Callable[[], torch.Tensor],
                  inner_params: Iterable[torch.Tensor], outer_params: Iterable[torch.Tensor],
                  method: str = "cg", iters: int = 10, alpha: float = 1.0, eps: float = 0.01) -> Tensors:
    """d outer_loss / d outer_params through the inner optimum, one tensor per outer parameter, shaped like it.

    ``outer_loss`` and ``inner_loss`` take no arguments and return a scalar computed from the current values of
    the parameters (typically a model's ``nn.Parameter`` s read inside the call). Parameters must be leaf tensors
    with ``requires_grad=True``; the inner ones should be at (or near) a minimum of ``inner_loss``, since every
    method except ``darts`` assumes ∇_w L_in = 0 there. ``first_order`` never calls ``inner_loss``.

    ``method``: one of :data:`METHODS`. ``iters``: Neumann terms or CG iterations. ``alpha``: the Neumann step
    (needs α < 2/λ_max(H)) or DARTS' virtual learning rate ξ. ``eps``: DARTS' finite-difference radius, divided
    by the norm of ∂L_out/∂w' as in the paper. Inner parameters end bit-exactly as they started, ``.grad`` of
    every parameter untouched. Raises :class:`NonFiniteHypergradient` if the result holds nan or inf."""
    if method not in METHODS:
        raise GraftingError(f"hypergradient: unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    _check_positive_int(iters, "iters", "hypergradient")
    _check_positive(alpha, "alpha", "hypergradient")
    _check_positive(eps, "eps", "hypergradient")
    inner, outer = _check_params(inner_params, outer_params, "hypergradient")
    if method == "darts":
        result = _darts(outer_loss, inner_loss, inner, outer, xi=float(alpha), eps=float(eps))
    else:
        g, direct = _outer_grads(_scalar(outer_loss(), "outer_loss"), inner, outer)
        if method == "first_order":
            result = direct
        else:
            result = _implicit(g, direct, inner_loss, inner, outer, method, iters, float(alpha))
    _check_finite(result, method)
    return result


def unrolled_hypergradient(outer_loss: Callable[[Sequence[torch.Tensor]], torch.Tensor],
                           inner_loss: Callable[[Sequence[torch.Tensor]], torch.Tensor],
                           inner_params: Iterable[torch.Tensor], outer_params: Iterable[torch.Tensor],
                           steps: int, lr: float) -> Tensors:
    """d L_out(w_K, λ)/dλ by exact reverse mode through ``steps`` SGD steps w_{k+1} = w_k − lr ∇_w L_in(w_k, λ).

    Unlike :func:`hypergradient`, both losses take one argument: the list of current inner tensors, in the
    order of ``inner_params``. During unrolling those are non-leaf tensors w_k(λ) that a zero-argument callable
    reading the model's parameters could not see. w_0 is the current value of the inner parameters (a constant
    in λ), which are not modified; ``.grad`` is untouched. The whole unrolled graph is kept until the end, so
    memory grows linearly with ``steps``."""
    _check_positive_int(steps, "steps", "unrolled_hypergradient")
    _check_positive(lr, "lr", "unrolled_hypergradient")
    inner, outer = _check_params(inner_params, outer_params, "unrolled_hypergradient")
    ws: Tensors = [w.detach().requires_grad_(True) for w in inner]
    for _ in range(steps):
        loss = _scalar(inner_loss(ws), "inner_loss")
        _require_dependence(loss, "inner_loss")
        grads = torch.autograd.grad(loss, ws, create_graph=True, allow_unused=True)
        if all(g is None for g in grads):
            _independent("inner_loss")
        ws = [w if g is None else w - lr * g for w, g in zip(ws, grads)]
    loss = _scalar(outer_loss(ws), "outer_loss")
    _require_dependence(loss, "outer_loss")
    grads = torch.autograd.grad(loss, ws + outer, allow_unused=True)
    if all(g is None for g in grads[:len(ws)]):
        _independent("outer_loss")
    result = _fill(grads[len(ws):], outer)
    _check_finite(result, "unrolled")
    return result


# ---------------------------------------------------------------- methods


def _implicit(g: Tensors, direct: Tensors, inner_loss: Callable[[], torch.Tensor], inner: Tensors, outer: Tensors,
              method: str, iters: int, alpha: float) -> Tensors:
    """direct − ∂(∇_w L_in · v)/∂λ with v ≈ H⁻¹ g from Neumann or CG."""
    loss = _scalar(inner_loss(), "inner_loss")
    _require_dependence(loss, "inner_loss")
    # One differentiable gradient serves every Hessian-vector product and the mixed product: the inner forward
    # and its first backward are paid once, each further product is one backward through this graph.
    gw = list(torch.autograd.grad(loss, inner, create_graph=True, allow_unused=True))
    if all(x is None for x in gw):
        _independent("inner_loss")

    def hvp(vec: Tensors) -> Tensors:
        return _vjp(gw, inner, vec, retain=True)

    v = _neumann(hvp, g, iters, alpha) if method == "neumann" else _cg(hvp, g, iters)
    mixed = _vjp(gw, outer, v, retain=False)
    return [d - m for d, m in zip(direct, mixed)]


def _neumann(hvp: Callable[[Tensors], Tensors], g: Tensors, iters: int, alpha: float) -> Tensors:
    """α Σ_{j=0}^{iters} (I − αH)^j g (Lorraine et al., Alg. 3)."""
    term, total = list(g), list(g)
    for _ in range(iters):
        term = [t - alpha * h for t, h in zip(term, hvp(term))]
        total = [s + t for s, t in zip(total, term)]
    return [alpha * s for s in total]


def _cg(hvp: Callable[[Tensors], Tensors], g: Tensors, iters: int) -> Tensors:
    """Conjugate gradient for H x = g from x = 0."""
    x = [torch.zeros_like(t) for t in g]
    r, p = list(g), list(g)
    rr = _dot(r, r)
    # Below a residual of machine precision relative to g, further iterations only stir rounding noise.
    tol = (max(torch.finfo(t.dtype).eps for t in g) ** 2) * rr
    for _ in range(iters):
        if rr <= tol:
            break
        hp = hvp(p)
        curvature = _dot(p, hp)
        if curvature <= 0.0:
            # H is not positive definite along p (not at a minimum, or a flat direction): further steps would
            # move away from the solution, so stop with the best estimate so far (truncated CG, as in Newton-CG).
            # A nan curvature does not stop: it must reach the result, where the finiteness check reports it.
            if not any(bool(t.any()) for t in x):  # nothing solved: the result is silently first-order
                warnings.warn("hypergradient 'cg': the inner Hessian has non-positive curvature along "
                              "∂L_outer/∂w (the inner parameters are not near a minimum), so CG stopped before "
                              "its first step and the hypergradient is the first-order one; train the inner level "
                              "longer first (warmup_steps, unroll) or use 'darts' or 'neumann'", RuntimeWarning,
                              stacklevel=4)
            break
        step = rr / curvature
        x = [a + step * b for a, b in zip(x, p)]
        r = [a - step * b for a, b in zip(r, hp)]
        rr_next = _dot(r, r)
        p = [a + (rr_next / rr) * b for a, b in zip(r, p)]
        rr = rr_next
    return x


def _darts(outer_loss: Callable[[], torch.Tensor], inner_loss: Callable[[], torch.Tensor], inner: Tensors,
           outer: Tensors, xi: float, eps: float) -> Tensors:
    """∇_λ L_out(w', λ) − ξ [∇_λ L_in(w⁺, λ) − ∇_λ L_in(w⁻, λ)] / (2ε̂)   (DARTS eq. 7-8).

    The losses read the parameters themselves, so w', w⁺ and w⁻ are written into them in turn; the originals
    are put back whatever happens, so a failing loss cannot leave the model at a virtual point."""
    saved = [w.detach().clone() for w in inner]
    try:
        loss = _scalar(inner_loss(), "inner_loss")
        _require_dependence(loss, "inner_loss")
        step = torch.autograd.grad(loss, inner, allow_unused=True)
        if all(s is None for s in step):
            _independent("inner_loss")
        with torch.no_grad():
            for w, s in zip(inner, step):
                if s is not None:
                    w.sub_(xi * s)
        g, direct = _outer_grads(_scalar(outer_loss(), "outer_loss"), inner, outer)
        norm = math.sqrt(_dot(g, g))
        if norm == 0.0:
            # ∂L_out/∂w' = 0: the indirect term is a second derivative along the zero vector.
            return direct
        radius = eps / norm

        # Both points see the same random draws (dropout masks): the difference is then of one function, not
        # of two samples whose noise the division by 2ε̂ would blow up.
        rng = torch.get_rng_state()
        plus = outer_grad_at(inner_loss, inner, outer, saved, g, radius, rng)
        minus = outer_grad_at(inner_loss, inner, outer, saved, g, -radius, rng)
        return [d - xi * (a - b) / (2.0 * radius) for d, a, b in zip(direct, plus, minus)]
    finally:
        with torch.no_grad():
            for w, w0 in zip(inner, saved):
                w.copy_(w0)


def outer_grad_at(inner_loss: Callable[[], torch.Tensor], inner: Tensors, outer: Tensors, at: Tensors,
                  direction: Tensors, radius: float, rng_state: torch.Tensor | None = None) -> Tensors:
    """∇_λ L_in(w, λ) at w = at + radius·direction, written into the inner tensors (the caller restores them).

    ``rng_state`` (from ``torch.get_rng_state()``) replays the random draws of another evaluation, so that two
    such gradients differ only through w; the generator continues afterwards as if this call had not run."""
    with torch.no_grad():
        for w, w0, d in zip(inner, at, direction):
            w.copy_(w0 + radius * d)
    with torch.random.fork_rng(devices=[], enabled=rng_state is not None):
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        loss = _scalar(inner_loss(), "inner_loss")
        if not loss.requires_grad:
            return [torch.zeros_like(o) for o in outer]
        return _fill(torch.autograd.grad(loss, outer, allow_unused=True), outer)


# ---------------------------------------------------------------- helpers


def _outer_grads(loss: torch.Tensor, inner: Tensors, outer: Tensors) -> tuple[Tensors, Tensors]:
    """(∂L_out/∂w, ∂L_out/∂λ), zeros where the loss does not read a tensor; one backward for both."""
    _require_dependence(loss, "outer_loss")
    grads = torch.autograd.grad(loss, inner + outer, allow_unused=True)
    if all(x is None for x in grads[:len(inner)]):
        _independent("outer_loss")
    return _fill(grads[:len(inner)], inner), _fill(grads[len(inner):], outer)


def _vjp(outputs: Sequence[torch.Tensor | None], inputs: Tensors, vectors: Tensors, retain: bool) -> Tensors:
    """∂(Σ_i outputs_i · vectors_i)/∂inputs, zeros where nothing connects."""
    # Gradient pieces that are None or constant (an inner tensor read linearly) contribute nothing, and
    # autograd.grad refuses outputs without a graph, so they are left out rather than passed.
    pairs = [(o, v) for o, v in zip(outputs, vectors) if o is not None and o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad([o for o, _ in pairs], inputs, grad_outputs=[v for _, v in pairs],
                                retain_graph=retain, allow_unused=True)
    return _fill(grads, inputs)


def _fill(grads: Sequence[torch.Tensor | None], like: Tensors) -> Tensors:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def _dot(a: Tensors, b: Tensors) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def _scalar(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise GraftingError(f"{name} must return a scalar tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise GraftingError(f"{name} must return a scalar tensor, got shape {tuple(value.shape)}")
    return value.reshape(())


def _require_dependence(loss: torch.Tensor, name: str) -> None:
    if not loss.requires_grad:
        _independent(name)


def _independent(name: str) -> None:
    raise GraftingError(f"{name} does not depend on any of the inner parameters (no gradient reaches them); "
                        f"the loss must be computed from their current values")


def _check_params(inner_params: Iterable[torch.Tensor], outer_params: Iterable[torch.Tensor],
                  caller: str) -> tuple[Tensors, Tensors]:
    inner, outer = list(inner_params), list(outer_params)
    seen: dict[int, str] = {}
    for kind, params in (("inner", inner), ("outer", outer)):
        if not params:
            raise GraftingError(f"{caller}: no {kind} parameters given")
        for i, p in enumerate(params):
            where = f"{kind} parameter {i}"
            if not isinstance(p, torch.Tensor):
                raise GraftingError(f"{caller}: {where} is a {type(p).__name__}, not a tensor")
            if not p.requires_grad:
                raise GraftingError(f"{caller}: {where} (shape {tuple(p.shape)}) does not require grad")
            if not p.is_leaf:
                # DARTS writes into the inner tensors and the result is a derivative w.r.t. these exact
                # tensors; a computed tensor would be neither writable nor what the caller's optimizer steps.
                raise GraftingError(f"{caller}: {where} (shape {tuple(p.shape)}) is not a leaf tensor; "
                                    f"pass the parameters themselves")
            if id(p) in seen:
                raise GraftingError(f"{caller}: {where} is the same tensor as {seen[id(p)]}; a tensor "
                                    f"belongs to one level only, once")
            seen[id(p)] = where
    return inner, outer


def _check_positive_int(value: object, name: str, caller: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GraftingError(f"{caller}: {name} must be an integer >= 1, got {value!r}")


def _check_positive(value: object, name: str, caller: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise GraftingError(f"{caller}: {name} must be a finite number > 0, got {value!r}")


def _check_finite(result: Tensors, method: str) -> None:
    for i, g in enumerate(result):
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteHypergradient(
                f"{method} hypergradient for outer tensor {i} (shape {tuple(g.shape)}) is not finite; check the "
                f"losses for nan/inf" + (", and alpha < 2/λ_max(H)" if method == "neumann" else ""),
                method=method, index=i)
