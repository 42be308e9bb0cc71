"""The adapter pool: registration without reading weights, LRU eviction within count and byte budgets, pinned
adapters never evicted, content-hash keys (a same-name reload never serves stale weights), clear refusals."""

from __future__ import annotations

import json
import time

import pytest
from pool_fixtures import GREEDY, fresh_pool, make_adapter_dirs, settle, wait_read

import grafting as gf
from grafting.serve import AdapterError, Engine


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    return make_adapter_dirs(tmp_path_factory.mktemp("adapters"))


def test_lru_eviction_keeps_at_most_max_loras_and_spares_pinned(adapter_dirs):
    dirs, _ = adapter_dirs
    pool = fresh_pool(max_loras=2)
    for name, d in dirs.items():
        pool.register(name, d)
    a0 = settle(pool, "ad0")
    a1 = settle(pool, "ad1")
    pool.release(a1)
    pool.release(a0)
    pool.release(settle(pool, "ad0"))  # ad0 used last: ad1 is now the least recently used
    a2 = settle(pool, "ad2")
    assert set(pool.model.adapter_names()) == {a0, a2} and pool.stats["evictions"] == 1
    held = settle(pool, "ad0")  # pinned from here on
    pool.release(a2)
    settle(pool, "ad3")  # ad2 goes, although ad0 is older: ad0 is held by a request
    assert held in pool.model.adapter_names() and len(pool.model.adapter_names()) == 2
    assert pool.stats["evictions"] == 2
    pool.close()


def test_pinned_adapters_block_loads_until_released(adapter_dirs):
    dirs, _ = adapter_dirs
    pool = fresh_pool(max_loras=1)
    pool.register("ad0", dirs["ad0"])
    pool.register("ad1", dirs["ad1"])
    held = settle(pool, "ad0")
    assert pool.acquire("ad1") is None
    time.sleep(0.2)
    pool.poll()
    assert pool.model.adapter_names() == [held] and pool.pending("ad1")  # read, waiting for room
    pool.release(held)
    pool.poll()
    assert pool.acquire("ad1") is not None and held not in pool.model.adapter_names()
    pool.close()


def test_byte_budget(adapter_dirs):
    dirs, _ = adapter_dirs
    size = sum(t.numel() * t.element_size() for t in gf.io.peft_format.read_tensors(dirs["ad3"]).values())
    pool = fresh_pool(max_loras=10, max_bytes=size + 10)
    pool.register("ad3", dirs["ad3"])
    pool.register("ad0", dirs["ad0"])
    pool.release(settle(pool, "ad3"))
    pool.release(settle(pool, "ad0"))  # does not fit next to the rank-32 one: it is evicted
    assert len(pool.resident) == 1 and pool.stats["evictions"] == 1
    pool.close()


def test_same_name_reload_never_serves_stale_weights(adapter_dirs, tmp_path):
    dirs, expected = adapter_dirs
    import shutil
    live = tmp_path / "live"
    shutil.copytree(dirs["ad0"], live)
    pool = fresh_pool(max_loras=4)
    pool.register("mine", live)
    engine = Engine(pool.model, pool=pool)

    def run():
        h = engine.submit([1, 2, 3], GREEDY, "mine")
        for _ in range(200):
            if h.request.finish_reason is not None:
                break
            engine.step()
            time.sleep(0.005)
        return h.result(timeout=1).token_ids

    assert run() == expected["ad0"]
    shutil.rmtree(live)
    shutil.copytree(dirs["ad1"], live)  # new weights, same name, same directory
    pool.register("mine", live)
    assert run() == expected["ad1"]
    assert pool.stats["loads"] == 2
    pool.close()


def test_two_names_with_the_same_content_share_one_resident_copy(adapter_dirs):
    dirs, _ = adapter_dirs
    pool = fresh_pool(max_loras=4)
    pool.register("x", dirs["ad1"])
    pool.register("y", dirs["ad1"])
    a, b = settle(pool, "x"), settle(pool, "y")
    assert a == b and len(pool.model.adapter_names()) == 1 and pool.stats["loads"] == 1
    pool.close()


def test_thousand_registered_adapters_serve_through_a_small_pool(adapter_dirs):
    dirs, expected = adapter_dirs
    pool = fresh_pool(max_loras=3)
    names = [f"user-{i}" for i in range(1000)]
    for i, name in enumerate(names):
        pool.register(name, dirs[f"ad{i % 6}"])
    assert len(pool.names()) == 1000 and pool.model.adapter_names() == []  # registering reads no weights
    engine = Engine(pool.model, pool=pool, max_batch=8)
    picks = [names[(37 * k) % 1000] for k in range(24)]
    handles = [engine.submit([1, 2, 3], GREEDY, n) for n in picks]
    for _ in range(2000):
        if all(h.request.finish_reason is not None for h in handles):
            break
        engine.step()
        time.sleep(0.002)
        assert len(pool.model.adapter_names()) <= 3
    for n, h in zip(picks, handles):
        out = h.result(timeout=1)
        assert out.finish_reason == "length", out.error
        assert out.token_ids == expected[f"ad{int(n.split('-')[1]) % 6}"]
    assert pool.stats["evictions"] > 0
    # modules were handed over to other adapters' weights (refill) on the way: each resident is sealed with
    # the hash of what it holds now, which is what the model computes itself
    for digest, res in pool._resident.items():
        assert pool.model._routing.sealed[res.internal][1] == digest == pool.model.content_hash(res.internal)
    pool.close()


def test_refusals_say_why(adapter_dirs, tmp_path):
    dirs, _ = adapter_dirs
    pool = fresh_pool(max_rank=16)
    with pytest.raises(AdapterError, match="rank 32, above this server's maximum 16"):
        pool.register("big", dirs["ad3"])
    with pytest.raises(gf.GraftingError, match="not an adapter directory"):
        pool.register("nowhere", tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps(json.loads((dirs["ad0"] / "adapter_config.json")
                                                                      .read_text())))
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 12)
    pool.register("broken", broken)
    assert pool.acquire("broken") is None
    wait_read(pool, "broken")
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        pool.acquire("broken")
    with pytest.raises(AdapterError, match="no adapter named 'ghost'"):
        pool.acquire("ghost")
    # reads fine, cannot install (its modules are not in this model): refused, and not kept in memory
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    config = json.loads((dirs["ad0"] / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_proj"]}))
    (foreign / "adapter_model.safetensors").write_bytes((dirs["ad0"] / "adapter_model.safetensors").read_bytes())
    pool.register("foreign", foreign)
    assert pool.acquire("foreign") is None
    wait_read(pool, "foreign")
    with pytest.raises(AdapterError, match="foreign"):
        pool.acquire("foreign")
    assert "foreign" not in pool.in_memory and pool.stats["load_errors"] == 2
    pool.close()


def test_engine_fails_only_the_request_whose_adapter_cannot_load(adapter_dirs, tmp_path):
    dirs, expected = adapter_dirs
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((dirs["ad0"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    pool = fresh_pool(max_loras=2)
    pool.register("good", dirs["ad0"])
    pool.register("bad", broken)
    engine = Engine(pool.model, pool=pool)
    good, bad = engine.submit([1, 2, 3], GREEDY, "good"), engine.submit([1, 2, 3], GREEDY, "bad")
    for _ in range(500):
        if good.request.finish_reason and bad.request.finish_reason:
            break
        engine.step()
        time.sleep(0.005)
    assert good.result().token_ids == expected["ad0"]
    out = bad.result()
    assert out.finish_reason == "error" and "safetensors" in out.error
    pool.close()


def test_preload_installs_up_to_max_loras_before_serving(adapter_dirs, tmp_path):
    dirs, expected = adapter_dirs
    pool = fresh_pool(max_loras=3)
    for name, d in dirs.items():
        pool.register(name, d)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                                      "target_modules": ["c_attn"]}))
    pool.register("bad", tmp_path / "bad")  # no weights: preload leaves it out, its requests get the error
    assert pool.preload(["bad", "ad0", "ad3", "ad5"]) == ["ad0", "ad3"]  # the first max_loras names are tried
    assert len(pool.resident) == 2 and pool.stats["loads"] == 2
    stacks = [h._stack for _, h in pool.model.hosts() if h.kind.gathered]
    assert stacks and all(len(s.keys) == 2 for s in stacks)  # in the mixed-batch stacks too
    versions = [s.version for s in stacks]
    engine = Engine(pool.model, pool=pool)
    out = engine.generate([[1, 2, 3]] * 2, GREEDY, ["ad0", "ad3"])
    assert [o.token_ids for o in out] == [expected["ad0"], expected["ad3"]]
    assert [s.version for s in stacks] == versions  # serving wrote no slot
    assert engine.stats["steps"] == GREEDY.max_tokens - 1  # no step waited for a read (prefill + decode share one)
    with pytest.raises(AdapterError, match="no adapter named 'nobody'"):
        pool.preload(["nobody"])
    with pytest.raises(AdapterError, match="bad"):
        pool.acquire("bad")


def test_installed_adapters_carry_the_hash_the_loader_computed_and_it_is_the_models_own(adapter_dirs):
    from grafting.hashing import adapter_hash, adopt_hash
    from grafting.io.peft_format import adapter_tensors
    dirs, _ = adapter_dirs
    pool = fresh_pool(max_loras=6)
    for name, d in dirs.items():
        pool.register(name, d)
    pool.preload()
    model = pool.model
    for digest, res in pool._resident.items():
        assert model._hashes[res.internal][1] == digest  # adopted at install: no hashing on first use
        assert model._routing.sealed[res.internal][1] == digest  # and sealed: steps do not re-check its tensors
        model._hashes.pop(res.internal)
        assert model.content_hash(res.internal) == digest  # and it is what the model computes itself
    name = next(iter(pool._resident.values())).internal
    config, tensors = model.peft_config[name], dict(adapter_tensors(model, name))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1  # not what the model holds: refused
    assert not adopt_hash(model, name, config, tensors, adapter_hash(config, tensors))
    assert model.content_hash(name) != adapter_hash(config, tensors)
