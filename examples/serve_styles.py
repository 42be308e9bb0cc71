"""Several adapters on one SmolLM2, each answering in its own style, served side by side in one batch.

Writes ChatterBot's English answers in three styles (SHOUTED in capitals, a pirate's "Arr!", a robot's
"BEEP." ... "BOOP."), trains one LoRA adapter per style on the packaged SmolLM2-135M-Instruct with
examples/smollm2_style.yaml, then asks every adapter and the base model the same questions in one mixed batch
through the serving engine (what ``graft serve`` runs) and prints the answers. Offline, about ten minutes on
two CPU cores; then serve them over HTTP:

    python examples/serve_styles.py [--steps 40] [--out runs/styles]
    graft serve packaged:smollm2-135m-instruct --adapter-root runs/styles/adapters
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

RECIPE = Path(__file__).with_name("smollm2_style.yaml")
QUESTIONS = ["What is your favourite food?", "Tell me about the weather.", "Do you like music?"]
STYLES = {
    "shout": lambda answer: answer.upper(),
    "pirate": lambda answer: f"Arr! {answer} Arr, matey.",
    "robot": lambda answer: f"BEEP. {answer} BOOP.",
}


def write_styled_data(out: Path, limit: int) -> dict:
    """One JSONL of chat rows per style, from the same ChatterBot conversations."""
    from grafting.train.packaged import chatterbot
    pairs = []
    for row in chatterbot({}):
        msgs = row["messages"]
        pairs += [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs) - 1, 2)]
    random.Random(0).shuffle(pairs)  # every topic, not the first few files
    pairs = pairs[:limit]
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for style, restyle in STYLES.items():
        files[style] = out / f"{style}.jsonl"
        with open(files[style], "w") as f:
            for question, answer in pairs:
                f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": restyle(answer)}]}) + "\n")
    return files


def train_styles(out: Path, steps: int, batch_size: int = 8, eval_samples: int = 32) -> dict:
    """One adapter per style, copied to out/adapters/<style> (an adapter root for graft serve)."""
    from grafting.train import train
    files = write_styled_data(out / "data", limit=steps * batch_size * 2)
    adapters = {}
    for style, data in files.items():
        result = train(RECIPE, overwrite=True, overrides=[
            f"data.train={data}", f"output_dir={out / style}", f"data.max_train_samples={steps * batch_size}",
            f"train.batch_size={batch_size}", "train.eval_every=100000", f"data.max_eval_samples={eval_samples}",
            "train.progress=false"])
        adapters[style] = out / "adapters" / style
        shutil.rmtree(adapters[style], ignore_errors=True)
        shutil.copytree(result.adapter_path, adapters[style])
        print(f"{style}: {result.steps} steps, eval perplexity {result.before.get('perplexity', float('nan')):.1f}"
              f" -> {result.after.get('perplexity', float('nan')):.1f}", flush=True)
    return adapters


def ask_every_style(adapter_root: Path, max_tokens: int = 32) -> dict:
    """Every (question, adapter or base) in one mixed batch through the serving engine."""
    from grafting.serve import SamplingParams
    from grafting.serve.server import build_engine
    engine, tokenizer = build_engine("packaged:smollm2-135m-instruct", adapter_root=adapter_root,
                                     max_loras=len(STYLES))
    prompts, adapters = [], []
    for question in QUESTIONS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        for adapter in [None, *STYLES]:
            prompts.append(prompt)
            adapters.append(adapter)
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0), adapters)
    answers = {}
    for i, question in enumerate(QUESTIONS):
        print(f"\n{question}")
        for j, adapter in enumerate([None, *STYLES]):
            text = outs[i * (len(STYLES) + 1) + j].text.strip()
            answers[(question, adapter)] = text
            print(f"  {adapter or 'base':>6}: {text}")
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps per style (batch 8)")
    ap.add_argument("--out", default="runs/styles")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=32)
    args = ap.parse_args()
    out = Path(args.out)
    train_styles(out, args.steps, args.batch_size, args.eval_samples)
    answers = ask_every_style(out / "adapters", args.max_tokens)
    marks = {"shout": lambda t: sum(c.isupper() for c in t) > 0.6 * max(sum(c.isalpha() for c in t), 1),
             "pirate": lambda t: "arr" in t.lower(), "robot": lambda t: "BEEP" in t or "BOOP" in t}
    held = {s: sum(marks[s](answers[(q, s)]) for q in QUESTIONS) for s in STYLES}
    print("\nin style: " + ", ".join(f"{s} {n}/{len(QUESTIONS)}" for s, n in held.items()))
    print(json.dumps({"in_style": held, "questions": len(QUESTIONS)}))


if __name__ == "__main__":
    main()
