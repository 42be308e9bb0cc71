"""The bi-level training engine: levels of parameters, each with its own loss, data and optimizer.

A :class:`Level` is parameters + a loss on one batch of its own data stream + an optimizer (and scheduler). The
:class:`Engine` alternates ``unroll`` optimizer steps of the inner level with one step of the outer level, whose
gradient is the hypergradient through the inner problem (:func:`grafting.blo.hypergradient`: ``first_order``,
``darts``, ``neumann``, ``cg``) or the exact reverse-mode derivative through the ``unroll`` inner steps
(``unrolled``, for small problems and tests). This is the scheme of DARTS (Liu et al., arXiv 1806.09055,
Alg. 1) and of the BLO adapter papers (AutoLoRA, arXiv 2403.09113; BiLoRA, arXiv 2403.13037; BiDoRA,
arXiv 2410.09758), which all alternate one architecture step with a few weight steps.

Levels are a list, inner first. Two levels run today; the list is the extension point for three-level problems
(TapWeight), whose middle level would be differentiated through the inner one the same way.

Second derivatives: PyTorch's fused CPU attention kernel has no double backward. Methods that need one
(``neumann``, ``cg``, ``unrolled``) run their outer step with the math attention backend, which has it, when a
probe finds the fused kernel lacking; an operation without a double backward that cannot be switched fails
with a message naming it and the methods that need none (``darts``, ``first_order``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GraftingError
from .hypergrad import METHODS, NonFiniteHypergradient, hypergradient, outer_grad_at, unrolled_hypergradient

ENGINE_METHODS = (*METHODS, "unrolled")
SECOND_ORDER = ("neumann", "cg", "unrolled")


@dataclass
class Level:
    """One level of a bi-level problem.

    ``params``: the tensors this level trains (leaf tensors with ``requires_grad``); ``loss(batch)``: a scalar
    from one batch of ``data``, an iterable that is iterated again when exhausted (one pass = one epoch);
    ``optimizer`` over exactly ``params``; ``scheduler`` (optional) is stepped after each optimizer step.
    ``module``: the model the loss runs, needed only by the ``unrolled`` hypergradient (the loss is then
    re-run with the unrolled inner values in place of the parameters). ``regularizer()``: an optional
    batch-free term of this level's loss that reads only this level's own parameters (BiLoRA's orthogonality,
    BiDoRA's direction penalty); the level trains on ``loss(batch) + regularizer()``, and the engine skips it
    where only another level's gradient is wanted (DARTS' finite-difference pass), where it contributes zero."""

    name: str
    params: list
    loss: Callable[[Any], torch.Tensor]
    data: Iterable
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    max_grad_norm: float | None = None
    module: nn.Module | None = None
    regularizer: Callable[[], torch.Tensor | None] | None = None

    def total(self, batch) -> torch.Tensor:
        """The loss this level trains on: ``loss(batch)`` plus its regularizer."""
        loss = self.loss(batch)
        extra = self.regularizer() if self.regularizer is not None else None
        return loss if extra is None else loss + extra

    def __post_init__(self):
        self.params = list(self.params)
        self._it = None
        self.steps = 0

    def next_batch(self):
        if self._it is None:
            self._it = iter(self.data)
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.data)
            try:
                return next(self._it)
            except StopIteration:
                raise GraftingError(f"level '{self.name}': its data stream yields no batches") from None

    def apply(self, grads: list) -> None:
        """Put ``grads`` on the parameters and take one optimizer (and scheduler) step."""
        for p, g in zip(self.params, grads):
            p.grad = g.detach().to(p.dtype)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1


class Engine:
    """``unroll`` inner steps, then one outer step through them; ``warmup`` inner-only steps first.

    ``hypergradient``: one of :data:`ENGINE_METHODS`. ``iters`` / ``alpha`` / ``eps`` go to
    :func:`~grafting.blo.hypergradient`; ``alpha`` defaults to the inner optimizer's current learning rate
    (DARTS' virtual step ξ, the Neumann step, the unrolled SGD step). ``frozen``: tensors no level may change
    (a base model's weights); the engine checks that no optimizer holds one. ``log(entry)`` receives one dict per
    step and level: ``{"level", "step", "loss"}`` plus ``hypergrad_norm`` for outer steps."""

    def __init__(self, levels: list[Level], hypergradient: str = "darts", unroll: int = 1, warmup: int = 0,
                 iters: int = 5, alpha: float | None = None, eps: float = 0.01, frozen: Iterable = (),
                 log: Callable[[dict], None] | None = None):
        if hypergradient not in ENGINE_METHODS:
            raise GraftingError(f"Engine: unknown hypergradient {hypergradient!r}; expected one of "
                                f"{', '.join(ENGINE_METHODS)}")
        if len(levels) != 2:
            raise GraftingError(f"Engine: {len(levels)} levels given; this engine runs two (inner, outer)")
        if not (isinstance(unroll, int) and unroll >= 1):
            raise GraftingError(f"Engine: unroll must be an integer >= 1, got {unroll!r}")
        if not (isinstance(warmup, int) and warmup >= 0):
            raise GraftingError(f"Engine: warmup must be an integer >= 0, got {warmup!r}")
        if alpha is not None and not alpha > 0:
            raise GraftingError(f"Engine: alpha must be > 0, got {alpha!r}")
        self.inner, self.outer = levels
        self.method, self.unroll, self.warmup = hypergradient, unroll, warmup
        self.iters, self.alpha, self.eps = iters, alpha, eps
        self.log = log or (lambda entry: None)
        self.step_count = 0  # outer steps taken
        self._check_levels(list(frozen))
        if hypergradient == "unrolled" and self.inner.module is None:
            raise GraftingError("Engine: hypergradient 'unrolled' re-runs the inner loss with unrolled values: "
                                "give the inner Level its module=")

    def _check_levels(self, frozen: list) -> None:
        owner: dict = {}
        for level in (self.inner, self.outer):
            if not level.params:
                raise GraftingError(f"level '{level.name}': no parameters to train")
            for p in level.params:
                if not (isinstance(p, torch.Tensor) and p.requires_grad and p.is_leaf):
                    raise GraftingError(f"level '{level.name}': every parameter must be a leaf tensor with "
                                        "requires_grad=True")
                if id(p) in owner:
                    raise GraftingError(f"a parameter belongs to both level '{owner[id(p)]}' and level "
                                        f"'{level.name}'; each parameter is trained at one level")
                owner[id(p)] = level.name
            mine = {id(p) for p in level.params}
            held = [p for g in level.optimizer.param_groups for p in g["params"]]
            if any(id(p) not in mine for p in held) or len({id(p) for p in held}) != len(mine):
                raise GraftingError(f"level '{level.name}': its optimizer must hold exactly the level's parameters")
        clash = [i for i, p in enumerate(frozen) if id(p) in owner]
        if clash:
            raise GraftingError(f"frozen tensor #{clash[0]} is also trained by level '{owner[id(frozen[clash[0]])]}'")

    # ---- steps -------------------------------------------------------------------------------------------------
    def inner_step(self) -> float:
        level = self.inner
        batch = level.next_batch()
        loss = _finite(level.total(batch), level.name, level.steps + 1, "loss")
        grads = torch.autograd.grad(loss, level.params, allow_unused=True)
        level.apply([torch.zeros_like(p) if g is None else g for p, g in zip(level.params, grads)])
        self.log({"level": level.name, "step": level.steps, "loss": loss.item()})
        self._last_inner = batch
        return loss.item()

    def step(self) -> dict:
        """One outer step: ``unroll`` inner steps (after the warm-up), then the outer update."""
        while self.inner.steps < self.warmup:
            self.inner_step()
        if self.method == "unrolled":
            return self._unrolled_step()
        if self.method == "darts":
            return self._darts_step()
        inner_losses = [self.inner_step() for _ in range(self.unroll)]
        inner_batch, outer_batch = self._last_inner, self.outer.next_batch()
        outer_value = {}

        def outer_loss():
            loss = self.outer.total(outer_batch)
            outer_value.setdefault("loss", loss.detach())
            return loss

        alpha = self.alpha or _lr(self.inner.optimizer)
        with self._second_order():
            try:
                grads = hypergradient(outer_loss, lambda: self.inner.total(inner_batch), self.inner.params,
                                      self.outer.params, method=self.method, iters=self.iters, alpha=alpha,
                                      eps=self.eps)
            except NonFiniteHypergradient as e:
                raise self._nonfinite(e) from None
            except RuntimeError as e:
                raise _no_double_backward(e, self.method) from None
        return self._outer_update(grads, outer_value["loss"], inner_losses)

    def _unrolled_step(self) -> dict:
        inner, start = self.inner, self.inner.steps + 1
        batches = [inner.next_batch() for _ in range(self.unroll)]
        outer_batch = self.outer.next_batch()
        seen = iter(batches)
        call = _WithValues(inner.module, inner.total)
        names = _names_of(inner.module, inner.params, inner.name)
        outer_value = {}

        def inner_loss(ws):
            return call.run(dict(zip(names, ws)), next(seen))

        def outer_loss(ws):
            loss = call.run(dict(zip(names, ws)), outer_batch, self.outer.total)
            outer_value["loss"] = loss.detach()
            return loss

        with self._second_order():
            try:
                grads = unrolled_hypergradient(outer_loss, inner_loss, inner.params, self.outer.params,
                                               steps=self.unroll, lr=self.alpha or _lr(inner.optimizer))
            except NonFiniteHypergradient as e:
                raise self._nonfinite(e) from None
            except RuntimeError as e:
                raise _no_double_backward(e, self.method) from None
        # the inner level then takes the same steps with its own optimizer on the same batches
        inner_losses = []
        for batch in batches:
            loss = _finite(inner.total(batch), inner.name, start + len(inner_losses), "loss")
            g = torch.autograd.grad(loss, inner.params, allow_unused=True)
            inner.apply([torch.zeros_like(p) if x is None else x for p, x in zip(inner.params, g)])
            inner_losses.append(loss.item())
            self.log({"level": inner.name, "step": inner.steps, "loss": loss.item()})
        return self._outer_update(grads, outer_value["loss"], inner_losses)

    def _darts_step(self) -> dict:
        """DARTS (arXiv 1806.09055, Alg. 1 and eq. 7-8) at the cost of two passes beyond the inner step.

        The last inner step's backward also yields ∇_λ L_in(w, λ), and the step itself moves w to w', which
        stands in for DARTS' virtual step w − ξ∇_w L_in (exactly it for SGD at learning rate ξ; for Adam, the
        step the level really takes, as Betty does). Then ∂L_out/∂w' and ∂L_out/∂λ at w' (one pass), and the
        mixed term ∂²L_in/∂λ∂w · u, u = ∂L_out/∂w', by a forward difference from w (one pass, λ-gradient
        only, same batch and random draws as the inner step): [∇_λ L_in(w + ε̂u) − ∇_λ L_in(w)] / ε̂ with
        ε̂ = eps/‖u‖. A central difference (:func:`~grafting.blo.hypergradient` with ``method="darts"``) costs
        one pass more for an O(ε̂²) instead of O(ε̂) truncation error; DARTS' ε̂ is small enough that the
        difference is below the noise of a minibatch."""
        inner, outer = self.inner, self.outer
        inner_losses = [self.inner_step() for _ in range(self.unroll - 1)]
        batch, start = inner.next_batch(), [w.detach().clone() for w in inner.params]
        rng = torch.get_rng_state()
        loss = _finite(inner.total(batch), inner.name, inner.steps + 1, "loss")
        grads = _filled(torch.autograd.grad(loss, inner.params + outer.params, allow_unused=True),
                        inner.params + outer.params)
        center = grads[len(inner.params):]
        inner.apply(grads[:len(inner.params)])
        self.log({"level": inner.name, "step": inner.steps, "loss": loss.item()})
        inner_losses.append(loss.item())
        out_loss = _finite(outer.total(outer.next_batch()), outer.name, self.step_count + 1, "loss")
        grads = _filled(torch.autograd.grad(out_loss, inner.params + outer.params, allow_unused=True),
                        inner.params + outer.params)
        u, direct = grads[:len(inner.params)], grads[len(inner.params):]
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in u))
        result = direct
        if norm > 0.0:
            radius = self.eps / norm
            xi = self.alpha or _lr(inner.optimizer)
            stepped = [w.detach().clone() for w in inner.params]
            try:
                plus = outer_grad_at(lambda: inner.loss(batch), inner.params, outer.params, start, u, radius, rng)
            finally:
                with torch.no_grad():
                    for w, w1 in zip(inner.params, stepped):
                        w.copy_(w1)
            result = [d - xi * (a - c) / radius for d, a, c in zip(direct, plus, center)]
        for i, g in enumerate(result):
            if not bool(torch.isfinite(g).all()):
                raise self._nonfinite(NonFiniteHypergradient(
                    f"darts hypergradient for outer tensor {i} (shape {tuple(g.shape)}) is not finite; check the "
                    "losses for nan/inf", "darts", i)) from None
        return self._outer_update(result, out_loss.detach(), inner_losses)

    def _outer_update(self, grads: list, outer_loss: torch.Tensor, inner_losses: list) -> dict:
        self.step_count += 1
        _finite(outer_loss, self.outer.name, self.step_count, "loss")
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        self.outer.apply(grads)
        entry = {"level": self.outer.name, "step": self.outer.steps, "loss": outer_loss.item(),
                 "hypergrad_norm": norm}
        self.log(entry)
        return {"step": self.step_count, "inner_loss": sum(inner_losses) / len(inner_losses),
                "outer_loss": outer_loss.item(), "hypergrad_norm": norm}

    def run(self, steps: int, progress: bool = False) -> list[dict]:
        """``steps`` outer steps; returns each step's summary (inner loss averaged over its inner steps)."""
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="bilevel", unit="step", dynamic_ncols=True)
        out = []
        for _ in range(steps):
            out.append(self.step())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(inner=f"{out[-1]['inner_loss']:.4f}", outer=f"{out[-1]['outer_loss']:.4f}")
        if bar is not None:
            bar.close()
        return out

    def _second_order(self):
        if self.method in SECOND_ORDER and not fused_attention_has_double_backward():
            from torch.nn.attention import SDPBackend, sdpa_kernel
            return sdpa_kernel([SDPBackend.MATH])
        return contextlib.nullcontext()

    def _nonfinite(self, e: NonFiniteHypergradient) -> NonFiniteHypergradient:
        where = f"level '{self.outer.name}', outer step {self.step_count + 1}"
        return NonFiniteHypergradient(f"{where}: {e}; lower the learning rates or alpha, or check the losses",
                                      e.method, e.index)


class _WithValues(nn.Module):
    """Runs a level's loss with some of ``module``'s parameters replaced by given tensors (functional_call)."""

    def __init__(self, module: nn.Module, loss):
        super().__init__()
        self.module, self._loss = module, loss
        self._fn = loss

    def forward(self, batch):
        return self._fn(batch)

    def run(self, values: dict, batch, loss=None):
        self._fn = loss or self._loss
        return torch.func.functional_call(self, {f"module.{k}": v for k, v in values.items()}, (batch,),
                                          strict=False)


def _names_of(module: nn.Module, params: list, level: str) -> list[str]:
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise GraftingError(f"level '{level}': parameter #{missing[0]} is not a parameter of the level's module")
    return [names[id(p)] for p in params]


def _filled(grads, like: list) -> list:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _finite(loss, level: str, step: int, what: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise GraftingError(f"level '{level}': its loss must return a scalar tensor, got "
                            f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
    if not torch.isfinite(loss.detach()).all():
        raise GraftingError(f"level '{level}', step {step}: the {what} is {loss.item()}; lower the learning rate "
                            "or check the data")
    return loss.reshape(())


def _no_double_backward(e: RuntimeError, method: str) -> Exception:
    text = str(e)
    op = None
    if "derivative for" in text and "not implemented" in text:
        op = text.split("derivative for", 1)[1].split("is not implemented", 1)[0].strip()
    elif "once_differentiable" in text:
        op = "a custom autograd function (marked @once_differentiable)"
    if op is not None:
        return GraftingError(f"hypergradient '{method}' needs second derivatives, but {op} has no double "
                             "backward in this PyTorch build; use hypergradient 'darts' or 'first_order' (no "
                             "second derivatives), or a model whose attention can run in math mode")
    return e


@functools.lru_cache(maxsize=None)
def fused_attention_has_double_backward() -> bool:
    """Whether scaled_dot_product_attention's default CPU kernel supports double backward (probed once)."""
    q = torch.randn(1, 1, 3, 4, requires_grad=True)
    try:
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        torch.autograd.grad(g.sum(), q)
        return True
    except RuntimeError:
        return False
