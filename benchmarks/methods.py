"""Every registered adapter method on one real task at matched trainable-parameter budgets.

Question: which method should a user pick? Each registered method (and each LoRA initialisation) fine-tunes the
packaged all-MiniLM-L6-v2 encoder (real weights) on a packaged real task (CrowdFlower tweets, 3 classes, or
WordNet noun supersenses, 26 classes) with the same targets, steps, batch, learning rate and data. Budgets are
matched: each method's size knob (``r``, or the knob named in ``KNOBS``) is set to the value whose trainable
adapter parameters come closest to LoRA's at ``--budget-r`` (the classifier head, trained in full by every
method, is not counted); methods whose size does not reach the budget (VeRA's count is fixed by the layer
widths) run at their own default setting and the table says so. Reported per method: trainable adapter
parameters, time per training step, peak resident memory of the run's own process, and validation accuracy /
macro-F1 as mean ± sample std over seeds. Each run is its own process, so peak memory is that run's alone;
``--jobs 2 --threads 1`` runs two at a time on one thread each (step times are then single-thread times).

    python benchmarks/methods.py                        # the documented run (docs/methods.md)
    python benchmarks/methods.py --quick                # smoke run: 2 methods, 1 seed, 3 steps
    python benchmarks/methods.py --methods lora vera --seeds 0 --plot methods.png

Prints a markdown table, writes a PNG scatter of accuracy against trainable parameters (``--plot``) and, last,
one JSON line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import header, load_average, rounded  # noqa: E402

TASKS = {
    "tweets": {"source": "packaged:tweets", "max_length": 64},
    "wordnet": {"source": "packaged:wordnet-nouns", "max_length": 48},
}
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
#: the size knob of methods whose budget is not set by ``r`` (default: ``r`` when the config has it)
# (NOLA's count is set by num_basis_*; at this budget its frozen bases would need ~8 GB on MiniLM: its default)
KNOBS: dict[str, str | None] = {"adalora": "init_r", "salt": "r_lora", "nola": None, "mos": "valid_param_lora_r"}
#: fields a method needs from the protocol or from its knob (schedules that must know the step count)
EXTRA = {
    # AdaLoRA starts at init_r and cuts to target_r (the paper's 1.5x ratio); the budget counts the start
    # MoS: the pools hold a rank-e LoRA's parameters; each layer works at rank 2e from them (the paper's ratios)
    "mos": lambda steps, f: {"r": 2 * f.get("valid_param_lora_r", 2)},
    "adalora": lambda steps, f: {"target_r": max(1, (2 * f.get("init_r", 12)) // 3), "total_step": steps,
                                 "tinit": max(1, steps // 10), "tfinal": max(1, steps // 5),
                                 "deltaT": max(1, steps // 20)},
}


def with_extra(fields: dict, steps: int = 100) -> dict:
    return {**fields, **EXTRA[fields["method"]](steps, fields)} if fields["method"] in EXTRA else fields
#: methods trained through a bi-level recipe (their architecture parameters train on held-out rows)
BILEVEL = ("autolora", "bilora", "bidora")
#: LoRA initialisations compared as rows of their own (those the installed grafting accepts)
LORA_INITS = ("pissa", "pissa_niter_4", "olora", "milora", "eva", "corda")
SKIP = ("toy-shared",)  # test plug-ins


def variants() -> dict[str, dict]:
    """Row label -> adapter section fields: every registered method, then LoRA's initialisations."""
    import grafting as gf
    from grafting.errors import GraftingError
    rows = {m: {"method": m} for m in gf.method_names() if m not in SKIP and not m.startswith("test")}
    for init in LORA_INITS:
        try:
            gf.LoraConfig(init_lora_weights=init, target_modules=TARGETS).validate()
        except (GraftingError, AttributeError, TypeError):
            continue
        rows[f"lora+{init}"] = {"method": "lora", "init_lora_weights": init}
    return rows


def knob_of(fields: dict) -> str | None:
    import dataclasses

    import grafting as gf
    method = fields["method"]
    if method in KNOBS:
        return KNOBS[method]
    names = {f.name for f in dataclasses.fields(gf.get_method(method).config_class)}
    return "r" if "r" in names else None


def count_adapter_parameters(base, fields: dict) -> int:
    """Trainable adapter parameters (shared tensors included, no task head) of ``fields`` on ``base``."""
    import grafting as gf
    from grafting.config import config_from_fields
    cfg = config_from_fields({**fields, "target_modules": TARGETS}, where="benchmark")
    method = gf.get_method(cfg.method)
    if method.needs_calibration(cfg) or method.changes_base(cfg):
        # the count does not depend on how factors start (EVA redistributes ranks within the same budget)
        cfg = config_from_fields({**fields, "init_lora_weights": True, "target_modules": TARGETS}, where="benchmark")
    model = gf.adapt(copy.deepcopy(base), cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


CANDIDATES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512,
              768, 1024)


def match_budget(base, fields: dict, target: int) -> tuple[dict, int, str]:
    """(fields with the knob set, their count, note): the knob value whose count is nearest ``target`` (in
    ratio); candidates a method refuses (shape constraints) are skipped."""
    from grafting.errors import GraftingError
    knob = knob_of(fields)
    if knob is None:
        return fields, count_adapter_parameters(base, with_extra(fields)), "its default (no budget knob)"
    best, previous, flat = None, None, 0
    for value in CANDIDATES:
        trial = {**fields, knob: value}
        try:
            n = count_adapter_parameters(base, with_extra(trial))
        except (GraftingError, ValueError, RuntimeError):
            continue
        gap = abs(math.log(n / target)) if n > 0 else math.inf
        if best is None or gap < best[0]:
            best = (gap, trial, n)
        if n > 2 * target and previous is not None and n > previous:
            break  # growing past the budget (RandLoRA shrinks as r grows: its search runs on)
        flat = flat + 1 if n == previous else 0
        if flat == 3:
            break  # the knob no longer changes the count
        previous = n
    if best is None:
        raise SystemExit(f"{fields['method']}: no {knob} in {CANDIDATES} builds an adapter on MiniLM")
    gap, trial, n = best
    if gap < math.log(1.5):
        return trial, n, f"{knob}={trial[knob]}"
    # out of reach (VeRA's count is set by the layer widths): the method's own default, not an extreme setting
    import dataclasses

    import grafting as gf
    default = {f.name: f.default for f in dataclasses.fields(gf.get_method(fields["method"]).config_class)}[knob]
    trial = {**fields, knob: default}
    note = f"{knob}={default} (its default; budget not reachable)"
    return trial, count_adapter_parameters(base, with_extra(trial)), note


def recipe(task: str, fields: dict, seed: int, out: Path, a) -> dict:
    r = {
        "model": {"path": "packaged:all-minilm-l6-v2", "task": "seq_cls"},
        "adapter": {**with_extra(fields, a.steps), "target_modules": TARGETS,
                    "task_type": "SEQ_CLS"},
        "data": {**TASKS[task], "max_train_samples": a.train_samples, "max_eval_samples": a.eval_samples, "seed": 0},
        "optim": {"lr": a.lr, "head_lr": 3 * a.lr},
        "schedule": {"name": "cosine", "warmup_steps": max(1, a.steps // 10)},
        "train": {"max_steps": a.steps, "batch_size": a.batch_size, "seed": seed, "progress": False,
                  "metric": "accuracy", "calibration_batches": 4},
        "output_dir": str(out),
    }
    if "lora_alpha" in fields or fields["method"] in ("lora", "dora", "autolora", "bilora", "bidora"):
        r["adapter"].setdefault("lora_alpha", 2 * fields.get("r", a.budget_r))
    if fields["method"] in BILEVEL:
        r["bilevel"] = {"hypergradient": "darts", "outer_lr": 0.05, "outer_fraction": 0.2,
                        "retrain_steps": a.steps}
    return r


def run_one(spec: str) -> None:
    """Child process: train one recipe and print one JSON line with its figures."""
    from grafting.train import train
    r = json.loads(spec)
    warnings.filterwarnings("ignore")
    res = train(r)
    log = [json.loads(line) for line in (Path(r["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    timed = [e for e in log if e["kind"] == "train" and "tokens_per_s" in e]
    if timed:  # the plain trainer logs throughput right after the last step: no evaluation in it
        train_seconds, whole = res.tokens_per_s * res.wall_time / timed[-1]["tokens_per_s"], False
    else:  # bi-level runs: wall time over inner steps, outer steps (and AutoLoRA's retraining) included
        train_seconds, whole = res.wall_time, True
    print(json.dumps({"accuracy": res.after["accuracy"], "f1": res.after["f1"], "loss": res.after["loss"],
                      "step_s": train_seconds / res.steps, "step_includes_outer": whole,
                      "peak_mb": res.peak_memory_mb, "trainable": res.trainable}))


def launch(r: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, "--run", json.dumps(r)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(summary: dict, path: Path, title: str) -> None:
    """Left: accuracy against trainable parameters (log x). Right: every row's accuracy, sorted, with the rows
    at the matched budget (most of them) readable apart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 6.5), gridspec_kw={"width_ratios": [1, 1.1]})
    for label, s in summary.items():
        ax.errorbar(s["adapter_parameters"], s["accuracy_mean"], yerr=s["accuracy_std"], fmt="o", capsize=3)
        ax.annotate(label, (s["adapter_parameters"], s["accuracy_mean"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (log scale; the classifier head is not counted)")
    ax.set_ylabel("validation accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    order = sorted(summary, key=lambda k: summary[k]["accuracy_mean"])
    budget = max(s["adapter_parameters"] for s in summary.values())
    colors = ["tab:blue" if summary[k]["adapter_parameters"] > budget / 2 else "tab:orange" for k in order]
    bars.barh(range(len(order)), [summary[k]["accuracy_mean"] for k in order],
              xerr=[summary[k]["accuracy_std"] for k in order], color=colors, capsize=2)
    bars.set_yticks(range(len(order)), [f"{k} ({summary[k]['adapter_parameters']:,})" for k in order], fontsize=7)
    lo = min(summary[k]["accuracy_mean"] - summary[k]["accuracy_std"] for k in order)
    bars.set_xlim(max(0.0, lo - 0.03), None)
    bars.set_xlabel("validation accuracy; blue: at the matched budget, orange: smaller by design")
    bars.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(labels: list, matched: dict, results: dict) -> dict:
    """Row label -> its figures over seeds (mean ± sample std; median step time; the largest peak RSS)."""
    summary = {}
    for label in labels:
        ok = [r for r in results[label] if "error" not in r]
        row = {"size": matched[label][2], "adapter_parameters": matched[label][1], "runs": len(ok),
               "failed": len(results[label]) - len(ok)}
        if not ok:
            summary[label] = {**row, "error": results[label][0]["error"]}
            continue
        acc, f1 = [r["accuracy"] for r in ok], [r["f1"] for r in ok]
        summary[label] = {**row, "accuracy_mean": statistics.mean(acc),
                          "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                          "f1_mean": statistics.mean(f1), "f1_std": statistics.stdev(f1) if len(f1) > 1 else 0.0,
                          "step_ms": statistics.median(r["step_s"] for r in ok) * 1e3,
                          "step_includes_outer": any(r.get("step_includes_outer") for r in ok),
                          "peak_mb": max(r["peak_mb"] for r in ok)}
    return summary


def print_table(summary: dict) -> None:
    print("\n| method | size | adapter parameters | step time | peak RSS | accuracy | macro-F1 |")
    print("|---|---|---|---|---|---|---|")
    for label, s in summary.items():
        head = f"| {label} | {s['size']} | {s['adapter_parameters']:,} |"
        if "error" in s:
            print(f"{head} failed: {s['error']} | | | |")
            continue
        pm = (lambda m, sd: f"{m:.3f} ± {sd:.3f}") if s["runs"] > 1 else (lambda m, sd: f"{m:.3f}")
        outer = " (bi-level: outer steps included)" if s.get("step_includes_outer") else ""
        print(f"{head} {s['step_ms']:.0f} ms{outer} | {s['peak_mb']:.0f} MB "
              f"| {pm(s['accuracy_mean'], s['accuracy_std'])} | {pm(s['f1_mean'], s['f1_std'])} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run: lora and vera, one seed, 3 steps")
    ap.add_argument("--methods", nargs="+", help="row labels (default: every method and LoRA init)")
    ap.add_argument("--skip", nargs="+", default=[], help="row labels to leave out")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--task", default="tweets", choices=sorted(TASKS))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--train-samples", type=int, default=1280)
    ap.add_argument("--eval-samples", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--budget-r", type=int, default=8, help="the budget: LoRA's adapter parameters at this rank")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    ap.add_argument("--plot", type=Path, default=None, help="write the accuracy-vs-parameters scatter here")
    ap.add_argument("--json", type=Path, default=None, help="write every run's figures here")
    ap.add_argument("--match-only", action="store_true", help="print each row's matched size and stop")
    ap.add_argument("--combine", type=Path, nargs="+", help="no runs: table (and --plot) from earlier --json files; "
                    "a row in a later file replaces the same row in an earlier one (re-running some rows)")
    a = ap.parse_args()
    if a.run:
        return run_one(a.run)
    if a.combine:
        saved = [json.loads(p.read_text()) for p in a.combine]
        summary = {}
        for d in saved:
            summary.update(d["summary"])
        print_table(summary)
        if a.plot:
            plot({k: v for k, v in summary.items() if "error" not in v}, a.plot,
                 f"MiniLM on {saved[0]['task']}: {saved[0]['steps']} steps, {len(saved[0]['seeds'])} seed(s), "
                 f"budget {saved[0]['budget']:,}")
        print(json.dumps(rounded({"combined": [str(p) for p in a.combine], "summary": summary})))
        return None
    if a.quick:
        a.methods = a.methods or ["lora", "vera"]
        a.seeds, a.steps, a.train_samples, a.eval_samples, a.batch_size = [0], 3, 64, 32, 8
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()

    from grafting.train.models import load_model
    _, base = load_model("packaged:all-minilm-l6-v2", "embed")  # the encoder alone: counts exclude the head
    rows = variants()
    labels = [m for m in (a.methods or rows) if m not in a.skip]
    unknown = [m for m in labels if m not in rows]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(rows)}")
    target = count_adapter_parameters(base, {"method": "lora", "r": a.budget_r})
    header("grafting: every adapter method at a matched parameter budget",
           f"task {a.task}, {len(labels)} rows, seeds {a.seeds}, {a.steps} steps of {a.batch_size}, budget "
           f"{target:,} (LoRA r={a.budget_r}), {a.jobs} job(s) x {threads} thread(s)")
    matched = {}
    for label in labels:
        matched[label] = match_budget(base, rows[label], target)
        print(f"# {label}: {matched[label][2]}, {matched[label][1]:,} adapter parameters", flush=True)
    del base
    if a.match_only:
        return None

    results: dict = {label: [] for label in labels}
    with tempfile.TemporaryDirectory(prefix="grafting-methods-") as tmp, \
            concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        futures = {}
        for label in labels:
            for seed in a.seeds:
                r = recipe(a.task, matched[label][0], seed, Path(tmp) / f"{label}-{seed}", a)
                futures[pool.submit(launch, r, threads)] = (label, seed)
        for fut in concurrent.futures.as_completed(futures):
            label, seed = futures[fut]
            res = fut.result()
            results[label].append(res)
            shown = res.get("error") or f"accuracy {res['accuracy']:.3f}, {res['step_s'] * 1e3:.0f} ms/step"
            print(f"# {label} seed {seed}: {shown}", flush=True)

    summary = summarize(labels, matched, results)
    print_table(summary)
    if a.plot and summary:
        plot({k: v for k, v in summary.items() if "error" not in v}, a.plot,
             f"MiniLM on {a.task}: {a.steps} steps of {a.batch_size}, {len(a.seeds)} seed(s)")
        print(f"# scatter written to {a.plot}")
    out = {"quick": a.quick, "task": a.task, "seeds": a.seeds, "steps": a.steps, "budget": target,
           "jobs": a.jobs, "threads": threads, "summary": summary,
           "seconds": round(time.perf_counter() - started, 1), "load_average_at_end": load_average()}
    if a.json:
        a.json.write_text(json.dumps(rounded({**out, "runs": results}), indent=1))
    print(json.dumps(rounded(out)))


if __name__ == "__main__":
    main()
