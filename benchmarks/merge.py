"""TIES over 3 and 8 checkpoints of a >= 500 MB model: wall time and peak RSS, grafting against mergekit.

Question: does grafting's streaming merge stay within (N + 2) x the largest tensor + 300 MB of memory, and is
it at least as fast as mergekit, on the same config? The model is a Llama-architecture causal LM built from a
config with random weights (12 layers x 768, vocabulary 32,000, untied head, fp32: 134 M parameters, 536 MB);
the N fine-tuned checkpoints are the base plus independent Gaussian perturbations (ties needs a base). Each
merge runs in a fresh child process (so peak RSS is the merge's own: VmHWM of that process, which counts
resident file-backed pages of memory-mapped inputs too), one after the other, mergekit and grafting
alternating; the same YAML is given to both (`mergekit.merge.run_merge` with its default options on CPU, and
`grafting.merge.merge`). The outputs are compared tensor by tensor (TIES is deterministic up to how equal
magnitudes at the trim cut are ordered: the entries that differ are counted and checked for that). Checkpoints are
written once to --workdir and reused. Prints a table and, last, one JSON object.

    python benchmarks/merge.py [--quick] [--workdir DIR] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, load_average, rounded, table  # noqa: E402

FULL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False)
QUICK = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=2000, tie_word_embeddings=False)
MB = 1024 * 1024
DENSITY = 0.5

CHILD = r"""
import json, sys, time
tool, config_path, out = sys.argv[1:4]
t0 = time.perf_counter()
if tool == "mergekit":
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    cfg = MergeConfiguration.model_validate(yaml.safe_load(open(config_path)))
    run_merge(cfg, out, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False,
                                             random_seed=0, quiet=True))
else:
    from grafting.merge import merge
    merge(config_path, out, seed=0, progress=False, copy_tokenizer=False)
seconds = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_mb": hwm / 1024}))
"""


def make_checkpoints(root: Path, n: int, model_cfg: dict) -> tuple[Path, list[Path], int]:
    """The base and n perturbed copies as safetensors directories; returns (base, models, largest tensor bytes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    base_dir = root / "base"
    cfg = LlamaConfig(**model_cfg)
    if not (base_dir / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(base_dir, max_shard_size="10GB")
    from safetensors.torch import load_file, save_file
    state = None
    models = []
    for i in range(n):
        d = root / f"ft{i}"
        models.append(d)
        if (d / "model.safetensors").exists():
            continue
        state = state or load_file(str(base_dir / "model.safetensors"))
        g = torch.Generator().manual_seed(100 + i)
        d.mkdir(parents=True, exist_ok=True)
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}
        save_file(ft, str(d / "model.safetensors"), metadata={"format": "pt"})
        del ft
        (d / "config.json").write_text((base_dir / "config.json").read_text())
    from safetensors import safe_open
    with safe_open(str(base_dir / "model.safetensors"), "pt") as fh:
        largest = max(fh.get_slice(k).get_shape()[0] * max(1, _prod(fh.get_slice(k).get_shape()[1:])) * 4
                      for k in fh.keys())
    return base_dir, models, largest


def _prod(xs):
    out = 1
    for v in xs:
        out *= v
    return out


def ties_yaml(base: Path, models: list[Path]) -> str:
    lines = ["merge_method: ties", f"base_model: {base}", "parameters:", "  normalize: true", "dtype: float32",
             "models:"]
    for i, m in enumerate(models):
        lines += [f"  - model: {m}", "    parameters:", f"      weight: {round(1.0 / len(models) + 0.1 * i, 3)}",
                  f"      density: {DENSITY}"]
    return "\n".join(lines) + "\n"


def run_child(tool: str, config: Path, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", CHILD, tool, str(config), str(out)], capture_output=True, text=True,
                       env=env)
    if p.returncode != 0:
        raise SystemExit(f"{tool} merge failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path, base: Path, models: list[Path], density: float) -> dict:
    """Max |a - b| over all tensors, how many entries differ (> 1e-6), and how many of those sit where some
    model's |τ| equals that model's TIES cut exactly while other entries share the magnitude: a tie at the cut,
    which a stable sort (grafting) and an unstable one (mergekit's argsort) may resolve differently."""
    import torch
    from safetensors import safe_open

    from grafting.merge.sparsify import top_k_threshold

    def opener(d: Path):
        return safe_open(str(d / "model.safetensors"), "pt")
    fa, fb, fbase = opener(a), opener(b), opener(base)
    fms = [opener(m) for m in models]
    assert set(fa.keys()) == set(fb.keys()), sorted(set(fa.keys()) ^ set(fb.keys()))[:3]
    worst, differ, at_ties = 0.0, 0, 0
    for k in fa.keys():
        d = (fa.get_tensor(k).float() - fb.get_tensor(k).float()).abs().reshape(-1)
        worst = max(worst, float(d.max()))
        where = (d > 1e-6).nonzero().squeeze(1)
        if not where.numel():
            continue
        differ += where.numel()
        tied = torch.zeros(where.numel(), dtype=torch.bool)
        theta = fbase.get_tensor(k).float().reshape(-1)
        for fm in fms:
            mag = (fm.get_tensor(k).float().reshape(-1) - theta).abs()
            bits, _ = top_k_threshold(mag, max(1, int(density * mag.numel())))
            cut = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
            if int((mag == cut).sum()) > 1:
                tied |= mag[where] == cut
        at_ties += int(tied.sum())
    return {"max_abs_diff": worst, "entries_differing": differ, "differing_at_tied_cuts": at_ties}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, N = 2 and 3: a smoke run")
    ap.add_argument("--workdir", help="where checkpoints are written and reused (default: a temporary dir)")
    ap.add_argument("--rounds", type=int, default=1, help="merges per tool and N (the fastest is reported)")
    a = ap.parse_args()
    model_cfg = QUICK if a.quick else FULL
    counts = (2, 3) if a.quick else (3, 8)
    started = time.perf_counter()
    header("TIES merge: grafting vs mergekit, wall time and peak RSS",
           f"llama {model_cfg['num_hidden_layers']}x{model_cfg['hidden_size']} vocab {model_cfg['vocab_size']} fp32, "
           f"N = {counts}, rounds {a.rounds}")
    tmp = None
    if a.workdir:
        root = Path(a.workdir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="grafting-merge-bench-")
        root = Path(tmp.name)
    base, models, largest = make_checkpoints(root, max(counts), model_cfg)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(f"# checkpoint size {size / MB:,.0f} MB, largest tensor {largest / MB:,.1f} MB", flush=True)
    rows, out = [], {"quick": a.quick, "checkpoint_mb": size / MB, "largest_tensor_mb": largest / MB, "runs": {}}
    goals = {}
    for n in counts:
        cfg = root / f"ties-{n}.yaml"
        cfg.write_text(ties_yaml(base, models[:n]))
        best: dict = {}
        for r in range(a.rounds):
            for tool in (("mergekit", "grafting") if r % 2 == 0 else ("grafting", "mergekit")):
                dest = root / f"out-{tool}-{n}"
                subprocess.run(["rm", "-rf", str(dest)], check=True)
                res = run_child(tool, cfg, dest)
                prev = best.get(tool)
                if prev is None or res["seconds"] < prev["seconds"]:
                    best[tool] = {**res, "peak_rss_mb": max(res["peak_rss_mb"], prev["peak_rss_mb"] if prev else 0)}
        cmp = compare(root / f"out-grafting-{n}", root / f"out-mergekit-{n}", base, models[:n], DENSITY)
        bound = (n + 2) * largest / MB + 300
        g, m = best["grafting"], best["mergekit"]
        goals[f"n{n}_rss_within_bound"] = g["peak_rss_mb"] <= bound
        goals[f"n{n}_time_le_mergekit"] = g["seconds"] <= m["seconds"]
        rows.append((f"N={n} wall time", f"{g['seconds']:.1f} s", f"{m['seconds']:.1f} s",
                     f"{g['seconds'] / m['seconds']:.2f}x of mergekit ({'met' if goals[f'n{n}_time_le_mergekit'] else 'MISSED'})"))
        rows.append((f"N={n} peak RSS", f"{g['peak_rss_mb']:,.0f} MB", f"{m['peak_rss_mb']:,.0f} MB",
                     f"bound (N+2) x largest + 300 = {bound:,.0f} MB "
                     f"({'met' if goals[f'n{n}_rss_within_bound'] else 'MISSED'})"))
        rows.append((f"N={n} max |grafting - mergekit|", f"{cmp['max_abs_diff']:.2e}", "",
                     f"{cmp['entries_differing']} entries differ, {cmp['differing_at_tied_cuts']} of them at a "
                     f"tied trim cut"))
        out["runs"][f"n{n}"] = {"grafting": g, "mergekit": m, "bound_mb": bound, **cmp}
    table("TIES (density 0.5, normalize) over N checkpoints: each merge in its own process", rows,
          columns=("measurement", "grafting", "mergekit", "goal / note"))
    out.update({"goals_met": goals, "seconds": round(time.perf_counter() - started, 1),
                "load_average": load_average()})
    print(json.dumps(rounded(out)))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
