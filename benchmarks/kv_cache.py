"""The serving engine's key/value cache at decode: buffers written in place (``grafting.serve.kv``) against
transformers' ``DynamicCache``, which concatenates every layer's keys and values at every step.

One decode step of a batch whose rows already hold ``columns`` cached tokens, on a Llama of SmolLM2-135M's
shape (30 layers, 576 wide, 9 heads over 3 key/value heads; random weights, fp32, ``inference_mode``). Both
cases start each round from the same cache: the buffers write their new column into room they already have
(a buffer grows by an eighth, at least 32 columns, when full: one copy every so often, not timed here), the
dynamic cache copies everything into new tensors. Interleaved rounds; ratio = median of per-round ratios.

    python benchmarks/kv_cache.py [--quick] [--threads N]

The last line is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import inspect
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from _common import header, interleaved, median, ms, ratio, rounded, table, x
from grafting.serve.kv import BatchCache, make_cache

SMOLLM2 = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def step_cases(model, rows: int, columns: int) -> dict:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    shape = (rows, config.num_key_value_heads, columns, head_dim)
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(config.num_hidden_layers)]
    mask = torch.ones(rows, columns, dtype=torch.long)
    cache = BatchCache()
    cache.set(kv, mask)
    ids = torch.randint(0, config.vocab_size, (rows, 1), generator=g)
    step_mask = torch.ones(rows, columns + 1, dtype=torch.long)
    positions = torch.full((rows, 1), columns)

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # renamed

    def run(past):
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=step_mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{name: past}).logits

    def buffers():
        run(cache.model_cache())  # writes column `columns` in place; not appended, so every round is the same

    def dynamic():
        run(make_cache(kv))

    check = (run(cache.model_cache()) - run(make_cache(kv))).abs().max().item()
    return {"buffers (grafting)": buffers, "DynamicCache": dynamic}, check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header("Serving KV cache: in-place buffers vs DynamicCache, one decode step")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval()
    shapes = [(8, 64), (32, 64)] if args.quick else [(8, 64), (32, 64), (8, 512), (32, 256)]
    rounds = 3 if args.quick else 7
    rows_out, results = [], {}
    for rows, columns in shapes:
        cases, check = step_cases(model, rows, columns)
        times = interleaved(cases, rounds=rounds)
        r = ratio(times, "buffers (grafting)", "DynamicCache")
        key = f"{rows}x{columns}"
        results[key] = {"buffers_ms": median(times["buffers (grafting)"]) * 1e3,
                        "dynamic_ms": median(times["DynamicCache"]) * 1e3, "ratio": r, "max_logit_diff": check}
        rows_out.append((f"{rows} rows x {columns} cached columns", ms(median(times["buffers (grafting)"])),
                         ms(median(times["DynamicCache"])), f"{x(r)} (max logit difference {check:.1e})"))
    table("decode step, SmolLM2-135M shape", rows_out,
          columns=("batch", "buffers (grafting)", "DynamicCache", "grafting / DynamicCache"))
    print(json.dumps(rounded({"benchmark": "kv_cache", **results})))


if __name__ == "__main__":
    main()
