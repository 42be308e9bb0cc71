"""Adapters trained on different packaged tasks, merged by each method: every task's score per method.

Question: on the packaged all-MiniLM-L6-v2 encoder, with one LoRA adapter (r=8 on all six linear types, its own
classification head trained in full) per task, CrowdFlower tweets (3 classes) and WordNet noun supersenses (26
classes), how much of each task does one merged adapter keep, by merge method? The encoder's LoRA parts are
merged (grafting.merge.merge_adapters, exact for linear / task_arithmetic, weight space + truncated SVD at the
summed rank 16 otherwise) and each task is scored with the merged encoder and its own head, as multi-task merging
papers do (heads are task-specific). Rows: each adapter alone on its task (the ceiling), the head alone (the
floor: base encoder + the task's head), and every merge. Writes merge_tasks.png (bars per task and method) and
merge_tasks.json into --out, prints a table and, last, one JSON line.

    python benchmarks/merge_tasks.py [--quick] [--out runs/merge-tasks] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import header, load_average, rounded, table  # noqa: E402

import grafting as gf  # noqa: E402
from grafting.io.reader import CONFIG_NAME, WEIGHTS_NAME, AdapterReader  # noqa: E402
from grafting.merge import merge_adapters  # noqa: E402
from grafting.train import train  # noqa: E402

TASKS = {"tweets": {"source": "packaged:tweets", "max_length": 64},
         "wordnet": {"source": "packaged:wordnet-nouns", "max_length": 48}}
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# method -> (per-model params, global params); mergekit's usual settings for two models
METHODS = {
    "linear": ({"weight": 1.0}, {}),
    "task_arithmetic": ({"weight": 1.0}, {"lambda": 0.7}),
    "ties": ({"weight": 1.0, "density": 0.5}, {}),
    "dare_linear": ({"weight": 1.0, "density": 0.5}, {}),
    "dare_ties": ({"weight": 1.0, "density": 0.5}, {}),
    "breadcrumbs_ties": ({"weight": 1.0, "density": 0.5, "gamma": 0.01}, {}),
    "della": ({"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {}),
    "model_stock": ({}, {}),
    "lines": ({"weight": 1.0}, {"beta": 0.5}),
    "pcb": ({"weight": 1.0}, {"pcb_ratio": 0.5}),
}


def recipe(task: str, out: Path, a) -> dict:
    return {"model": {"path": "packaged:all-minilm-l6-v2", "task": "seq_cls"},
            "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": TARGETS, "task_type": "SEQ_CLS"},
            "data": {**TASKS[task], "max_train_samples": a.train_samples, "max_eval_samples": a.eval_samples,
                     "seed": 0},
            "optim": {"lr": 1e-3, "head_lr": 3e-3, "weight_decay": 0.01},
            "schedule": {"name": "cosine", "warmup_steps": max(1, a.steps // 10)},
            "train": {"max_steps": a.steps, "batch_size": a.batch_size, "seed": 0, "progress": False,
                      "metric": "accuracy"},
            "output_dir": str(out)}


def split_adapter(src: Path, lora_dir: Path) -> dict:
    """Write the LoRA part of ``src`` to ``lora_dir``; return the head tensors (modules_to_save) by key."""
    from safetensors.torch import save_file
    reader = AdapterReader(src)
    head = {e.key: e.tensor for e in reader if e.role == "full"}
    lora = {e.key: e.tensor for e in reader if e.role != "full"}
    lora_dir.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(lora_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = json.loads((src / CONFIG_NAME).read_text())
    cfg["modules_to_save"] = None
    (lora_dir / CONFIG_NAME).write_text(json.dumps(cfg, indent=1))
    return head


def with_head(lora_dir: Path, head: dict, head_cfg: dict, out: Path) -> Path:
    """``lora_dir``'s tensors plus a task's head: an adapter the trainer's loader scores on that task."""
    from safetensors.torch import load_file, save_file
    out.mkdir(parents=True, exist_ok=True)
    save_file({**load_file(str(lora_dir / WEIGHTS_NAME)), **head}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = json.loads((lora_dir / CONFIG_NAME).read_text())
    cfg.update(modules_to_save=head_cfg["modules_to_save"], task_type="SEQ_CLS")
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=1))
    return out


def scorer(task: str, out: Path, a):
    """A function adapter_dir -> metrics on ``task``'s held-out rows (the data and base loaded once)."""
    from grafting.train.recipe import load_recipe
    from grafting.train.trainer import _autocast, evaluate, load_data_and_model
    r = load_recipe(recipe(task, out, a))
    tokenizer, base, _, val_rows = load_data_and_model(r)

    def score(adapter_dir: Path) -> dict:
        import copy
        model = gf.load(copy.deepcopy(base), adapter_dir)
        return evaluate(model, val_rows, "seq_cls", tokenizer.pad_token_id, 64, _autocast(False))
    return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps and rows")
    ap.add_argument("--out", default="runs/merge-tasks")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train-samples", type=int, default=1600)
    ap.add_argument("--eval-samples", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    if a.quick:
        a.steps, a.train_samples, a.eval_samples, a.batch_size = 3, 64, 32, 8
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    header("merging adapters trained on different tasks: each task's score per merge method",
           f"tasks {list(TASKS)}, {a.steps} steps of {a.batch_size}, LoRA r=8, methods {list(METHODS)}")
    root = Path(a.out)
    if root.exists():
        shutil.rmtree(root)
    heads, cfgs, lora_dirs, scores = {}, {}, [], {}
    for task in TASKS:
        res = train(recipe(task, root / task, a))
        src = Path(res.adapter_path)
        heads[task] = split_adapter(src, root / f"{task}-lora")
        cfgs[task] = json.loads((src / CONFIG_NAME).read_text())
        lora_dirs.append(root / f"{task}-lora")
        print(f"# trained {task}: accuracy {res.after['accuracy']:.3f} ({res.wall_time:.0f} s)", flush=True)
    score = {task: scorer(task, root / f"{task}-eval", a) for task in TASKS}
    empty = root / "no-lora"  # the floor: the task's head on the untouched encoder (a rank-1 zero LoRA)
    first = AdapterReader(lora_dirs[0])
    from safetensors.torch import save_file
    import torch
    module = first.modules()[0]
    t = first.layer_tensors(module)
    empty.mkdir()
    save_file({f"base_model.model.{module}.lora_A.weight": torch.zeros(1, t["lora_A"].shape[1]),
               f"base_model.model.{module}.lora_B.weight": torch.zeros(t["lora_B"].shape[0], 1)},
              str(empty / WEIGHTS_NAME), metadata={"format": "pt"})
    (empty / CONFIG_NAME).write_text(json.dumps({**json.loads((lora_dirs[0] / CONFIG_NAME).read_text()), "r": 1,
                                                 "lora_alpha": 1, "target_modules": [module], "rank_pattern": {},
                                                 "alpha_pattern": {}}))
    rows_by = {"alone (its own adapter)": {}, "head only": {}}
    for task in TASKS:
        rows_by["alone (its own adapter)"][task] = score[task](with_head(root / f"{task}-lora", heads[task],
                                                                         cfgs[task], root / f"{task}-alone"))
        rows_by["head only"][task] = score[task](with_head(empty, heads[task], cfgs[task], root / f"{task}-floor"))
    energy = {}
    for method, (mp, gp) in METHODS.items():
        t0 = time.perf_counter()
        merged = root / f"merged-{method}"
        res = merge_adapters(lora_dirs, method, merged, params=[dict(mp) for _ in lora_dirs], global_params=gp,
                             rank=None)
        energy[method] = (min(res.energy.values()) if res.energy else 1.0, res.exact)
        rows_by[method] = {task: score[task](with_head(merged, heads[task], cfgs[task], root / f"{method}-{task}"))
                           for task in TASKS}
        print(f"# {method}: " + ", ".join(f"{t} {rows_by[method][t]['accuracy']:.3f}" for t in TASKS)
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for name, by_task in rows_by.items():
        accs = [by_task[t]["accuracy"] for t in TASKS]
        note = ""
        if name in energy:
            low, exact = energy[name]
            note = "exact" if exact else f"SVD to rank 16, lowest energy kept {low:.3f}"
        rows.append((name, *(f"{by_task[t]['accuracy']:.3f} / {by_task[t]['f1']:.3f}" for t in TASKS),
                     f"{sum(accs) / len(accs):.3f}", note))
    table("held-out accuracy / macro-F1 per task (each with its own head)", rows,
          columns=("adapter", *TASKS, "mean accuracy", "note"))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = list(rows_by)
        fig, ax = plt.subplots(figsize=(10, 4))
        width = 0.8 / len(TASKS)
        for k, task in enumerate(TASKS):
            ax.bar([i + k * width for i in range(len(names))], [rows_by[n][task]["accuracy"] for n in names],
                   width, label=task)
        ax.set_xticks([i + width * (len(TASKS) - 1) / 2 for i in range(len(names))], names, rotation=35,
                      ha="right")
        ax.set_ylabel("held-out accuracy")
        ax.set_title("MiniLM: tweets + WordNet supersense LoRA adapters merged by method")
        ax.legend()
        fig.tight_layout()
        fig.savefig(root / "merge_tasks.png", dpi=120)
    except ImportError:
        print("# matplotlib missing: no PNG")
    out = {"quick": a.quick, "steps": a.steps, "scores": {n: {t: {"accuracy": v[t]["accuracy"], "f1": v[t]["f1"]}
                                                              for t in TASKS} for n, v in rows_by.items()},
           "seconds": round(time.perf_counter() - started, 1), "load_average": load_average()}
    (root / "merge_tasks.json").write_text(json.dumps(rounded(out), indent=1))
    print(json.dumps(rounded(out)))


if __name__ == "__main__":
    main()
