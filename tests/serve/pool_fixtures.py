"""What the adapter-pool tests share: six adapters on disk with their expected greedy outputs, and helpers that
wait for the pool's loader thread (a plain module: every test directory's conftest is "conftest")."""

from __future__ import annotations

import time

from serving_models import add_random_adapter, tiny_lm

import grafting as gf
from grafting.serve import AdapterPool, Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def make_adapter_dirs(root):
    """Six gpt2 adapters saved under ``root`` (ranks 4..32, one DoRA) and the expected greedy output of each."""
    model = gf.AdaptedModel(tiny_lm("gpt2"))
    dirs, expected = {}, {}
    for i, r in enumerate([4, 8, 16, 32, 8, 4]):
        name = f"ad{i}"
        add_random_adapter(model, name, "gpt2", r=r, seed=10 + i, use_dora=(i == 2))
        model.save_adapter(root / name, name=name)
        dirs[name] = root / name
    for name in dirs:
        expected[name] = Engine(model).generate([[1, 2, 3]], GREEDY, [name])[0].token_ids
    return dirs, expected


def fresh_pool(**kwargs):
    return AdapterPool(gf.AdaptedModel(tiny_lm("gpt2")), **kwargs)


def settle(pool, name):
    """Acquire ``name``, waiting for the loader thread; returns the model-side name (pinned)."""
    for _ in range(500):
        got = pool.acquire(name)
        if got is not None:
            return got
        time.sleep(0.01)
        pool.poll()
    raise AssertionError(f"{name} never became resident")


def wait_read(pool, name):
    """Poll until the loader thread finished with ``name`` (read, installed or failed)."""
    for _ in range(100):
        time.sleep(0.01)
        pool.poll()
        if not pool.pending(name):
            return
