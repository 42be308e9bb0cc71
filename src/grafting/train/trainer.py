"""A plain training loop for adapters: read it top to bottom (torchtune's recipes are the model).

Gradient accumulation, AdamW with warm-up + cosine/linear decay, gradient clipping, bf16 autocast, gradient
checkpointing, periodic evaluation with early stopping, exact resume from checkpoints, and DDP under torchrun
(gloo on CPU; only rank 0 writes). The data order is a pure function of (seed, epoch) and each optimizer step
consumes one global batch, split the same way across micro-steps and ranks, so 2 processes give the result of
1 process with doubled accumulation.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import adapt
from ..errors import GraftingError
from ..registry import get_method
from ..io.atomic import atomic_write_bytes
from . import checkpoint
from .data import collate, encode, load_splits
from .lm_loss import head_is_plain, hidden_and_head, linear_cross_entropy
from .metrics import classification_metrics, improved, lm_metrics
from .models import load_model
from .optim import build_optimizer, set_lr
from .recipe import Recipe, load_recipe

ADAPTER = "default"


@dataclass
class TrainResult:
    before: dict
    after: dict
    steps: int
    wall_time: float
    tokens_per_s: float
    trainable: int
    total: int
    output_dir: str
    adapter_path: str
    best: dict = field(default_factory=dict)
    peak_memory_mb: float = 0.0  # the process's peak resident memory (ru_maxrss)


def lr_at(step: int, total: int, recipe: Recipe) -> float:
    s, base = recipe.schedule, recipe.optim.lr
    if step < s.warmup_steps:
        return base * (step + 1) / s.warmup_steps
    if s.name == "constant":
        return base
    progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if s.name == "cosine" else 1 - progress
    return base * (s.min_lr_ratio + (1 - s.min_lr_ratio) * decay)


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return world, rank


def order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_indices(n: int, global_batch: int, step: int, seed: int) -> list[int]:
    per_epoch = max(1, n // global_batch)
    epoch, pos = divmod(step, per_epoch)
    perm = order(n, seed, epoch)
    if global_batch > n:
        perm = perm.repeat(math.ceil(global_batch / n))
    return perm[pos * global_batch:(pos + 1) * global_batch].tolist()


def batch_loss(model, batch: dict, task: str, lm=None) -> tuple[torch.Tensor, int]:
    """Summed loss over the batch (per example for classification, per target token for LM) and its count.

    ``lm``: the Hugging Face causal LM inside ``model`` when its logits are its output layer applied to the
    hidden states (see lm_loss.head_is_plain); the loss then never materialises the logits.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if lm is not None:
        targets = batch["labels"][:, 1:]
        hidden, head = hidden_and_head(model, lm, **inputs)
        loss = linear_cross_entropy(hidden[:, :-1], head.weight, head.bias, targets)
        return loss, int((targets != -100).sum())
    out = model(**inputs)
    if task == "seq_cls":
        loss = torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"], reduction="sum")
        return loss, batch["labels"].numel()
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def _count(rows: list[dict], task: str) -> int:
    if task == "seq_cls":
        return len(rows)
    return sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)


@torch.no_grad()
def evaluate(model, rows: list[dict], task: str, pad_id: int, batch_size: int, autocast, lm=None) -> dict:
    was_training = model.training
    model.eval()
    loss_sum, count, logits_all, labels_all = 0.0, 0, [], []
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i:i + batch_size], pad_id, task)
        with autocast():
            if task == "seq_cls":
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
                logits_all.append(logits)
                labels_all.append(batch["labels"])
            else:
                loss, n = batch_loss(model, batch, task, lm)
                loss_sum += loss.item()
                count += n
    model.train(was_training)
    if task == "seq_cls":
        return classification_metrics(torch.cat(logits_all), torch.cat(labels_all), loss_sum)
    return lm_metrics(loss_sum, count)


def _autocast(enabled: bool):
    if enabled:
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


LOCK = ".graft-train.lock"


def claim_output_dir(out_dir: Path, resume: bool, overwrite: bool):
    """Lock ``out_dir`` for this run (the returned file; closing it releases the lock) and refuse to mix a
    new run into an earlier one's files unless told to continue it (resume) or replace it (overwrite)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GraftingError(f"output_dir '{out_dir}': exists and is not a directory; choose another output_dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = open(out_dir / LOCK, "a")
    except OSError as e:
        raise GraftingError(f"output_dir '{out_dir}': cannot be created or written ({e.strerror})") from None
    try:
        # two runs in one directory would interleave metrics.jsonl and overwrite each other's checkpoints
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise GraftingError(f"output_dir '{out_dir}': another graft train is running there (it holds {LOCK}); "
                            "wait for it or choose another output_dir") from None
    held = sorted(p.name for p in out_dir.iterdir() if p.name != LOCK)
    if held and not (resume or overwrite):
        fh.close()
        shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
        raise GraftingError(f"output_dir '{out_dir}': not empty (holds {shown}); pass --resume to continue its "
                            "checkpoint or --overwrite to replace its files (in Python: resume=True / "
                            "overwrite=True), or choose another output_dir")
    return fh


def run(recipe, resume: bool = False, overrides: list[str] | None = None, overwrite: bool = False) -> TrainResult:
    """Train as the recipe says. ``resume``: continue ``<output_dir>/checkpoint``; ``overwrite``: a new run
    may replace the files of an earlier one in ``output_dir`` (otherwise a non-empty output_dir is refused)."""
    from . import require_extra
    require_extra()
    recipe = load_recipe(recipe, overrides)
    world, rank = _dist()
    lock = claim_output_dir(Path(recipe.output_dir), resume, overwrite) if rank == 0 else None
    try:
        if recipe.bilevel is not None:
            from .bilevel import run_bilevel
            return run_bilevel(recipe, resume, world, rank)
        return _run(recipe, resume, world, rank)
    finally:
        if lock is not None:
            lock.close()


def load_data_and_model(recipe: Recipe):
    """(tokenizer, base model, training rows, validation rows) as the recipe says, both splits non-empty."""
    task = recipe.model.task
    splits = load_splits(recipe.data, task)
    if recipe.model.num_labels is not None and splits.label_names and \
            recipe.model.num_labels != len(splits.label_names):
        raise GraftingError(f"model.num_labels: {recipe.model.num_labels}, but the data has "
                            f"{len(splits.label_names)} labels ({', '.join(splits.label_names)}); set it to "
                            f"{len(splits.label_names)} or leave it out (it is inferred from the data)")
    num_labels = recipe.model.num_labels or (len(splits.label_names) if splits.label_names else None)
    tokenizer, base = load_model(recipe.model.path, task, num_labels, splits.label_names)
    train_rows = encode(splits.train, tokenizer, task, recipe.data)
    val_rows = encode(splits.validation, tokenizer, task, recipe.data)
    if not train_rows or not val_rows:
        raise GraftingError(f"recipe data: {len(train_rows)} training and {len(val_rows)} validation rows remain; "
                            "both must be non-empty")
    return tokenizer, base, train_rows, val_rows


def adapter_config_for(recipe: Recipe):
    """The recipe's adapter config with the trainer's defaults: the task head trains in full (as in peft)."""
    cfg = recipe.adapter_config()
    if recipe.model.task == "seq_cls" and cfg.task_type is None:
        cfg.task_type = "SEQ_CLS"
    if cfg.base_model_name_or_path is None:
        cfg.base_model_name_or_path = recipe.model.path
    return cfg


def calibration_batches(recipe: Recipe, cfg, rows: list[dict], pad_id: int) -> list[dict] | None:
    """Model inputs for an init that reads activations (EVA, CorDA: ``Method.needs_calibration``): the first
    ``train.calibration_batches`` training batches (labels dropped, so the model computes no loss); None when
    the method reads none."""
    if not get_method(cfg.method).needs_calibration(cfg):
        return None
    t = recipe.train
    batches = []
    for i in range(0, min(len(rows), t.calibration_batches * t.batch_size), t.batch_size):
        batch = collate(rows[i:i + t.batch_size], pad_id, recipe.model.task)
        batches.append({k: v for k, v in batch.items() if k != "labels"})
    return batches


def adapt_for(recipe: Recipe, base, cfg, calibration: list[dict] | None = None):
    """The adapted model: ``adapt``, or with a ``quantize`` section the NF4 base and its adapter init."""
    q = recipe.quantize
    if q is None:
        return adapt(base, cfg, ADAPTER, calibration=calibration)
    if calibration is not None:
        raise GraftingError(f"recipe quantize: adapter method '{cfg.method}' initialises from activations here, "
                            "which the quantized-base inits (qlora, loftq, lq_lora) do not feed; remove the "
                            "quantize section or use a data-free init")
    from ..quant import nf4_layers
    from ..quant.loftq import quantize_with_adapter
    if nf4_layers(base):
        raise GraftingError(f"recipe quantize: model.path '{recipe.model.path}' is already a 4-bit checkpoint; "
                            "remove the quantize section (its layers train as they are)")
    model, _ = quantize_with_adapter(base, cfg, init=q.init, num_iter=q.num_iter, block_size=q.block_size,
                                     double_quant=q.double_quant, bits_per_parameter=q.bits_per_parameter,
                                     adapter_name=ADAPTER, embeddings=q.embeddings, nf4_only=q.nf4_only)
    return model


def save_quantized_base(recipe: Recipe, model, out_dir: Path) -> None:
    """LoftQ / LQ-LoRA adapters belong to the exact base they were fitted to: write it beside them."""
    if recipe.quantize is not None and recipe.quantize.init != "qlora" and not (out_dir / "base").exists():
        from ..quant import save_pretrained
        save_pretrained(model, out_dir / "base")


def plain_lm(model, rows: list[dict], pad_id: int, task: str):
    """The causal LM inside ``model`` when its logits are head(hidden), so the loss can skip the full logits
    tensor (lm_loss.head_is_plain); None otherwise and for classification."""
    if task == "seq_cls":
        return None
    probe = collate(rows[:2], pad_id, task)
    ok = head_is_plain(model, model.base_model, input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])
    return model.base_model if ok else None


def _run(recipe: Recipe, resume: bool, world: int, rank: int) -> TrainResult:
    t, task = recipe.train, recipe.model.task
    main = rank == 0
    out_dir = Path(recipe.output_dir)
    torch.manual_seed(t.seed)

    tokenizer, base, train_rows, val_rows = load_data_and_model(recipe)
    pad_id = tokenizer.pad_token_id
    cfg = adapter_config_for(recipe)
    torch.manual_seed(t.seed)
    model = adapt_for(recipe, base, cfg, calibration_batches(recipe, cfg, train_rows, pad_id))
    if main:
        save_quantized_base(recipe, model, out_dir)
    if recipe.model.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lm = plain_lm(model, train_rows, pad_id, task)
    summary = model.trainable_summary()
    o = recipe.optim
    optimizer, lr_ratios = build_optimizer(model, ADAPTER, o)  # one group per parameter role
    runner = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    global_batch = t.batch_size * t.grad_accum * world
    steps_per_epoch = max(1, len(train_rows) // global_batch)
    total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    autocast = _autocast(t.bf16)
    state = {"step": 0, "history": [], "best": None, "best_step": None, "bad_evals": 0, "tokens": 0,
             "elapsed": 0.0, "before": None}
    ckpt = out_dir / "checkpoint"
    if resume and (ckpt / checkpoint.STATE_JSON).exists():
        state.update(checkpoint.load_checkpoint(ckpt, model, ADAPTER, optimizer))
        state.pop("optimizer", None)
        if main:  # what was logged after the checkpoint is replayed: keep the log in step with the state
            atomic_write_bytes(out_dir / "metrics.jsonl",
                               "".join(json.dumps(h) + "\n" for h in state["history"]).encode())
    elif resume and main:
        print(f"graft: nothing to resume in {ckpt}; starting from step 0")
    if state["before"] is None:
        state["before"] = evaluate(model, val_rows, task, pad_id, t.eval_batch_size, autocast, lm)
        if main and (out_dir / "metrics.jsonl").exists():
            (out_dir / "metrics.jsonl").unlink()  # a fresh run starts a fresh log

    def log(entry: dict) -> None:
        state["history"].append(entry)
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(out_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(entry) + "\n")

    if not state["history"]:
        log({"kind": "eval", "step": 0, **state["before"]})

    def save_ckpt() -> None:
        if main:
            checkpoint.save_checkpoint(ckpt, model, ADAPTER, optimizer, state)
        if world > 1:
            torch.distributed.barrier()

    bar = None
    if main and t.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    start, window_loss, window_n = time.perf_counter() - state["elapsed"], 0.0, 0
    stop = False
    while state["step"] < total and not stop:
        step = state["step"]
        lr = lr_at(step, total, recipe)
        set_lr(optimizer, lr, lr_ratios)
        indices = step_indices(len(train_rows), global_batch, step, t.seed)
        norm = _count([train_rows[i] for i in indices], task)  # the global step's examples or target tokens
        step_loss = 0.0
        for micro in range(t.grad_accum):
            lo = (micro * world + rank) * t.batch_size
            batch = collate([train_rows[i] for i in indices[lo:lo + t.batch_size]], pad_id, task)
            sync = micro == t.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else runner.no_sync()), autocast():
                loss_sum, _ = batch_loss(runner, batch, task, lm)
                # DDP averages over ranks: scale back to the global mean; a method's penalty (BiLoRA's
                # orthogonality term) once per optimizer step
                (loss_sum * world / norm + model.regularizer(ADAPTER) / t.grad_accum).backward()
            step_loss += loss_sum.item()
            state["tokens"] += int(batch["attention_mask"].sum())
        if o.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], o.max_grad_norm)
        optimizer.step()
        state["step"] = step = step + 1
        # methods' per-step hooks (rank budgets, rank sampling), with this step's gradients still in place
        # (gradient-based importance scores read them)
        model.on_step(step, total)
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            total_loss = torch.tensor([step_loss])
            torch.distributed.all_reduce(total_loss)
            step_loss = total_loss.item()
        window_loss += step_loss / norm
        window_n += 1
        elapsed = time.perf_counter() - start
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss / norm:.4f}", lr=f"{lr:.2e}",
                            tok_s=f"{state['tokens'] * world / max(elapsed, 1e-9):.0f}")
        if step % t.log_every == 0 or step == total:
            log({"kind": "train", "step": step, "loss": window_loss / window_n, "lr": lr,
                 "tokens_per_s": state["tokens"] * world / max(elapsed, 1e-9)})
            window_loss, window_n = 0.0, 0
        if t.eval_every and step % t.eval_every == 0 and step < total:
            scores = evaluate(model, val_rows, task, pad_id, t.eval_batch_size, autocast, lm)
            log({"kind": "eval", "step": step, **scores})
            if improved(t.metric, scores[t.metric], state["best"]):
                state.update(best=scores[t.metric], best_step=step, bad_evals=0)
                if main:
                    model.save_adapter(out_dir / "best_adapter", name=ADAPTER)
            else:
                state["bad_evals"] += 1
                stop = bool(t.early_stopping_patience and state["bad_evals"] >= t.early_stopping_patience)
        state["elapsed"] = time.perf_counter() - start
        if t.save_every and step % t.save_every == 0 and step < total:
            save_ckpt()
    if bar is not None:
        bar.close()

    if main:  # before the final evaluation: a failure there must not lose the trained adapter
        model.save_adapter(out_dir / "adapter", name=ADAPTER)
    after = evaluate(model, val_rows, task, pad_id, t.eval_batch_size, autocast, lm)
    log({"kind": "eval", "step": state["step"], **after})
    if improved(t.metric, after[t.metric], state["best"]):
        state.update(best=after[t.metric], best_step=state["step"])
        if main:
            model.save_adapter(out_dir / "best_adapter", name=ADAPTER)
    state["elapsed"] = time.perf_counter() - start
    save_ckpt()
    if main:
        from .plots import write_curves
        write_curves(state["history"], out_dir, t.metric)
    result = TrainResult(before=state["before"], after=after, steps=state["step"], wall_time=state["elapsed"],
                         tokens_per_s=state["tokens"] * world / max(state["elapsed"], 1e-9),
                         trainable=summary["trainable"], total=summary["total"], output_dir=str(out_dir),
                         adapter_path=str(out_dir / "adapter"),
                         best={"metric": t.metric, "value": state["best"], "step": state["best_step"]},
                         peak_memory_mb=peak_memory_mb())
    if main:
        atomic_write_bytes(out_dir / "summary.json", json.dumps(result.__dict__, indent=1).encode())
    return result


def peak_memory_mb() -> float:
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def format_summary(r: TrainResult, metric: str) -> str:
    keys = [k for k in (metric, "accuracy", "f1", "loss", "perplexity") if k in r.after]
    keys = list(dict.fromkeys(keys))
    lines = [f"{'':<22}{'before':>12}{'after':>12}"]
    lines += [f"{k:<22}{r.before[k]:>12.4f}{r.after[k]:>12.4f}" for k in keys]
    lines += [f"{'trainable parameters':<22}{r.trainable:>24,}",
              f"{'steps':<22}{r.steps:>24}",
              f"{'wall time':<22}{r.wall_time:>23.1f}s",
              f"{'tokens/s':<22}{r.tokens_per_s:>24,.0f}",
              f"{'peak memory':<22}{r.peak_memory_mb:>21,.0f} MB",
              f"adapter: {r.adapter_path}"]
    return "\n".join(lines)
