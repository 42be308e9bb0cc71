"""What the bf16 and int8 mixed-batch stores do to adapters people train, on the packaged SmolLM2-135M-Instruct.

Question: benchmarks/serve.py measures the stores' error with random adapters on random token ids, where
adapters move logits far more than trained ones do. Is the int8 store (``graft serve --stack-dtype int8``, a
quarter of fp32's bytes) good enough for adapters trained with grafting? For every adapter under the adapter
root (default: the three style adapters examples/serve_styles.py trains), on chat questions none of them was
trained on, all adapters in one mixed batch through the serving engine:
(1) greedy answers with each store against the fp32 store's: the share that are identical and the mean index of
    the first token that differs;
(2) teacher-forced over the fp32 answer: max |logit difference|, top-1 agreement per position and the mean
    KL(fp32 || store) per token; and how far the adapter itself moves the base (top-1 changed vs the base), the
    scale the store error is to be read against.
No timing. The last line printed is one JSON object with the figures.

    python examples/serve_styles.py --out runs/styles                     # once: trains the three adapters
    python benchmarks/serve_accuracy.py [--adapter-root runs/styles/adapters] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import grafting as gf  # noqa: E402
from grafting.serve import Engine, SamplingParams  # noqa: E402

from _common import header, rounded, table  # noqa: E402

STORES = {"bf16": torch.bfloat16, "int8": torch.int8}
QUESTIONS = [  # none is in ChatterBot's corpus the style adapters learn from
    "What should I cook for dinner tonight?", "How do airplanes stay in the air?", "Can you recommend a book?",
    "Why is the sky blue?", "What is a good way to learn a new language?", "Describe your ideal holiday.",
    "How do I keep a plant alive?", "What makes a good friend?", "Explain what a computer does.",
    "What do you think about rainy days?", "How can I sleep better?", "Tell me a fun fact about the ocean.",
]


def stores_of(base, adapters: dict) -> dict:
    """One AdaptedModel per store (None: fp32), each holding every adapter."""
    models = {}
    for key, dtype in {"fp32": None, **STORES}.items():
        m = gf.AdaptedModel(copy.deepcopy(base))
        for name, path in adapters.items():
            m.load_adapter(path, name=name)
        m.eval()
        m.set_stack_dtype(dtype)
        models[key] = m
    return models


def greedy_answers(model, tokenizer, prompts: list, names: list, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return [o.token_ids for o in Engine(model, tokenizer=tokenizer, max_batch=len(prompts)).generate(
        prompts, params, names)]


def first_difference(a: list, b: list) -> int:
    """Index of the first token where two answers differ (the shorter length if one is a prefix of the other)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else len(a)


def answer_logits(model, sequences: list, starts: list, names: list, adapter: bool = True) -> list:
    """Logits predicting each answer token, per row (right-padded batch; row i's answer from starts[i])."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    with torch.inference_mode():
        if adapter:
            logits = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits.float()
        else:
            with model.disabled():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return [logits[i, starts[i] - 1:len(s) - 1] for i, s in enumerate(sequences)]


def store_accuracy(base, tokenizer, adapters: dict, questions: list, max_tokens: int) -> dict:
    models = stores_of(base, adapters)
    prompts, names = [], []
    for q in questions:
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
        for name in adapters:
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            names.append(name)
    answers = {key: greedy_answers(m, tokenizer, prompts, names, max_tokens) for key, m in models.items()}
    sequences = [p + a for p, a in zip(prompts, answers["fp32"])]
    starts = [len(p) for p in prompts]
    ref = answer_logits(models["fp32"], sequences, starts, names)
    base_logits = answer_logits(models["fp32"], sequences, starts, names, adapter=False)
    ref_all, base_all = torch.cat(ref), torch.cat(base_logits)
    out = {"adapters": len(adapters), "answers": len(prompts), "answer_tokens": ref_all.shape[0],
           "logit_scale": ref_all.abs().max().item(),
           "adapter_max_abs_shift": (ref_all - base_all).abs().max().item(),
           "adapter_top1_changed": (ref_all.argmax(-1) != base_all.argmax(-1)).float().mean().item()}
    rows = []
    for key in STORES:
        got = torch.cat(answer_logits(models[key], sequences, starts, names))
        same = [a == b for a, b in zip(answers[key], answers["fp32"])]
        diverged = [first_difference(a, b) for a, b in zip(answers[key], answers["fp32"]) if a != b]
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref_all.log_softmax(-1), log_target=True,
                                        reduction="batchmean").item()
        out[key] = {"greedy_identical": sum(same) / len(same),
                    "first_difference_mean": sum(diverged) / len(diverged) if diverged else None,
                    "max_abs_logit_diff": (got - ref_all).abs().max().item(),
                    "top1_agreement": (got.argmax(-1) == ref_all.argmax(-1)).float().mean().item(),
                    "kl_per_token": kl}
        s = out[key]
        rows.append((f"{key} store", f"{100 * s['greedy_identical']:.0f}% ({sum(same)}/{len(same)})",
                     "-" if not diverged else f"{s['first_difference_mean']:.1f}",
                     f"{s['max_abs_logit_diff']:.2e}", f"{100 * s['top1_agreement']:.2f}%", f"{kl:.1e}"))
    table(f"{len(adapters)} adapters x {len(questions)} questions in one mixed batch, greedy answers up to "
          f"{max_tokens} tokens ({out['answer_tokens']} answer tokens); logits up to {out['logit_scale']:.1f}, "
          f"the adapters move them by up to {out['adapter_max_abs_shift']:.1f} and change the base's top token at "
          f"{100 * out['adapter_top1_changed']:.0f}% of positions", rows,
          columns=("store", "greedy answers identical to fp32", "first differing token (mean)",
                   "max |logit diff|", "top-1 agreement", "KL / token"))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter-root", default="runs/styles/adapters",
                    help="a directory of PEFT adapters for SmolLM2 (examples/serve_styles.py writes one)")
    ap.add_argument("--model", default="packaged:smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--questions", type=int, default=len(QUESTIONS))
    args = ap.parse_args(argv)
    from grafting.train.models import load_model
    root = Path(args.adapter_root)
    adapters = {d.name: d for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()} \
        if root.is_dir() else {}
    if not adapters:
        raise SystemExit(f"{root}: no adapters (run python examples/serve_styles.py --out {root.parent} first)")
    tokenizer, base = load_model(args.model, task="causal_lm")
    base.eval()
    header("Store accuracy on trained adapters", f"{args.model}, adapters {', '.join(adapters)}")
    figures = store_accuracy(base, tokenizer, adapters, QUESTIONS[:args.questions], args.max_tokens)
    print(json.dumps({"store_accuracy_trained": rounded(figures, 9)}))  # KL is ~1e-7
    return figures


if __name__ == "__main__":
    main()
