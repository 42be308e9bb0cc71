"""One bi-level step of blo.Engine (darts, neumann-5, cg-5) against one plain training step of the same model.

Question: on a GPT-2-shaped model (4 layers, width 512, random weights, fp32, CPU) with a BiDoRA adapter (DoRA with
exact norm, r=16; magnitudes = the outer/architecture level, A and B = the inner/weight level) and batches of
4 x 128 random tokens with an LM loss, what does one ``Engine.step()`` cost relative to one plain training step
(forward, backward, AdamW over every adapter parameter, zero_grad)? Goal (the issue): a darts step <= 2.5x a plain
step (Betty's darts is about 3.5x).

One ``Engine.step()`` with ``unroll=1`` is one inner step (a weight step on the training batch) AND one outer
step (the hypergradient on the validation batch, then the magnitudes' AdamW step), so it is compared with one
plain step as a whole; the outer step alone, which the goal is about (Betty's figure, too, is its darts
hypergradient step beside the inner step it follows), is that call minus one plain step of the same round: the
inner step does a plain step's work (the engine's darts folds the inner step into its hypergradient, so it
cannot be clocked apart).
neumann and cg need second derivatives, which PyTorch's fused CPU attention kernel lacks, so the engine runs
their hypergradient under math attention; a plain step under math attention is timed as a second reference.
first_order (the outer gradient with the inner parameters held fixed) is timed too, as the floor of any
bi-level step: one inner step plus one outer forward and backward.

All cases run in this process, interleaved round by round (benchmarks/_common.py), each on its own copy of the
model; ratios are medians of per-round ratios. Each step's torch.autograd.grad calls are counted (the "backwards"
column: an HVP is one double backward; cg may stop early). Losses and hypergradient norms are checked finite.
A full run takes about 4 minutes with --threads 1. The last line printed is one JSON object with the headline
figures.

    python benchmarks/blo_step.py [--quick] [--threads N] [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grafting as gf  # noqa: E402
from _common import header, interleaved, load_average, median, ms, ratio, rounded, table, x  # noqa: E402
from grafting.blo import Engine, Level, fused_attention_has_double_backward  # noqa: E402

hf_logging.set_verbosity_error()
TARGETS = ["c_attn", "c_proj", "c_fc"]
GOAL = 2.5
ITERS = 5
LR = 1e-4
# Dropout off: DARTS' finite difference subtracts two losses on one batch, which with fresh dropout masks would
# differ by noise; the step's cost is the same either way. A full round (6 cases) takes about a minute on one
# core, two thirds of it the second-order steps, and half of every pass is the 50,257-wide output layer and its
# loss; --quick shrinks the model so every code path runs in well under a minute.
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
FULL = dict(model=dict(n_layer=4, n_embd=512, n_head=8, **NO_DROPOUT), batch=(4, 128), rounds=4, warmup=1)
QUICK = dict(model=dict(n_layer=2, n_embd=128, n_head=4, vocab_size=2048, n_positions=64, **NO_DROPOUT),
             batch=(2, 32), rounds=1, warmup=1)
METHODS = {"first_order": "first_order", "darts": "darts", "neumann5": "neumann", "cg5": "cg"}


def adapted(base):
    torch.manual_seed(2)
    model = gf.adapt(copy.deepcopy(base), gf.BiDoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                          fan_in_fan_out=True))
    return model.train()


def lm_loss(model):
    return lambda ids: model(input_ids=ids, labels=ids).loss


class Backwards:
    """Counts torch.autograd.grad calls (the engine and the hypergradients differentiate only through it): a pure
    pass-through, so the timed code is unchanged; it shows how many backward passes each step makes (and whether
    cg stopped early: it breaks on non-positive curvature)."""

    def __init__(self):
        self.n, self._grad = 0, torch.autograd.grad

        def grad(*args, **kw):
            self.n += 1
            return self._grad(*args, **kw)
        torch.autograd.grad = grad


def plain_case(base, ids, math_attention: bool, record: dict):
    model = adapted(base)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)

    def step():
        with sdpa_kernel([SDPBackend.MATH]) if math_attention else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        record.setdefault("losses", []).append(loss.item())
    return step, sum(p.numel() for p in params)


def engine_case(base, ids, ids_val, method: str, record: dict, counter: Backwards):
    model = adapted(base)
    groups = model.param_groups("default")
    weights, arch = groups["weights"], groups["architecture"]
    assert set(groups) == {"weights", "architecture"}, groups.keys()
    engine = Engine([Level("inner", weights, lm_loss(model), [ids], torch.optim.AdamW(weights, lr=LR)),
                     Level("outer", arch, lm_loss(model), [ids_val], torch.optim.AdamW(arch, lr=LR))],
                    hypergradient=method, iters=ITERS)
    def step():
        before = counter.n
        out = engine.step()
        record.setdefault("backwards", []).append(counter.n - before)
        record.setdefault("losses", []).extend([out["inner_loss"], out["outer_loss"], out["hypergrad_norm"]])
    return step, (len(weights), sum(p.numel() for p in weights), len(arch), sum(p.numel() for p in arch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model and batch, 1 round: a smoke run under a minute")
    ap.add_argument("--rounds", type=int, help="timed rounds per case (default 4, quick 1)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's = cores; quick: 1). With "
                                                "other processes on the CPU, 1 is steadier")
    a = ap.parse_args()
    cfg = dict(QUICK if a.quick else FULL)
    if a.rounds:
        cfg["rounds"] = a.rounds
    a.threads = a.threads or (1 if a.quick else None)
    if a.threads:
        torch.set_num_threads(a.threads)
    started = time.perf_counter()
    mc = cfg["model"]
    header(f"bi-level step, GPT-2 {mc['n_layer']}x{mc['n_embd']} fp32, batch {'x'.join(map(str, cfg['batch']))}, "
           f"BiDoRA r=16 on {'/'.join(TARGETS)}", f"grafting {gf.__version__}  mode {'quick' if a.quick else 'full'}")
    fused_ok = fused_attention_has_double_backward()  # probed (and cached) before anything is timed
    how = "neumann/cg run as is" if fused_ok else "the engine runs neumann/cg hypergradients under math attention"
    print(f"# fused CPU attention has a double backward: {fused_ok} ({how})")

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(**mc)).float()
    assert base.config._attn_implementation == "sdpa", base.config._attn_implementation
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids, ids_val = (torch.randint(0, vocab, cfg["batch"], generator=gen) for _ in range(2))

    counter = Backwards()
    records = {name: {} for name in ("plain", "plain_math", *METHODS)}
    cases, counts = {}, {}
    cases["plain"], counts["plain"] = plain_case(base, ids, False, records["plain"])
    cases["plain_math"], _ = plain_case(base, ids, True, records["plain_math"])
    for name, method in METHODS.items():
        cases[name], counts[name] = engine_case(base, ids, ids_val, method, records[name], counter)
    del base
    gc.collect()
    times = interleaved(cases, rounds=cfg["rounds"], warmup=cfg["warmup"])

    # correctness, cheaply: every loss and hypergradient norm of every step (warm-up included) is finite, and
    # every engine step took the same number of backward passes (cg may stop early; then it is reported)
    for name, rec in records.items():
        bad = [v for v in rec["losses"] if not math.isfinite(v)]
        assert not bad, f"{name}: non-finite loss or hypergradient norm {bad}"
    w = cfg["warmup"]
    for name in METHODS:
        times[f"{name}_outer"] = [s - p for s, p in zip(times[name], times["plain"])]

    r = {"plain_ms": median(times["plain"]) * 1e3, "plain_math_ms": median(times["plain_math"]) * 1e3,
         "plain_math_over_plain": ratio(times, "plain_math", "plain")}
    for name in METHODS:
        r[f"{name}_ms"] = median(times[name]) * 1e3
        r[f"{name}_over_plain"] = ratio(times, name, "plain")
        r[f"{name}_outer_ms"] = median(times[f"{name}_outer"]) * 1e3
        r[f"{name}_outer_over_plain"] = ratio(times, f"{name}_outer", "plain")
        seen = sorted(set(records[name]["backwards"][w:]))  # timed steps only
        r[f"{name}_backwards_per_step"] = seen[0] if len(seen) == 1 else seen
    for name in ("neumann5", "cg5"):
        r[f"{name}_outer_over_plain_math"] = ratio(times, f"{name}_outer", "plain_math")
    r["last_losses"] = {name: rec["losses"][-3:-1] if name in METHODS else rec["losses"][-1]
                        for name, rec in records.items()}
    goals = {"darts_outer_le_2.5": r["darts_outer_over_plain"] <= GOAL}

    nw, nwp, na, nap = counts["darts"]
    notes = {"first_order": "floor of any bi-level step: inner step + outer fwd/bwd",
             "darts": "1 inner step folded into the hypergradient + 2 passes",
             "neumann5": "hypergradient under math attention", "cg5": "hypergradient under math attention"}
    # the non-HVP backwards of neumann/cg: inner step, outer gradient, differentiable inner gradient, mixed product
    hvps = {name: [b - 4 for b in records[name]["backwards"][w:]] for name in ("neumann5", "cg5")}
    r["hvps_per_step"] = {name: sorted(set(v)) for name, v in hvps.items()}
    for name in ("neumann5", "cg5"):
        k = "-".join(map(str, r["hvps_per_step"][name]))
        notes[name] += f"; {k} of {ITERS} HVPs" + (" (CG stops at non-positive curvature)" if name == "cg5" else "")

    def span(b, minus=0):
        return b - minus if isinstance(b, int) else f"{b[0] - minus}-{b[-1] - minus}"
    rows = [("plain step (fused attention)", ms(r["plain_ms"] / 1e3), "1.000x", 1,
             f"AdamW over {counts['plain']:,} adapter params"),
            ("plain step, math attention", ms(r["plain_math_ms"] / 1e3), x(r["plain_math_over_plain"]), 1,
             "second reference: what math attention alone costs")]
    for name in METHODS:
        b = r[f"{name}_backwards_per_step"]
        rows.append((f"{name} Engine.step() (1 inner + 1 outer)", ms(r[f"{name}_ms"] / 1e3),
                     x(r[f"{name}_over_plain"]), span(b), notes[name]))
        extra = (f"; / plain math step {x(r[f'{name}_outer_over_plain_math'])}" if name in ("neumann5", "cg5")
                 else "")
        goal = (f"goal <= {GOAL}x: {'met' if goals['darts_outer_le_2.5'] else 'MISSED'} (Betty ~3.5x)"
                if name == "darts" else "")
        rows.append(("  outer step only (step - a plain step)", ms(r[f"{name}_outer_ms"] / 1e3),
                     x(r[f"{name}_outer_over_plain"]), span(b, 1), f"{goal}{extra}".lstrip("; ")))
    table(f"bi-level step vs plain step, median of {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up; "
          f"inner level {nw} tensors / {nwp:,} params (A, B), outer {na} / {nap:,} (magnitudes); "
          f"neumann/cg iters={ITERS}", rows, columns=("case", "time", "/ plain step", "backwards", "goal / note"))
    print("\nper-round seconds: " + json.dumps(rounded({k: v for k, v in times.items()}, 3)))
    out = {"quick": a.quick, "model": f"gpt2 {mc['n_layer']}x{mc['n_embd']}", "batch": list(cfg["batch"]),
           "ratios": {name: r[f"{name}_over_plain"] for name in METHODS},
           "outer_only_ratios": {name: r[f"{name}_outer_over_plain"] for name in METHODS}, **r,
           "fused_attention_double_backward": fused_ok, "goals_met": goals,
           "seconds": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_average": load_average()}
    print(f"\n# darts outer step / plain step {x(r['darts_outer_over_plain'])} (goal <= {GOAL}x: "
          f"{'met' if goals['darts_outer_le_2.5'] else 'missed'}), whole darts Engine.step {x(r['darts_over_plain'])}; "
          f"total {out['seconds']} s; load average {load_average()}")
    print(json.dumps(rounded(out)))


if __name__ == "__main__":
    main()
