"""Serving on an NF4 base: the engine's mixed batches on a 4-bit checkpoint equal transformers' generate per
adapter, DoRA included, with adapters paged in through the pool."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import grafting as gf
from grafting.quant import from_pretrained, quantize, save_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from serving_models import add_random_adapter, tiny_lm  # noqa: E402

from grafting.serve import AdapterPool, Engine, SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12], [3], [5, 6, 7]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_on_a_4bit_checkpoint_matches_generate_per_adapter(arch, tmp_path):
    save_pretrained(quantize(tiny_lm(arch)), tmp_path / "base")
    trainer = gf.AdaptedModel(from_pretrained(tmp_path / "base"))
    for name, seed, dora in (("a", 1, False), ("b", 2, False), ("c", 3, True)):
        add_random_adapter(trainer, name, arch, r=4 * seed, seed=seed, use_dora=dora)
        trainer.save_adapter(tmp_path / name, name=name)

    served = gf.AdaptedModel(from_pretrained(tmp_path / "base"))
    pool = AdapterPool(served, max_loras=2)  # smaller than the set: adapters page in and out
    for name in "abc":
        pool.register(name, tmp_path / name)
    adapters = ["a", "b", None, "c", "a"]
    outs = Engine(served, pool=pool).generate(PROMPTS, GREEDY, adapters)
    for prompt, adapter, out in zip(PROMPTS, adapters, outs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            if adapter is None:
                with trainer.disabled():
                    ref = trainer.base_model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                                      pad_token_id=0)
            else:
                trainer.set_active(adapter)
                ref = trainer.base_model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                                  pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist(), adapter
    assert len({tuple(o.token_ids) for o in outs}) > 2
