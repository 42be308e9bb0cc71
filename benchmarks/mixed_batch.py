"""Many adapters in one batch, DoRA, and adapter loading: grafting against peft, timed in one process.

Question: on a GPT-2-shaped model (6 layers, width 768, random weights, fp32, CPU), what does grafting charge over
the bare base model for one LoRA adapter, and for a batch whose rows each use a different adapter (decode and
prefill shapes)? What does DoRA cost over LoRA for inference and for a training step, can DoRA adapters share a
mixed batch, and how fast are 100 saved adapters loaded? Each figure sits next to the same figure for peft.
The last line printed is one JSON object with the headline figures.

    python benchmarks/mixed_batch.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import grafting as gf  # noqa: E402
from _common import header, interleaved, load_average, median, ms, ratio, rounded, table, x  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]
VOCAB = 50257
# rounds are interleaved across cases (see _common.interleaved); the full run is sized for under 10 min on 2 idle
# cores, and prefill, DoRA inference and training take most of it
FULL = dict(decode_rounds=40, decode_warmup=2, shared_rounds=15, prefill=(16, 128), prefill_rounds=3, train=(4, 128),
            train_rounds=3, n_serve=64, n_load=100)
QUICK = dict(decode_rounds=2, decode_warmup=1, shared_rounds=2, prefill=(16, 16), prefill_rounds=1, train=(2, 16),
             train_rounds=1, n_serve=8, n_load=8)


# init_lora_weights=False: B is random, so every adapter changes the output and the grafting-vs-peft agreement check
# below would catch a row routed to the wrong adapter. fan_in_fan_out: GPT-2's Conv1D stores its weight (in, out).
def g_config(**kw):
    return gf.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, fan_in_fan_out=True, init_lora_weights=False,
                         **kw)


def p_config(**kw):
    return PeftLoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, fan_in_fan_out=True, init_lora_weights=False,
                          **kw)


def peft_names(names):
    return [n if n is not None else "__base__" for n in names]


def save_adapters(base, root: Path, n: int) -> None:
    model = gf.AdaptedModel(copy.deepcopy(base))
    for i in range(n):
        model.add_adapter(f"a{i}", g_config())
        model.save_adapter(root / f"a{i}", name=f"a{i}")
        model.delete_adapter(f"a{i}")


def serving_pair(base, root: Path, n: int):
    """The same n saved adapters loaded into grafting and into peft, each on its own copy of the base."""
    g = gf.load(copy.deepcopy(base), root / "a0", adapter_name="a0")
    p = PeftModel.from_pretrained(copy.deepcopy(base), root / "a0", adapter_name="a0")
    for i in range(1, n):
        g.load_adapter(root / f"a{i}", name=f"a{i}")
        p.load_adapter(root / f"a{i}", adapter_name=f"a{i}")
    g.set_active("a0")
    p.set_adapter("a0")
    return g.eval(), p.eval()


def agreement(g, p, base) -> tuple[float, float]:
    """Max |logit difference| grafting vs peft on one mixed batch, and how far the adapters move the base."""
    ids = torch.randint(0, VOCAB, (4, 8))
    names = ["a1", None, "a2", "a0"]
    with torch.inference_mode():
        lg = g(input_ids=ids, adapter_names=names).logits
        lp = p(input_ids=ids, adapter_names=peft_names(names)).logits
        lb = base(input_ids=ids).logits
    return (lg - lp).abs().max().item(), (lg - lb).abs().max().item()


def serving_section(title, base, g, p, rows, tokens, n_distinct, rounds, warmup, **fwd):
    ids = torch.randint(0, VOCAB, (rows, tokens))
    names = [f"a{i % n_distinct}" for i in range(rows)]  # round-robin rows over adapters
    pn = peft_names(names)
    cases = {
        "base": lambda: base(input_ids=ids, **fwd),
        "g_single": lambda: g(input_ids=ids, **fwd),
        "g_mixed": lambda: g(input_ids=ids, adapter_names=names, **fwd),
        "p_single": lambda: p(input_ids=ids, **fwd),
        "p_mixed": lambda: p(input_ids=ids, adapter_names=pn, **fwd),
    }
    with torch.inference_mode():
        t = interleaved(cases, rounds, warmup)
    r = {"base_ms": median(t["base"]) * 1e3,
         "grafting_single_over_base": ratio(t, "g_single", "base"),
         "grafting_mixed_over_single": ratio(t, "g_mixed", "g_single"),
         "peft_single_over_base": ratio(t, "p_single", "base"),
         "peft_mixed_over_single": ratio(t, "p_mixed", "p_single")}
    table(f"{title}: {rows} rows x {tokens} token{'s' * (tokens > 1)}, {n_distinct} distinct adapters in the mixed "
          f"batch ({rounds} rounds)", [
              ("bare base forward", ms(median(t["base"])), ms(median(t["base"])), "same model, no adapter code"),
              ("single adapter, all rows", ms(median(t["g_single"])), ms(median(t["p_single"])), ""),
              (f"mixed, {n_distinct} adapters", ms(median(t["g_mixed"])), ms(median(t["p_mixed"])), ""),
              ("single / base", x(r["grafting_single_over_base"]), x(r["peft_single_over_base"]), "grafting <= 1.04x"),
              ("mixed / single", x(r["grafting_mixed_over_single"]), x(r["peft_mixed_over_single"]),
               "grafting <= 1.2x"),
          ])
    return r


def dora_section(base, cfg, rounds):
    g = gf.adapt(copy.deepcopy(base), g_config(), adapter_name="lora")
    g.add_adapter("dora", g_config(use_dora=True))
    g.add_adapter("dora2", g_config(use_dora=True))
    p = get_peft_model(copy.deepcopy(base), p_config(), adapter_name="lora")
    p.add_adapter("dora", p_config(use_dora=True))
    rows, tokens = cfg["prefill"]
    ids = torch.randint(0, VOCAB, (rows, tokens))
    mixed = [("dora", "dora2", "lora", None)[i % 4] for i in range(rows)]

    # training step: forward with LM loss, backward, AdamW on the active adapter's parameters only. It runs before
    # inference because grafting reuses a DoRA weight norm cached under inference_mode in a later backward, which
    # torch rejects (a grafting bug, reported).
    trows, ttokens = cfg["train"]
    tids = torch.randint(0, VOCAB, (trows, ttokens))
    g.train(), p.train()
    counts = {}

    def trainer(model, activate, name, key):
        activate(name)
        params = [q for q in model.parameters() if q.requires_grad]
        counts[key] = sum(q.numel() for q in params)
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            model(input_ids=tids, labels=tids).loss.backward()
            opt.step()
        return lambda: activate(name), step

    cases = {f"{lib}_{name}": trainer(model, activate, name, f"{lib}_{name}")
             for lib, model, activate in (("g", g, g.set_active), ("p", p, p.set_adapter)) for name in ("lora", "dora")}
    tt = interleaved(cases, rounds, 1)

    # inference: switching the active adapter is setup, outside the timed call
    g.eval(), p.eval()
    fwd = dict(input_ids=ids, logits_to_keep=1)
    cases = {
        "g_lora": (lambda: g.set_active("lora"), lambda: g(**fwd)),
        "g_dora": (lambda: g.set_active("dora"), lambda: g(**fwd)),
        "g_mixed": (lambda: g.set_active("dora"), lambda: g(**fwd, adapter_names=mixed)),
        "p_lora": (lambda: p.set_adapter("lora"), lambda: p(**fwd)),
        "p_dora": (lambda: p.set_adapter("dora"), lambda: p(**fwd)),
    }
    with torch.inference_mode():
        ti = interleaved(cases, rounds, 1)
        try:
            p(input_ids=ids[:2, :4], adapter_names=["dora", "lora"])
            peft_mixed = "accepted"
        except Exception as e:  # noqa: BLE001 - we report whatever peft raises
            peft_mixed = f"{type(e).__name__}: {str(e).splitlines()[0]}"

    r = {"grafting_infer_dora_over_lora": ratio(ti, "g_dora", "g_lora"),
         "peft_infer_dora_over_lora": ratio(ti, "p_dora", "p_lora"),
         "grafting_train_dora_over_lora": ratio(tt, "g_dora", "g_lora"),
         "peft_train_dora_over_lora": ratio(tt, "p_dora", "p_lora"),
         "grafting_mixed_dora_over_single_dora": ratio(ti, "g_mixed", "g_dora"),
         "peft_mixed_dora": peft_mixed}
    table(f"DoRA vs LoRA, r=16: inference {rows}x{tokens} tokens (last-position logits), train step {trows}x{ttokens} "
          f"tokens, LM loss + backward + AdamW ({rounds} rounds)", [
              ("inference LoRA", ms(median(ti["g_lora"])), ms(median(ti["p_lora"])), ""),
              ("inference DoRA", ms(median(ti["g_dora"])), ms(median(ti["p_dora"])), ""),
              ("inference DoRA / LoRA", x(r["grafting_infer_dora_over_lora"]), x(r["peft_infer_dora_over_lora"]),
               "grafting <= 1.03x"),
              ("train step LoRA", ms(median(tt["g_lora"])), ms(median(tt["p_lora"])),
               f"trainable params {counts['g_lora']:,} vs {counts['p_lora']:,}"),
              ("train step DoRA", ms(median(tt["g_dora"])), ms(median(tt["p_dora"])),
               f"trainable params {counts['g_dora']:,} vs {counts['p_dora']:,}"),
              ("train DoRA / LoRA", x(r["grafting_train_dora_over_lora"]), x(r["peft_train_dora_over_lora"]),
               "grafting <= 1.05x"),
              ("mixed batch, 2 DoRA + LoRA + base rows", ms(median(ti["g_mixed"])),
               "accepted?!" if peft_mixed == "accepted" else "refused", ""),
              ("mixed DoRA / single DoRA", x(r["grafting_mixed_dora_over_single_dora"]), "-", ""),
          ])
    print(f"peft on a mixed batch naming a DoRA adapter: {peft_mixed}")
    return r


def load_section(base, root: Path, n: int):
    # each library's wrapper already holds one adapter, so what is timed is load_adapter alone
    g = gf.load(copy.deepcopy(base), root / "a0", adapter_name="warm")
    p = PeftModel.from_pretrained(copy.deepcopy(base), root / "a0", adapter_name="warm")
    tg, tp = [], []
    for i in range(n):  # alternating, so both see the same page cache and machine state
        t0 = time.perf_counter()
        g.load_adapter(root / f"a{i}", name=f"b{i}")
        tg.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        p.load_adapter(root / f"a{i}", adapter_name=f"b{i}")
        tp.append(time.perf_counter() - t0)
    k = max(1, n // 10)
    r = {"grafting_ms_per_adapter": 1e3 * sum(tg) / n, "peft_ms_per_adapter": 1e3 * sum(tp) / n}
    r["peft_over_grafting"] = r["peft_ms_per_adapter"] / r["grafting_ms_per_adapter"]
    table(f"Loading {n} saved adapters (r=16, PEFT format) into one model", [
        ("total", f"{sum(tg):.2f} s", f"{sum(tp):.2f} s", ""),
        ("per adapter", ms(sum(tg) / n), ms(sum(tp) / n), f"peft / grafting = {x(r['peft_over_grafting'])}"),
        (f"per adapter, first {k}", ms(median(tg[:k])), ms(median(tp[:k])), "median"),
        (f"per adapter, last {k}", ms(median(tg[-k:])), ms(median(tp[-k:])),
         "median; last - first = cost of the adapters already loaded"),
    ])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: one round, small shapes, 8 adapters")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (default: torch's choice). With other processes on the CPU, 1 is "
                         "steadier: a multi-threaded op waits for its slowest thread, which may be descheduled")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore")  # peft's and transformers' advisory warnings would bury the tables
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    started = last = time.perf_counter()

    def lap(what: str) -> None:  # section times tell whoever resizes FULL / QUICK where the minutes go
        nonlocal last
        now = time.perf_counter()
        print(f"# ({what}: {now - last:.1f} s)")
        last = now

    header("grafting vs peft: mixed-adapter batches, DoRA, adapter loading",
           f"grafting {gf.__version__}  mode {'quick' if args.quick else 'full'}")
    # frozen like the base inside both adapted models: torch's matmul folds (rows, 1, dim) @ W into one mm only
    # when W needs a gradient, so an unfrozen bare base would run the last-position output layer 3x faster than
    # either library's (frozen) copy of the same layer and charge that to the adapters
    base = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=768, n_head=12)).eval().requires_grad_(False)
    print("# model: GPT-2 architecture, 6 layers, width 768, 12 heads, random weights, fp32, eval, inference_mode;"
          f" LoRA r=16 alpha=32 on {TARGETS}")
    out = {"quick": args.quick, "torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="grafting-bench-") as tmp:
        root = Path(tmp)
        save_adapters(base, root, max(cfg["n_serve"], cfg["n_load"]))
        g, p = serving_pair(base, root, cfg["n_serve"])
        lap(f"saved {max(cfg['n_serve'], cfg['n_load'])} adapters, loaded {cfg['n_serve']} into each library")
        diff, moved = agreement(g, p, base)
        print(f"# check: mixed-batch logits, grafting vs peft max |diff| = {diff:.2e} "
              f"(adapters move the base by up to {moved:.2f})")
        out["logit_max_abs_diff"] = f"{diff:.1e}"  # a string: the JSON rounds numbers to 4 decimals
        out["decode"] = serving_section("Decode", base, g, p, 64, 1, cfg["n_serve"], cfg["decode_rounds"],
                                        cfg["decode_warmup"])
        lap("decode")
        # the same rows over only 8 adapters (8 rows each, interleaved): the per-adapter gather
        out["decode_shared"] = serving_section("Decode, rows sharing adapters", base, g, p, 64, 1, 8,
                                               cfg["shared_rounds"], cfg["decode_warmup"])
        lap("decode, shared adapters")
        rows, tokens = cfg["prefill"]
        # a server samples only from the last prefill position; full logits would add a 50257-wide head per token
        out["prefill"] = serving_section("Prefill (last-position logits)", base, g, p, rows, tokens, 8,
                                         cfg["prefill_rounds"], 1, logits_to_keep=1)
        lap("prefill")
        del g, p
        gc.collect()
        out["dora"] = dora_section(base, cfg, cfg["train_rounds"])
        lap("DoRA")
        gc.collect()
        out["load"] = load_section(base, root, cfg["n_load"])
        lap("loading")
    goals = {"decode_grafting_mixed_le_1.2": out["decode"]["grafting_mixed_over_single"] <= 1.2,
             "decode_grafting_single_le_1.04": out["decode"]["grafting_single_over_base"] <= 1.04,
             "prefill_grafting_mixed_le_1.2": out["prefill"]["grafting_mixed_over_single"] <= 1.2,
             "prefill_grafting_single_le_1.04": out["prefill"]["grafting_single_over_base"] <= 1.04,
             "dora_train_le_1.05": out["dora"]["grafting_train_dora_over_lora"] <= 1.05,
             "dora_infer_le_1.03": out["dora"]["grafting_infer_dora_over_lora"] <= 1.03}
    out["goals_met"] = goals
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["load_average_at_end"] = load_average()
    print(f"\n# goals met: {sum(goals.values())}/{len(goals)}; total {out['seconds']} s; load average {load_average()}")
    print(json.dumps(rounded(out)))


if __name__ == "__main__":
    main()
