"""AdapterPool.load (an explicit load: files read and checked against the model before the name registers,
the model untouched) against register (config only), and the adapter root, which every read of a confined
registration's files must stay inside: symlinked files and files swapped after registration are refused; and a
slow read, which never holds up the running batch."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from serving_models import add_random_adapter, tiny_lm

import grafting as gf
from grafting.serve import AdapterError, AdapterPool, Engine, SamplingParams
from grafting.serve import pool as pool_module

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three gpt2 adapters (one DoRA) in a root and copies outside it, with each one's greedy output."""
    base = tmp_path_factory.mktemp("load")
    model = gf.AdaptedModel(tiny_lm("gpt2"))
    expected = {}
    for i, name in enumerate(("a", "b", "c")):
        add_random_adapter(model, name, "gpt2", r=4 * (i + 1), seed=40 + i, use_dora=(name == "c"))
        model.save_adapter(base / "root" / name, name=name)
        model.save_adapter(base / "outside" / name, name=name)
        expected[name] = Engine(model).generate([[1, 2, 3]], GREEDY, [name])[0].token_ids
    return base / "root", base / "outside", expected


def fresh_pool(**kwargs):
    return AdapterPool(gf.AdaptedModel(tiny_lm("gpt2")), **kwargs)


def serve(pool, name):
    """Greedy token ids of adapter ``name`` through the pool (AdapterError if it cannot load)."""
    out = Engine(pool.model, pool=pool).generate([[1, 2, 3]], GREEDY, [name])[0]
    if out.finish_reason == "error":
        raise AdapterError(out.error)
    return out.token_ids


def variant(src, dst, config=None, tensors=None):
    """A copy of adapter ``src`` at ``dst`` with its config updated by ``config`` and tensors by ``tensors``."""
    shutil.copytree(src, dst)
    if config is not None:
        (dst / CONFIG).write_text(json.dumps({**json.loads((src / CONFIG).read_text()), **config}))
    if tensors is not None:
        save_file({**load_file(src / WEIGHTS), **tensors}, dst / WEIGHTS)
    return dst


def test_a_load_reads_once_checks_without_touching_the_model_and_serves(adapters):
    root, _, expected = adapters
    pool = fresh_pool(max_loras=1)
    structure = [n for n, _ in pool.model.named_modules()]
    pool.load("a", root / "a")
    pool.load("c", root / "c")
    assert [n for n, _ in pool.model.named_modules()] == structure and not pool.model.peft_config
    assert set(pool.in_memory) == {"c"}  # max_cpu_loras defaults to max_loras: the last read pushed a out
    assert serve(pool, "c") == expected["c"] and serve(pool, "a") == expected["a"]
    assert pool.stats["reads"] == 1  # c came from the copy its load read; a was read again
    pool.close()


def test_a_load_that_could_never_serve_is_refused_and_the_name_keeps_what_it_had(adapters, tmp_path):
    root, _, expected = adapters
    key = next(k for k in load_file(root / "a" / WEIGHTS) if k.endswith("lora_A.weight"))
    bad = {
        "garbage": (None, None, "adapter_model.safetensors: not a readable safetensors file"),
        "targets": ({"target_modules": ["no_such_proj"]}, None, "matched no module"),
        "shape": (None, {key: torch.zeros(3, 3)}, f"tensor '{key}' has shape (3, 3), expected"),
        "extra": (None, {"base_model.model.stray.weight": torch.zeros(2)}, "unexpected tensors"),
        "nan": (None, {key: torch.full(load_file(root / "a" / WEIGHTS)[key].shape, float("nan"))}, "NaN"),
        "rank": ({"r": 64}, None, "rank 64, above this server's maximum 32"),
    }
    pool = fresh_pool(max_loras=2, max_rank=32)
    pool.register("kept", root / "b")
    for case, (config, tensors, says) in bad.items():
        d = variant(root / "a", tmp_path / case, config, tensors)
        if case == "garbage":
            (d / WEIGHTS).write_bytes(b"\x00" * 16)
        with pytest.raises(AdapterError, match=re.escape(says)) as err:
            pool.load("kept", d)
        assert str(d) in str(err.value)  # which adapter's files
        with pytest.raises(AdapterError, match=re.escape(says)):
            pool.load("new", d)
    assert pool.names() == ["kept"] and pool.path("kept") == root / "b"
    assert serve(pool, "kept") == expected["b"]
    pool.register("lazy", tmp_path / "garbage")  # a registration reads the config only: refused when used
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        serve(pool, "lazy")
    pool.close()


def test_a_root_refuses_what_resolves_outside_it_at_registration(adapters, tmp_path):
    root, outside, expected = adapters
    scratch = tmp_path / "root"
    shutil.copytree(root, scratch)
    (scratch / "dirlink").symlink_to(outside / "a", target_is_directory=True)
    (scratch / "filelink").mkdir()
    shutil.copy(outside / "a" / CONFIG, scratch / "filelink" / CONFIG)
    (scratch / "filelink" / WEIGHTS).symlink_to(outside / "a" / WEIGHTS)
    (scratch / "configlink").mkdir()
    shutil.copy(outside / "a" / WEIGHTS, scratch / "configlink" / WEIGHTS)
    (scratch / "configlink" / CONFIG).symlink_to(outside / "a" / CONFIG)
    pool = fresh_pool(root=scratch)
    for name, what in [("dirlink", "the directory"), ("filelink", WEIGHTS), ("configlink", CONFIG)]:
        for add in (pool.register, pool.load):
            with pytest.raises(AdapterError, match=f"{what} resolves outside the adapter root"):
                add(name, scratch / name)
    with pytest.raises(AdapterError, match="outside the adapter root"):
        pool.register("far", outside / "a")
    pool.register("far", outside / "a", root=None)  # named by the operator (graft serve --adapter)
    assert serve(pool, "far") == expected["a"]
    with pytest.raises(AdapterError, match="not a usable adapter path"):
        pool.register("nul", scratch / "a\x00b")
    pool.close()


@pytest.mark.parametrize("how", ["register", "load"])
def test_files_swapped_for_symlinks_after_registration_are_refused_at_the_next_read(adapters, tmp_path, how):
    root, outside, expected = adapters
    scratch = tmp_path / "root"
    shutil.copytree(root, scratch)
    pool = fresh_pool(root=scratch, max_loras=1, max_cpu_loras=0)  # no host copies: every switch reads
    getattr(pool, how)("swap", scratch / "a")
    pool.register("b", scratch / "b")
    assert serve(pool, "swap") == expected["a"]
    (scratch / "a" / WEIGHTS).unlink()  # a file, not the directory, now points outside
    (scratch / "a" / WEIGHTS).symlink_to(outside / "b" / WEIGHTS)
    assert serve(pool, "b") == expected["b"]  # evicts swap
    with pytest.raises(AdapterError, match=f"{WEIGHTS} resolves outside the adapter root"):
        serve(pool, "swap")
    pool.close()


def test_registering_many_reads_only_configs(adapters, tmp_path):
    root, _, _ = adapters
    pool = fresh_pool(root=tmp_path)
    d = variant(root / "a", tmp_path / "a")
    (d / WEIGHTS).write_bytes(b"unread")  # register never opens it
    for i in range(1000):
        pool.register(f"n{i}", d)
    assert len(pool.names()) == 1000 and pool.stats["reads"] == 0 and not pool.in_memory
    pool.close()


def test_a_slow_read_never_holds_up_the_running_batch(adapters, monkeypatch):
    """One adapter's files are slow to read (held until the test lets them go): a request on a resident adapter
    keeps decoding to its end meanwhile, since reads run on the loader thread and never inside a step."""
    root, _, expected = adapters
    pool = fresh_pool(max_loras=2)
    pool.register("resident", root / "a")
    pool.register("slow", root / "b")
    assert pool.preload(["resident"]) == ["resident"]
    started, gate, done = threading.Event(), threading.Event(), threading.Event()
    read = pool_module.read_adapter

    def slow_read(path, *args, **kwargs):
        if Path(path).name != "b":
            return read(path, *args, **kwargs)
        started.set()
        gate.wait(5)  # a disk that takes its time; 5 s at most, so a read that blocks the step loop ends
        try:
            return read(path, *args, **kwargs)
        finally:
            done.set()

    monkeypatch.setattr(pool_module, "read_adapter", slow_read)
    engine = Engine(pool.model, pool=pool)
    try:
        resident = engine.submit([1, 2, 3], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
                                 "resident")
        engine.step()
        engine.step()
        slow = engine.submit([1, 2, 3], GREEDY, "slow")
        engine.step()  # asks the pool for "slow": its read starts
        assert started.wait(10), "the slow adapter was never read"
        at_read_start = resident.request.completion_tokens
        assert 2 <= at_read_start < 60
        for _ in range(100):
            if resident.request.finish_reason is not None:
                break
            engine.step()
        assert not done.is_set(), "the running batch waited for the read"
        assert pool.pending("slow") and slow.request.finish_reason is None and not slow.request.output_ids
        assert resident.request.finish_reason == "length"  # 58 or so tokens decoded while the read was held
        assert resident.result(timeout=1).token_ids[:8] == expected["a"]
        gate.set()
        for _ in range(500):
            if slow.request.finish_reason is not None:
                break
            engine.step()
            time.sleep(0.01)
        assert slow.result(timeout=1).token_ids == expected["b"]
    finally:
        gate.set()
        pool.close()
