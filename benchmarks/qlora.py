"""QLoRA end to end on this CPU: fine-tuning the packaged SmolLM2-135M-Instruct on an NF4 base vs an fp32 base,
and LoftQ's initialisation vs QLoRA's on the same task over several seeds.

Questions (issue: quantized base):
1. With the base in NF4 (double quantization, loaded from a 4-bit checkpoint so the fp32 weights are never in
   memory), what are the held-out loss and the peak memory of the same LoRA run as on the fp32 base?
2. Does starting from LoftQ's init (the adapter absorbs the quantization error) end at a lower held-out loss
   than QLoRA's zero init, over --seeds seeds (mean ± std)?

Each run is ``graft train`` in its own process (peak memory = that process's ru_maxrss), on the packaged
ChatterBot corpus, the recipe of examples/smollm2_chat.yaml shortened to --steps steps. The LoftQ runs quantize
after loading (their peak includes the fp32 load; the table says so).

    python benchmarks/qlora.py [--steps N] [--seeds K] [--quick]

Takes about (2 + 2K) x the time of one run (~1-3 min per run at 40 steps on 2 cores). The last line printed is
one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, rounded, table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(model_path: str, out: str, steps: int, seed: int, quantize: dict | None, quick: bool) -> dict:
    base = yaml.safe_load(open(os.path.join(ROOT, "examples", "smollm2_chat.yaml")))
    base["model"]["path"] = model_path
    base["output_dir"] = out
    base["train"].update(max_steps=steps, seed=seed, eval_every=None, progress=False)
    base["data"].update(seed=seed)
    if quick:
        base["data"].update(max_train_samples=32, max_eval_samples=16)
    if quantize is not None:
        base["quantize"] = quantize
    return base


def run(name: str, r: dict, tmp: str) -> dict:
    path = os.path.join(tmp, name + ".yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(r, fh)
    subprocess.run([sys.executable, "-m", "grafting.cli.main", "train", path, "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(r["output_dir"], "summary.json")) as fh:
        s = json.load(fh)
    return {"loss_before": s["before"]["loss"], "loss_after": s["after"]["loss"], "peak_mb": s["peak_memory_mb"],
            "seconds": s["wall_time"], "tokens_per_s": s["tokens_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--inits-only", action="store_true", help="skip the fp32 / NF4-checkpoint comparison")
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 seed, tiny data: checks the script runs")
    args = ap.parse_args()
    steps, seeds = (3, 1) if args.quick else (args.steps, args.seeds)
    header("benchmarks/qlora.py: QLoRA on SmolLM2-135M, NF4 vs fp32 base; LoftQ vs QLoRA init",
           f"steps {steps}  seeds {seeds}")
    tmp = tempfile.mkdtemp(prefix="graft-qlora-bench-")
    results = {}
    if not args.inits_only:
        nf4_dir = os.path.join(tmp, "smollm2-nf4")
        subprocess.run([sys.executable, "-m", "grafting.cli.main", "quantize", "packaged:smollm2-135m-instruct",
                        nf4_dir], check=True, stdout=subprocess.DEVNULL)
        results["fp32 base"] = run("fp32", recipe("packaged:smollm2-135m-instruct", os.path.join(tmp, "fp32"), steps,
                                                  0, None, args.quick), tmp)
        results["NF4 base (4-bit checkpoint)"] = run("nf4", recipe(nf4_dir, os.path.join(tmp, "nf4"), steps, 0, None,
                                                                   args.quick), tmp)
    inits = {"qlora": [], "loftq": []}
    for seed in range(args.first_seed, args.first_seed + seeds):
        for init in inits:
            out = os.path.join(tmp, f"{init}-{seed}")
            inits[init].append(run(f"{init}-{seed}", recipe("packaged:smollm2-135m-instruct", out, steps, seed,
                                                             {"init": init}, args.quick), tmp))
    headline = {"steps": steps, "seeds": list(range(args.first_seed, args.first_seed + seeds))}
    if results:
        rows = [[name, f"{v['loss_before']:.4f}", f"{v['loss_after']:.4f}", f"{v['peak_mb']:,.0f} MB",
                 f"{v['seconds']:.0f} s"] for name, v in results.items()]
        table(f"same LoRA run ({steps} steps), held-out loss and peak memory", rows,
              columns=("base", "loss before", "loss after", "peak RSS", "wall"))
        headline.update({"fp32_loss_after": results["fp32 base"]["loss_after"],
                         "nf4_loss_after": results["NF4 base (4-bit checkpoint)"]["loss_after"],
                         "nf4_vs_fp32_peak_memory": results["NF4 base (4-bit checkpoint)"]["peak_mb"]
                         / results["fp32 base"]["peak_mb"]})

    def stat(xs):
        return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)

    summary = {}
    rows = []
    for init, runs in inits.items():
        before, after = stat([r["loss_before"] for r in runs]), stat([r["loss_after"] for r in runs])
        summary[init] = {"loss_before": before, "loss_after": after, "per_seed": [r["loss_after"] for r in runs]}
        rows.append([init, f"{before[0]:.4f} ± {before[1]:.4f}", f"{after[0]:.4f} ± {after[1]:.4f}",
                     " ".join(f"{r['loss_after']:.4f}" for r in runs)])
    table(f"init on the NF4 base, {seeds} seeds (quantized after loading)", rows,
          columns=("init", "loss at start", "loss after", "per seed"))
    wins = sum(a < b for a, b in zip(summary["loftq"]["per_seed"], summary["qlora"]["per_seed"]))
    headline.update({"qlora_init_loss_after_mean": summary["qlora"]["loss_after"][0],
                     "loftq_init_loss_after_mean": summary["loftq"]["loss_after"][0],
                     "qlora_per_seed": summary["qlora"]["per_seed"], "loftq_per_seed": summary["loftq"]["per_seed"],
                     "loftq_wins_of_seeds": f"{wins}/{seeds}"})
    print(json.dumps(rounded(headline)))


if __name__ == "__main__":
    main()
