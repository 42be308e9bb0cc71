"""The quantized base: memory of an NF4 model, and speed of the NF4 layer against fp32, bitsandbytes and torchao.

Questions (issue: quantized base):
1. Resident memory of SmolLM2-135M-Instruct (the packaged model) quantized to NF4 with double quantization, vs
   the same model in fp32 and in bf16: the bytes its tensors hold (linear layers in NF4 with the rest in fp32
   or bf16; and with the embedding and tied head in NF4 too, ``quantize(embeddings=True)``), and the RSS of a
   fresh process that loads it (grafting from a saved 4-bit checkpoint; fp32 / bf16 from a plain one).
   Goal: <= 0.15x fp32.
2. Time of one NF4 linear layer (forward under no_grad, and forward + input-gradient backward) against an fp32
   nn.Linear, bitsandbytes' Linear4bit and torchao's NF4Tensor (``linear_nf4``), at 1, 64 and 512 tokens, on a
   GPT-2 MLP shape (768 -> 3072) and a SmolLM2 MLP shape (576 -> 1536): "hot" (one layer called repeatedly,
   its weights cache-resident) and "cold" (distinct layers totalling 4x the last-level cache, called in turn,
   as a model's forward reads them). Cases are interleaved round by round (benchmarks/_common.py).
3. The whole SmolLM2 forward, fp32 vs its linear layers in NF4: prefill at 64 and 512 tokens, one decode step.
   Goal for 2 and 3: forward <= 2x fp32 and faster than torchao.

    python benchmarks/quant.py [--quick] [--rounds N]

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, interleaved, median, ms, ratio, rounded, table, x  # noqa: E402

from grafting.quant import NF4Linear, quantize, quantized_nbytes, save_pretrained  # noqa: E402

SHAPES = {"gpt2-mlp 768->3072": (768, 3072), "smollm2-mlp 576->1536": (576, 1536)}


def _optional(name):
    try:
        return __import__(name)
    except Exception:  # noqa: BLE001 (an optional peer that fails to import is just absent)
        return None


def layer_cases(fan_in: int, fan_out: int, tokens: int, backward: bool, copies: int = 1) -> dict:
    """One callable per implementation. With ``copies`` > 1 each call runs that many distinct layers in turn and
    the time is divided by ``copies`` afterwards: their weights together exceed the last-level cache, so every
    layer is read from memory as in a model's forward (one copy stays cache-resident when called repeatedly)."""
    torch.manual_seed(0)
    lins = [nn.Linear(fan_in, fan_out) for _ in range(copies)]
    x_in = torch.randn(tokens, fan_in, requires_grad=backward)
    g = torch.randn(tokens, fan_out)
    cases = {}

    def case(fns):
        if not backward:
            def run():
                with torch.no_grad():
                    for fn in fns:
                        fn(x_in)
            return run

        def run_bw():
            for fn in fns:
                y = fn(x_in)
                (gx,) = torch.autograd.grad(y, x_in, g)
        return run_bw

    cases["fp32 Linear"] = case(lins)
    cases["grafting NF4"] = case([NF4Linear.from_linear(lin) for lin in lins])
    if _optional("bitsandbytes") is not None:
        import bitsandbytes as bnb

        def bnb_layer(lin):
            bl = bnb.nn.Linear4bit(fan_in, fan_out, compute_dtype=torch.float32, quant_type="nf4",
                                   compress_statistics=True)
            bl.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                          compress_statistics=True)
            bl.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
            return bl.to("cpu")
        cases["bitsandbytes Linear4bit"] = case([bnb_layer(lin) for lin in lins])
    if _optional("torchao") is not None and (fan_in * fan_out) % (64 * 256) == 0:  # torchao's requirement
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

        def ao_layer(lin):
            w_ao, b = to_nf4(lin.weight.detach().clone(), 64, 256), lin.bias.detach()
            return lambda v: linear_nf4(v, w_ao) + b
        cases["torchao NF4Tensor"] = case([ao_layer(lin) for lin in lins])
    return cases


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs), or 32 MB when it cannot be read."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    for entry in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, entry, "size")) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=32 * 2**20)


def bench_layers(rounds: int, token_counts, cold_tokens=(), max_copies: int = 1 << 20) -> dict:
    """Hot: one layer called over and over (its weights stay in cache). Cold (``cold_tokens``): distinct layers
    whose fp32 weights total 4x the last-level cache, called in turn."""
    rows, out = [], {}
    llc = last_level_cache_bytes()
    for shape_name, (fan_in, fan_out) in SHAPES.items():
        plan = [("hot", False, t, 1) for t in token_counts] + [("hot", True, token_counts[-1], 1)]
        copies = min(max_copies, max(2, -(-4 * llc // (fan_in * fan_out * 4))))
        plan += [("cold", False, t, copies) for t in cold_tokens]
        for cache, backward, tokens, n in plan:
            times = interleaved(layer_cases(fan_in, fan_out, tokens, backward, n), rounds, warmup=2)
            times = {k: [t / n for t in v] for k, v in times.items()}
            kind = ("fwd+bwd" if backward else "forward") + ("" if cache == "hot" else f" cold x{n}")
            key = f"{shape_name} {kind} {tokens} tok"
            out[key] = {name: {"ms": median(t) * 1e3, "vs_fp32": ratio(times, name, "fp32 Linear")}
                        for name, t in times.items()}
            for name in times:
                rows.append([shape_name, kind, tokens, name, ms(median(times[name])),
                             x(ratio(times, name, "fp32 Linear"))])
    table(f"NF4 layer time (median per call; cold = distinct layers totalling 4x the {llc >> 20} MB "
          "last-level cache)", rows, columns=("shape", "pass", "tokens", "implementation", "median", "vs fp32"))
    return out


_MODEL_CHILD = r"""
import copy, json, os, sys, warnings
warnings.filterwarnings("ignore")
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
sys.path.insert(0, sys.argv[3])
from _common import interleaved, median, ratio
from grafting.quant import quantize
from grafting.train.models import load_model
rounds, quick = int(sys.argv[1]), sys.argv[2] == "quick"
if quick:
    from transformers import LlamaConfig, LlamaForCausalLM
    fp32 = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
else:
    _, fp32 = load_model("packaged:smollm2-135m-instruct", "causal_lm")
fp32.eval()
nf4 = quantize(copy.deepcopy(fp32))
out = {}
for prompt in (64, 512):
    ids = torch.randint(0, fp32.config.vocab_size, (1, prompt))
    cases = {}
    for name, m in (("fp32", fp32), ("nf4", nf4)):
        def prefill(m=m):
            with torch.no_grad():
                m(ids, use_cache=False)
        cases[name] = prefill
    t = interleaved(cases, rounds, warmup=1)
    out[f"prefill {prompt} tok"] = {"fp32_ms": median(t["fp32"]) * 1e3, "nf4_ms": median(t["nf4"]) * 1e3,
                                    "nf4_vs_fp32": ratio(t, "nf4", "fp32")}
ids = torch.randint(0, fp32.config.vocab_size, (1, 64))
nxt = torch.randint(0, fp32.config.vocab_size, (1, 1))
cases = {}
for name, m in (("fp32", fp32), ("nf4", nf4)):
    with torch.no_grad():
        result = m(ids, use_cache=True)
        cache = getattr(result, "cache", None) or result.past_key_values
    def decode(m=m, cache=cache):
        with torch.no_grad():
            m(nxt, cache=cache, use_cache=True)
        cache.crop(-1)  # drop the token just appended: the same 64-token context every call
    cases[name] = decode
t = interleaved(cases, rounds * 4, warmup=3)
out["decode 1 tok (64 cached)"] = {"fp32_ms": median(t["fp32"]) * 1e3, "nf4_ms": median(t["nf4"]) * 1e3,
                                   "nf4_vs_fp32": ratio(t, "nf4", "fp32")}
print(json.dumps(out))
"""


def bench_model(rounds: int, quick: bool) -> dict:
    """A whole model's forward, fp32 vs every linear layer in NF4 (embedding and head fp32, as QLoRA): prefill
    at 64 and 512 tokens and one decode step against a 64-token KV cache. In its own process, so the memory the
    layer benchmark left behind does not count."""
    proc = subprocess.run([sys.executable, "-c", _MODEL_CHILD, str(rounds), "quick" if quick else "full",
                           os.path.dirname(os.path.abspath(__file__))], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"model benchmark failed:\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [[k, ms(v["fp32_ms"] / 1e3), ms(v["nf4_ms"] / 1e3), x(v["nf4_vs_fp32"])] for k, v in figures.items()]
    table("whole-model forward: " + ("tiny llama (--quick)" if quick else "SmolLM2-135M-Instruct"), rows,
          columns=("pass", "fp32", "NF4 linear layers", "vs fp32"))
    return figures


_RSS_CHILD = r"""
import os, sys, json, resource, warnings
warnings.filterwarnings("ignore")
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
kind, path = sys.argv[1], sys.argv[2]
import grafting.quant
before = rss()
if kind == "nf4":
    model = grafting.quant.from_pretrained(path)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if kind == "fp32" else torch.bfloat16)
ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
with torch.no_grad():
    model(ids)
print(json.dumps({"rss_mb": rss() - before, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def save_plain(model, directory: str) -> None:
    """The model as a plain fp32 safetensors checkpoint (transformers refuses to save a GGUF-loaded model)."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    seen, tensors = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:  # tied lm_head: transformers re-ties it on load
            seen.add(v.data_ptr())
            tensors[k] = v.contiguous()
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config, fh)


def bench_memory(quick: bool) -> dict:
    from grafting.train.models import load_model
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=True))
        name = "tiny llama (--quick)"
    else:
        _, model = load_model("packaged:smollm2-135m-instruct", "causal_lm")
        name = "SmolLM2-135M-Instruct"
    fp32 = sum(p.numel() * p.element_size() for p in model.parameters())
    bf16 = fp32 / 2
    tmp = tempfile.mkdtemp(prefix="graft-quant-bench-")
    save_plain(model, os.path.join(tmp, "fp32"))
    quantize(model)
    held = quantized_nbytes(model)
    linear_bits = 8 * held["nf4"] / sum(m.in_features * m.out_features for m in model.modules()
                                         if isinstance(m, NF4Linear))
    save_pretrained(model, os.path.join(tmp, "nf4"))
    model.to(torch.bfloat16)
    rest_bf16 = quantized_nbytes(model)
    model.to(torch.float32)
    from grafting.quant.model import _quantize_embeddings
    _quantize_embeddings(model, 64, True)  # grafting's extension: embedding + tied head in NF4 as well
    with_embeddings = quantized_nbytes(model)
    rss = {}
    for kind, path in (("fp32", "fp32"), ("bf16", "fp32"), ("nf4", "nf4")):
        proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, kind, os.path.join(tmp, path)],
                              capture_output=True, text=True, check=True)
        rss[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    figures = {
        "model": name,
        "tensor_mb": {"fp32": fp32 / 2**20, "bf16": bf16 / 2**20, "nf4_rest_fp32": held["total"] / 2**20,
                      "nf4_rest_bf16": rest_bf16["total"] / 2**20,
                      "nf4_with_embeddings": with_embeddings["total"] / 2**20,
                      "nf4_layers_only": held["nf4"] / 2**20},
        "nf4_with_embeddings_vs_fp32": with_embeddings["total"] / fp32,
        "nf4_vs_fp32": held["total"] / fp32, "nf4_rest_bf16_vs_fp32": rest_bf16["total"] / fp32,
        "linear_bits_per_parameter": linear_bits,
        "rss_after_load_mb": {k: v["rss_mb"] for k, v in rss.items()},
        "rss_nf4_vs_fp32": rss["nf4"]["rss_mb"] / rss["fp32"]["rss_mb"],
    }
    rows = [[k, f"{v:,.1f} MB", x(v * 2**20 / fp32)] for k, v in figures["tensor_mb"].items()]
    rows += [[f"RSS after load: {k}", f"{v:,.1f} MB", x(v / rss["fp32"]["rss_mb"])]
             for k, v in figures["rss_after_load_mb"].items()]
    table(f"memory: {name} (linear layers at {linear_bits:.3f} bits per parameter)", rows,
          columns=("what", "size", "vs fp32"))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one round: checks the script runs")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    header("benchmarks/quant.py: NF4 base, memory and layer speed",
           f"bitsandbytes {getattr(_optional('bitsandbytes'), '__version__', 'absent')}  "
           f"torchao {getattr(_optional('torchao'), '__version__', 'absent')}")
    memory = bench_memory(args.quick)
    if args.quick:
        SHAPES.clear()
        SHAPES["quick 64->128"] = (64, 128)
    layers = bench_layers(1 if args.quick else args.rounds, (1, 8) if args.quick else (1, 64, 512),
                          (1,) if args.quick else (1, 8, 64), max_copies=4 if args.quick else 1 << 20)
    model = bench_model(1 if args.quick else args.rounds, args.quick)
    fwd = {k: v for k, v in layers.items() if " forward" in k}
    headline = {
        "nf4_model_vs_fp32": memory["nf4_vs_fp32"],
        "nf4_model_rest_bf16_vs_fp32": memory["nf4_rest_bf16_vs_fp32"],
        "nf4_model_with_embeddings_vs_fp32": memory["nf4_with_embeddings_vs_fp32"],
        "nf4_linear_layers_vs_fp32": memory["linear_bits_per_parameter"] / 32,
        "rss_nf4_vs_fp32": memory["rss_nf4_vs_fp32"],
        "forward_vs_fp32": {k: v["grafting NF4"]["vs_fp32"] for k, v in fwd.items()},
        "forward_vs_torchao": {k: v["grafting NF4"]["ms"] / v["torchao NF4Tensor"]["ms"]
                               for k, v in fwd.items() if "torchao NF4Tensor" in v},
        "forward_vs_bitsandbytes": {k: v["grafting NF4"]["ms"] / v["bitsandbytes Linear4bit"]["ms"]
                                    for k, v in fwd.items() if "bitsandbytes Linear4bit" in v},
        "fwd_bwd_vs_fp32": {k: v["grafting NF4"]["vs_fp32"] for k, v in layers.items() if "fwd+bwd" in k},
        "model_forward_vs_fp32": {k: v["nf4_vs_fp32"] for k, v in model.items()},
    }
    print(json.dumps(rounded(headline)))


if __name__ == "__main__":
    main()
