"""Bi-level training from a recipe: ``graft train`` with a ``bilevel:`` section (docs/bilevel.md).

The adapter's parameters split by role (``AdaptedModel.param_groups``): ``architecture`` (AutoLoRA's selection
weights, BiLoRA's singular values, DoRA / BiDoRA magnitudes) is the outer level, trained on the outer rows
through the hypergradient; everything else (factors, heads) is the inner level, trained on the training rows
with the method's penalty (``AdaptedModel.regularizer``). :class:`grafting.blo.Engine` alternates them.
AutoLoRA then retrains a plain LoRA at the ranks it found on training + outer rows (arXiv:2403.09113, Sec. 3.4).
The run writes the usual outputs (adapter/, metrics.jsonl, summary.json, curves) plus both levels' losses
(bilevel.png) and, for AutoLoRA, the ranks found per layer (ranks.json, ranks.png).
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import torch

from ..blo import Engine, Level
from ..config import config_from_fields
from ..errors import GraftingError
from ..io.atomic import atomic_write_bytes
from .data import collate
from .recipe import Recipe

ADAPTER = "default"


def batches(rows: list[dict], batch_size: int, pad_id: int, task: str, seed: int):
    """An endless stream of batches, reshuffled each pass (deterministic in ``seed``)."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([rows[j] for j in order[i:i + batch_size]], pad_id, task)


class _Stream:
    """Re-iterable wrapper around one endless generator (the Engine iterates its data again when exhausted)."""

    def __init__(self, gen):
        self.gen = gen

    def __iter__(self):
        return self.gen


def _optimizer(kind: str, params: list, lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def run_bilevel(recipe: Recipe, resume: bool, world: int, rank: int):
    from .trainer import (TrainResult, _autocast, adapt_for, adapter_config_for, batch_loss, evaluate,
                          calibration_batches, load_data_and_model, lr_at, peak_memory_mb, plain_lm,
                          save_quantized_base)
    if world > 1:
        raise GraftingError("bilevel: runs in one process; launch it without torchrun")
    if resume:
        raise GraftingError("bilevel: --resume is not supported for bi-level runs; start the run again")
    b, t, task = recipe.bilevel, recipe.train, recipe.model.task
    out_dir = Path(recipe.output_dir)
    torch.manual_seed(t.seed)
    tokenizer, base, rows, val_rows = load_data_and_model(recipe)
    if b.outer_data == "validation":
        train_rows, outer_rows = rows, val_rows
    else:
        shuffled = rows[:]
        random.Random(t.seed).shuffle(shuffled)
        cut = int(round(len(shuffled) * b.outer_fraction))
        outer_rows, train_rows = shuffled[:cut], shuffled[cut:]
    outer_bs = b.outer_batch_size or t.batch_size
    if len(outer_rows) < outer_bs or len(train_rows) < t.batch_size:
        raise GraftingError(f"bilevel: the outer split has {len(outer_rows)} rows and the inner {len(train_rows)}; "
                            f"each needs at least one batch (bilevel.outer_batch_size {outer_bs}, train.batch_size "
                            f"{t.batch_size}): raise bilevel.outer_fraction, add data or lower the batch sizes")
    pad_id = tokenizer.pad_token_id
    cfg = adapter_config_for(recipe)
    torch.manual_seed(t.seed)
    model = adapt_for(recipe, base, cfg, calibration_batches(recipe, cfg, train_rows, pad_id))
    save_quantized_base(recipe, model, out_dir)
    model.train()
    roles = model.param_groups(ADAPTER)
    outer_params = roles.get("architecture", [])
    if not outer_params:
        raise GraftingError(f"bilevel: adapter method '{cfg.method}' has no architecture parameters to train at "
                            "the outer level; use method autolora, bilora or bidora (or dora), or remove the "
                            "bilevel section")
    inner_params = [p for role, ps in roles.items() if role != "architecture" for p in ps]
    lm = plain_lm(model, train_rows, pad_id, task)
    autocast = _autocast(t.bf16)

    def mean_loss(batch):
        with autocast():
            loss, n = batch_loss(model, batch, task, lm)
        return loss / max(n, 1)

    total = t.max_steps or max(1, int(t.epochs * max(1, len(train_rows) // t.batch_size)))
    o = recipe.optim
    inner_opt = _optimizer("adamw", inner_params, o.lr, o.weight_decay, o.betas, o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(inner_opt, lambda step: lr_at(min(step, total - 1), total, recipe) / o.lr)
    outer_opt = _optimizer(b.outer_optim, outer_params, b.outer_lr, b.outer_weight_decay)
    inner = Level("inner", inner_params, mean_loss,
                  _Stream(batches(train_rows, t.batch_size, pad_id, task, t.seed)), inner_opt, sched,
                  max_grad_norm=o.max_grad_norm, module=model, regularizer=lambda: model.regularizer(ADAPTER))
    outer = Level("outer", outer_params, mean_loss,
                  _Stream(batches(outer_rows, outer_bs, pad_id, task, t.seed + 1)), outer_opt)
    history: list[dict] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "metrics.jsonl"
    if log_path.exists():
        log_path.unlink()

    def log(entry: dict) -> None:
        history.append(entry)
        with open(log_path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    engine = Engine([inner, outer], hypergradient=b.hypergradient, unroll=b.unroll, warmup=b.warmup_steps,
                    iters=b.iters, alpha=b.alpha, eps=b.eps,
                    log=lambda e: log({"kind": e["level"], **{k: v for k, v in e.items() if k != "level"}}))
    start = time.perf_counter()
    before = evaluate(model, val_rows, task, pad_id, t.eval_batch_size, autocast, lm)
    log({"kind": "eval", "step": 0, **before})
    outer_steps = max(1, (total - b.warmup_steps) // b.unroll)
    engine.run(outer_steps, progress=t.progress)
    model.eval()
    extra = {}
    if cfg.method == "autolora":
        model, extra = _retrain_at_found_ranks(model, cfg, recipe, base, train_rows + outer_rows, pad_id, task, lm,
                                               b.retrain_steps or total, out_dir, log)
    model.save_adapter(out_dir / "adapter", name=ADAPTER)  # written as plain LoRA / DoRA (Method.export_config)
    after = evaluate(model, val_rows, task, pad_id, t.eval_batch_size, autocast, lm)
    steps = inner.steps + extra.get("retrain_steps", 0)
    log({"kind": "eval", "step": steps, **after})
    elapsed = time.perf_counter() - start
    from .plots import write_bilevel_curves, write_curves
    write_curves([{**h, "kind": "train"} if h["kind"] == "inner" else h for h in history], out_dir, t.metric)
    write_bilevel_curves(history, out_dir)
    summary = model.trainable_summary()
    better = after[t.metric] <= before[t.metric] if t.metric in ("loss", "perplexity") else \
        after[t.metric] >= before[t.metric]
    result = TrainResult(before=before, after=after, steps=steps, wall_time=elapsed, tokens_per_s=0.0,
                         trainable=summary["trainable"], total=summary["total"], output_dir=str(out_dir),
                         adapter_path=str(out_dir / "adapter"),
                         best={"metric": t.metric, "value": after[t.metric] if better else before[t.metric],
                               "step": steps if better else 0},
                         peak_memory_mb=peak_memory_mb())
    atomic_write_bytes(out_dir / "summary.json", json.dumps({**result.__dict__, **extra}, indent=1).encode())
    return result


def found_ranks(model, name: str = ADAPTER, threshold: float | None = None) -> dict[str, list[int]]:
    """AutoLoRA's rule per layer: module name -> indices of the kept rank-1 components (largest first)."""
    from ..methods.autolora import kept_components
    return {m: kept_components(h.adapters[name], threshold) for m, h in model.hosts() if name in h.adapters}


def _retrain_at_found_ranks(model, cfg, recipe, base, rows, pad_id, task, lm, steps, out_dir, log):
    """A fresh plain LoRA with ``rank_pattern`` = the ranks found, trained on ``rows`` (AutoLoRA, Sec. 3.4)."""
    from .plots import write_rank_plot
    from .trainer import batch_loss, lr_at
    kept = found_ranks(model, ADAPTER, cfg.rank_threshold)
    ranks = {m: len(k) for m, k in kept.items()}
    atomic_write_bytes(out_dir / "ranks.json", json.dumps({"r": cfg.r, "ranks": ranks, "kept": kept}, indent=1).encode())
    write_rank_plot(ranks, cfg.r, out_dir / "ranks.png")
    fields = {k: v for k, v in recipe.adapter.items() if k not in ("method", "rank_threshold")}
    plain = config_from_fields({**fields, "method": "lora", "rank_pattern": {re.escape(m): r for m, r in ranks.items()}},
                               where="adapter")
    plain.task_type, plain.base_model_name_or_path = cfg.task_type, cfg.base_model_name_or_path
    model.delete_adapter(ADAPTER)
    model.add_adapter(ADAPTER, plain)
    model.set_active(ADAPTER)
    model.train()
    params = [p for ps in model.param_groups(ADAPTER).values() for p in ps]
    o, t = recipe.optim, recipe.train
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    stream = batches(rows, t.batch_size, pad_id, task, t.seed + 2)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, recipe)
        loss, n = batch_loss(model, next(stream), task, lm)
        (loss / max(n, 1)).backward()
        if o.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % t.log_every == 0 or step + 1 == steps:
            log({"kind": "retrain", "step": step + 1, "loss": (loss / max(n, 1)).item()})
    model.eval()
    return model, {"ranks": ranks, "retrain_steps": steps}
