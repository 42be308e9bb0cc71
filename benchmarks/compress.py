"""ComPEFT compression of a trained LoRA adapter: bytes on disk and task metric, before and after.

Question: on the packaged all-MiniLM-L6-v2 encoder (real weights) and the CrowdFlower tweets (3 classes), is a
LoRA r=8 adapter, trained as `graft train` trains it, >= 8x smaller after `graft compress` with <= 1 point of
accuracy and of macro-F1 lost once `graft decompress` has written it back? One adapter is trained, compressed
at each density and scale, decompressed, loaded into the base model the way grafting loads any adapter, and
scored with the trainer's own evaluation on the held-out tweets. Sizes are the files on disk: the adapter's
config + safetensors against the compressed manifest + payload. The scale "norm" is grafting's default; 1 is
the paper code's default α (see grafting/merge/compress.py). The trained classifier head is stored as is, so a
control row scores the adapter with its LoRA factors zeroed (head only): "gain kept" is the share of the
factors' own contribution, (after - head only) / (before - head only), that survives compression. Prints a
table and, last, one JSON line.

    OMP_NUM_THREADS=1 python benchmarks/compress.py [--quick] [--densities 0.05 0.1 0.2 0.3] [--scales norm 1]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import tempfile
import time
import shutil
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import header, load_average, rounded, table  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import grafting as gf  # noqa: E402
from grafting.io.reader import AdapterReader  # noqa: E402
from grafting.merge.compress import compress, decompress  # noqa: E402
from grafting.train import train  # noqa: E402
from grafting.train.recipe import load_recipe  # noqa: E402
from grafting.train.trainer import evaluate, load_data_and_model  # noqa: E402

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
GOAL_RATIO, GOAL_POINTS = 8.0, 1.0


def recipe(args, out: Path) -> dict:
    return {
        "model": {"path": "packaged:all-minilm-l6-v2", "task": "seq_cls"},
        "adapter": {"method": "lora", "r": args.r, "lora_alpha": 2 * args.r, "target_modules": TARGETS,
                    "task_type": "SEQ_CLS"},
        "data": {"source": "packaged:tweets", "max_length": 64, "max_train_samples": args.train_samples,
                 "max_eval_samples": args.eval_samples, "seed": 0},
        "optim": {"lr": args.lr, "head_lr": 3 * args.lr, "weight_decay": 0.01},
        "schedule": {"name": "cosine", "warmup_steps": max(1, args.steps // 10)},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "progress": False,
                  "metric": "accuracy"},
        "output_dir": str(out),
    }


def head_only(adapter: Path, out: Path) -> Path:
    """The adapter with every LoRA B set to 0 (ΔW = 0), its head and everything else unchanged."""
    tensors = {e.key: torch.zeros_like(e.tensor) if e.role == "lora_B" else e.tensor for e in AdapterReader(adapter)}
    out.mkdir()
    shutil.copy(adapter / "adapter_config.json", out / "adapter_config.json")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def scale_arg(text: str):
    return text if text == "norm" else float(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, small data, one density")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--scales", type=scale_arg, nargs="+", default=["norm", 1.0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train-samples", type=int, default=1600)
    ap.add_argument("--eval-samples", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.train_samples, args.eval_samples, args.batch_size = 3, 64, 32, 8
        args.densities = [0.1]
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    header("grafting: ComPEFT compression of a trained LoRA adapter (MiniLM + tweets)",
           f"r={args.r}, {args.steps} steps of {args.batch_size}, seed {args.seed}, densities {args.densities}, "
           f"scales {args.scales}")
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="grafting-compress-") as tmp:
        tmp = Path(tmp)
        spec = recipe(args, tmp / "run")
        t0 = time.perf_counter()
        trained = train(spec)
        train_s = time.perf_counter() - t0
        adapter = Path(trained.adapter_path)
        rec = load_recipe(spec)
        tokenizer, base, _, val_rows = load_data_and_model(rec)

        def score(adapter_dir: Path) -> dict:
            model = gf.load(copy.deepcopy(base), adapter_dir)
            return evaluate(model, val_rows, "seq_cls", tokenizer.pad_token_id, rec.train.eval_batch_size,
                            contextlib.nullcontext)

        before = score(adapter)
        head = score(head_only(adapter, tmp / "head-only"))
        print(f"# trained in {train_s:.0f} s; reloaded adapter: accuracy {before['accuracy']:.4f} "
              f"(trainer {trained.after['accuracy']:.4f}), macro-F1 {before['f1']:.4f}; head only: accuracy "
              f"{head['accuracy']:.4f}, macro-F1 {head['f1']:.4f}", flush=True)

        def kept(after: dict, metric: str) -> float | None:
            gain = before[metric] - head[metric]
            return (after[metric] - head[metric]) / gain if gain > 0 else None
        for density in args.densities:
            for scale in args.scales:
                name = f"d{density}-s{scale}"
                t0 = time.perf_counter()
                res = compress(adapter, tmp / f"{name}.compeft", density=density, scale=scale)
                seconds = time.perf_counter() - t0
                after = score(decompress(res.path, tmp / f"{name}.adapter"))
                d_acc = 100 * (before["accuracy"] - after["accuracy"])
                d_f1 = 100 * (before["f1"] - after["f1"])
                met = res.ratio >= GOAL_RATIO and d_acc <= GOAL_POINTS and d_f1 <= GOAL_POINTS
                results.append({"density": density, "scale": scale, "original_bytes": res.original_bytes,
                                "compressed_bytes": res.compressed_bytes, "ratio": res.ratio,
                                "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
                                "f1_before": before["f1"], "f1_after": after["f1"], "points_lost_accuracy": d_acc,
                                "points_lost_f1": d_f1, "gain_kept_accuracy": kept(after, "accuracy"),
                                "gain_kept_f1": kept(after, "f1"), "compress_seconds": seconds, "goal_met": met})
                rows.append((f"{density:g}", scale, f"{res.original_bytes:,}", f"{res.compressed_bytes:,}",
                             f"{res.ratio:.1f}x", f"{before['accuracy']:.4f} -> {after['accuracy']:.4f}",
                             f"{100 * (after['accuracy'] - before['accuracy']):+.2f}",
                             f"{before['f1']:.4f} -> {after['f1']:.4f}", f"{100 * (after['f1'] - before['f1']):+.2f}",
                             "/".join("-" if kept(after, k) is None else f"{100 * kept(after, k):.0f}%"
                                      for k in ("accuracy", "f1")),
                             "met" if met else "not met"))
                print(f"# {name}: {res.ratio:.1f}x, accuracy {after['accuracy']:.4f}, macro-F1 {after['f1']:.4f}",
                      flush=True)
    rows.append(("head only", "-", "-", "-", "-", f"{before['accuracy']:.4f} -> {head['accuracy']:.4f}",
                 f"{100 * (head['accuracy'] - before['accuracy']):+.2f}", f"{before['f1']:.4f} -> {head['f1']:.4f}",
                 f"{100 * (head['f1'] - before['f1']):+.2f}", "0%/0%", "control: LoRA B = 0"))
    table(f"LoRA r={args.r} on MiniLM, {len(val_rows)} held-out tweets: bytes and metric, original -> "
          "decompressed (points = 100 x difference)",
          rows, columns=("density", "scale", "bytes original", "bytes compressed", "ratio", "accuracy",
                         "Δ points", "macro-F1", "Δ points", "gain kept acc/F1",
                         f"goal >= {GOAL_RATIO:g}x, <= {GOAL_POINTS:g} pt"))
    passing = [r for r in results if r["goal_met"]]
    default = next((r for r in results if r["density"] == 0.1 and r["scale"] == "norm"), results[0])
    out = {"quick": args.quick, "steps": args.steps, "seed": args.seed, "eval_rows": len(val_rows),
           "original": before, "head_only": head,
           "goal": f">= {GOAL_RATIO:g}x smaller, <= {GOAL_POINTS:g} point of accuracy and of macro-F1 lost",
           "default_setting": default, "goal_met_by_default": default["goal_met"],
           "best_ratio_meeting_goal": max(passing, key=lambda r: r["ratio"]) if passing else None,
           "settings_meeting_goal": [f"d{r['density']:g}/{r['scale']}" for r in passing],
           "seconds": round(time.perf_counter() - started, 1), "load_average_at_end": load_average()}
    print(json.dumps(rounded(out)))


if __name__ == "__main__":
    main()
