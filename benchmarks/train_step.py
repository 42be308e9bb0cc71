"""One LoRA (and DoRA) training step: grafting against peft on the same model and batch, in one run.

Question: on a GPT-2-shaped model (6 layers, width 768, random weights, fp32, CPU) and a batch of 16 x 128
random tokens with an LM loss, is grafting's train step (forward, backward, AdamW over the adapter parameters,
zero_grad) as fast as peft's (goal: time ratio <= 0.95) and no hungrier (goal: peak-memory ratio <= 1.0)? How
many bare forwards is one step for each, and what does DoRA cost over LoRA in each library?
Timings run in this process, cases interleaved round by round; peak memory is measured per library in its own
fresh subprocess. The last line printed is one JSON object with the headline figures.

    python benchmarks/train_step.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")  # peft warns that Conv1D wants fan_in_fan_out=True (we pass it)

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, interleaved, median, ms, ratio, rounded, table, x  # noqa: E402

hf_logging.set_verbosity_error()
TARGETS = ["c_attn", "c_proj", "c_fc"]
# a full-size step takes ~10-30 s on 2 shared cores (the 16x128x50257 logits and their backward dominate);
# --quick shrinks the model too, since the point of it is to run every code path in well under a minute
FULL = dict(model=dict(n_layer=6, n_embd=768, n_head=12), batch=(16, 128), rounds=6, warmup=1, mem_steps=2)
QUICK = dict(model=dict(n_layer=2, n_embd=128, n_head=4, vocab_size=2048, n_positions=64), batch=(2, 32),
             rounds=1, warmup=1, mem_steps=1)


def base_model(cfg: dict) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**cfg["model"])).float()


def batch(cfg: dict) -> torch.Tensor:
    vocab = GPT2Config(**cfg["model"]).vocab_size
    return torch.randint(0, vocab, cfg["batch"], generator=torch.Generator().manual_seed(1))


def adapted(lib: str, base, dora: bool):
    """A train-mode copy of ``base`` with one r=16 adapter. fan_in_fan_out: GPT-2's Conv1D stores (in, out)."""
    kw = dict(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0, fan_in_fan_out=True, use_dora=dora)
    torch.manual_seed(2)
    if lib == "grafting":
        import grafting as gf
        model = gf.adapt(copy.deepcopy(base), gf.LoraConfig(**kw))
    else:
        import peft
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    return model.train()


def copy_init(g, p) -> None:
    """Give grafting peft's random A factors (B = 0 in both), so both train the same function from one start."""
    with torch.no_grad():
        for name, host in g.hosts():
            host.adapters["default"].lora_A.copy_(p.base_model.model.get_submodule(name).lora_A["default"].weight)


def floor_model(base):
    """The cheapest possible adapter: none at all, yet backward still runs through every layer (one bias of the
    first layer trains). With the same loss (Hugging Face's, over full logits) no adapter library's step can
    beat this one on the same model."""
    model = copy.deepcopy(base).train().requires_grad_(False)
    model.transformer.h[0].attn.c_attn.bias.requires_grad_(True)
    return model


def trainer_loss(model, ids):
    """The loss as `graft train` computes it: the output layer and cross-entropy chunked, no full logits."""
    from grafting.train.lm_loss import head_is_plain
    from grafting.train.trainer import batch_loss
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    assert head_is_plain(model, model.base_model, input_ids=ids[:1, :8])
    return lambda: batch_loss(model, batch, "causal_lm", model.base_model)[0] / (ids.numel() - ids.shape[0])


def stepper(model, ids, trainer=False):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = trainer_loss(model, ids) if trainer else (lambda: model(input_ids=ids, labels=ids).loss)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in params)


def eval_loss(model, ids) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    model.train()
    return loss


# ---- peak memory -------------------------------------------------------------------------------------------------
# Measured as the rise of the process's peak RSS (VmHWM) over its RSS just before the timed steps, after one
# warm-up step has created AdamW's state: i.e. what one step needs on top of the model and optimizer (activations
# saved for backward, gradients, temporaries). Writing "5" to /proc/self/clear_refs resets VmHWM to the current
# RSS (Linux >= 4.0; checked here, and the child fails loudly if it does not). Each (library, method) runs in its
# own fresh interpreter so that one library's freed-but-kept heap cannot hide the other's peak, and with
# MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB so glibc hands every tensor-sized block straight back to the kernel on
# free: RSS then follows live tensor bytes instead of glibc's dynamic threshold, which otherwise keeps up to
# 32 MiB blocks in the heap and makes the number depend on allocation history. torch.profiler(profile_memory=True)
# was tried and rejected: on this CPU build its per-step "[memory]" events do not balance (a step nets -2.3 GB),
# so a running sum of them is no peak.
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(lib: str, dora: bool, cfg: dict) -> None:
    ids = batch(cfg)
    model = adapted("grafting" if lib == "trainer" else lib, base_model(cfg), dora)
    step, _ = stepper(model, ids, trainer=lib == "trainer")
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    if _status_kb("VmHWM") > before + 1024:
        raise SystemExit("VmHWM did not reset on clear_refs=5; peak memory cannot be measured this way here")
    for _ in range(cfg["mem_steps"]):
        torch.manual_seed(3)
        step()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024, "rss_mb": before / 1024}))


def peak_memory(lib: str, dora: bool, flags: list) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    args = [sys.executable, os.path.abspath(__file__), "--child", lib] + (["--dora"] if dora else []) + flags
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {lib} dora={dora} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- main --------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model and batch, 1 round: a smoke run under a minute")
    ap.add_argument("--rounds", type=int, help="timed rounds per case (default 6, quick 1)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's = cores; quick: 1)")
    ap.add_argument("--child", choices=["grafting", "peft", "trainer"], help=argparse.SUPPRESS)
    ap.add_argument("--dora", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    cfg = dict(QUICK if a.quick else FULL)
    if a.rounds:
        cfg["rounds"] = a.rounds
    # --quick runs one thread: on a shared, loaded 2-core box, 2 OpenMP threads stall at every op's barrier, which
    # turns the tiny model's 40 ms step into ~2 s; full-size steps are matmul-bound and use every core
    a.threads = a.threads or (1 if a.quick else None)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        return child(a.child, a.dora, cfg)

    import peft
    mc = cfg["model"]
    header(f"train step, GPT-2 {mc['n_layer']}x{mc['n_embd']} fp32, batch {'x'.join(map(str, cfg['batch']))}, "
           f"LoRA r=16 on {'/'.join(TARGETS)}", f"peft {peft.__version__}")
    ids = batch(cfg)
    base = base_model(cfg)
    bare = copy.deepcopy(base).eval()  # the bare forward: inference mode, no dropout, no autograd graph
    models, steps, counts = {}, {}, {}
    for method, dora in (("lora", False), ("dora", True)):
        p = adapted("peft", base, dora)
        g = adapted("grafting", base, dora)
        copy_init(g, p)
        for lib, m in (("g", g), ("p", p)):
            models[f"{lib}_{method}"] = m
            steps[f"{lib}_{method}"], counts[f"{lib}_{method}"] = stepper(m, ids)
        if method == "lora":  # grafting's LoRA with the loss `graft train` uses
            t = adapted("grafting", base, False)
            copy_init(t, p)
            models["t_lora"] = t
            steps["t_lora"], counts["t_lora"] = stepper(t, ids, trainer=True)
    steps["floor"], _ = stepper(floor_model(base), ids)
    del base
    gc.collect()

    def bare_forward():
        with torch.no_grad():
            bare(input_ids=ids)

    # every round reseeds before each step, so both libraries see the same dropout masks (GPT-2's default 0.1
    # residual/attention dropout is on in train mode) and train the same trajectory: the final losses must agree
    seeded = {k: (lambda: torch.manual_seed(3), fn) for k, fn in steps.items()}
    times = interleaved({"bare_fwd": bare_forward, **seeded}, rounds=cfg["rounds"], warmup=cfg["warmup"])
    losses = {k: eval_loss(m, ids) for k, m in models.items()}

    print(f"\nmeasuring peak memory in 2 x {1 if a.quick else 2} fresh subprocesses ...", flush=True)
    flags = (["--quick"] if a.quick else []) + ([f"--threads={a.threads}"] if a.threads else [])
    mem = {f"{lib[0]}_{method}": peak_memory(lib, method == "dora", flags)
           for method in (["lora"] if a.quick else ["lora", "dora"]) for lib in ("grafting", "peft")}
    mem["t_lora"] = peak_memory("trainer", False, flags)

    r = {"bare_forward_ms": median(times["bare_fwd"]) * 1e3}
    for method in ("lora", "dora"):
        g, p = f"g_{method}", f"p_{method}"
        r[f"grafting_{method}_step_ms"] = median(times[g]) * 1e3
        r[f"peft_{method}_step_ms"] = median(times[p]) * 1e3
        r[f"grafting_{method}_step_over_bare_fwd"] = ratio(times, g, "bare_fwd")
        r[f"peft_{method}_step_over_bare_fwd"] = ratio(times, p, "bare_fwd")
        r[f"{method}_time_ratio"] = ratio(times, g, p)
        if g in mem:
            r[f"grafting_{method}_peak_mb"] = mem[g]["peak_mb"]
            r[f"peft_{method}_peak_mb"] = mem[p]["peak_mb"]
            r[f"{method}_peak_mem_ratio"] = mem[g]["peak_mb"] / mem[p]["peak_mb"]
        r[f"{method}_final_loss_abs_diff"] = abs(losses[g] - losses[p])
    r["floor_step_ms"] = median(times["floor"]) * 1e3
    r["floor_over_peft_lora"] = ratio(times, "floor", "p_lora")
    r["grafting_trainer_lora_step_ms"] = median(times["t_lora"]) * 1e3
    r["trainer_lora_time_ratio"] = ratio(times, "t_lora", "p_lora")
    r["grafting_trainer_lora_peak_mb"] = mem["t_lora"]["peak_mb"]
    r["trainer_lora_peak_mem_ratio"] = mem["t_lora"]["peak_mb"] / mem["p_lora"]["peak_mb"]
    r["trainer_lora_final_loss_abs_diff"] = abs(losses["t_lora"] - losses["p_lora"])
    r["grafting_dora_over_lora"] = ratio(times, "g_dora", "g_lora")
    r["peft_dora_over_lora"] = ratio(times, "p_dora", "p_lora")
    r["goal_time_met"] = r["lora_time_ratio"] <= 0.95
    r["goal_mem_met"] = r.get("lora_peak_mem_ratio", float("nan")) <= 1.0

    def mem_row(method):
        g, p = f"g_{method}", f"p_{method}"
        if g not in mem:
            return (f"{method} peak memory / step", "-", "-", "not measured with --quick")
        return (f"{method} peak memory / step", f"{mem[g]['peak_mb']:,.0f} MB", f"{mem[p]['peak_mb']:,.0f} MB",
                f"grafting/peft {x(r[method + '_peak_mem_ratio'])} (goal <= 1.0)")

    n = cfg["rounds"]
    table(f"train step (forward+backward+AdamW+zero_grad), median of {n} interleaved rounds after "
          f"{cfg['warmup']} warm-up; peak memory = VmHWM rise over {cfg['mem_steps']} step(s) in a fresh process",
          [("bare forward (no adapter, no_grad)", ms(r["bare_forward_ms"] / 1e3), "", "shared baseline"),
           ("LoRA step", ms(r["grafting_lora_step_ms"] / 1e3), ms(r["peft_lora_step_ms"] / 1e3),
            f"trainable {counts['g_lora']:,} / {counts['p_lora']:,}"),
           ("LoRA step / bare forward", x(r["grafting_lora_step_over_bare_fwd"]),
            x(r["peft_lora_step_over_bare_fwd"]), "peft ~2.8x per the issue"),
           ("LoRA time grafting/peft", x(r["lora_time_ratio"]), "", "goal <= 0.95"),
           mem_row("lora"),
           ("no adapter at all (floor) / peft LoRA", x(r["floor_over_peft_lora"]), "",
            "HF's loss, backward through every layer, no adapter: the bound for any library's LoRA step"),
           ("LoRA step, `graft train` loss", ms(r["grafting_trainer_lora_step_ms"] / 1e3), "",
            f"chunked output layer + CE; grafting/peft {x(r['trainer_lora_time_ratio'])}"),
           ("  its peak memory / step", f"{r['grafting_trainer_lora_peak_mb']:,.0f} MB", "",
            f"grafting/peft {x(r['trainer_lora_peak_mem_ratio'])}"),
           ("DoRA step", ms(r["grafting_dora_step_ms"] / 1e3), ms(r["peft_dora_step_ms"] / 1e3),
            f"trainable {counts['g_dora']:,} / {counts['p_dora']:,}"),
           ("DoRA step / bare forward", x(r["grafting_dora_step_over_bare_fwd"]),
            x(r["peft_dora_step_over_bare_fwd"]), ""),
           ("DoRA time grafting/peft", x(r["dora_time_ratio"]), "", ""),
           ("DoRA step / LoRA step", x(r["grafting_dora_over_lora"]), x(r["peft_dora_over_lora"]), "lower is better"),
           mem_row("dora"),
           ("eval loss after the timed steps", f"{losses['g_lora']:.5f}", f"{losses['p_lora']:.5f}",
            "LoRA; same init, data and dropout masks"),
           ("  same, `graft train` loss", f"{losses['t_lora']:.5f}", f"{losses['p_lora']:.5f}", ""),
           ("  same, DoRA", f"{losses['g_dora']:.5f}", f"{losses['p_dora']:.5f}", "")])
    print("\nper-round seconds: " + json.dumps(rounded({k: v for k, v in times.items()}, 3)))
    print(json.dumps(rounded(r)))


if __name__ == "__main__":
    main()
