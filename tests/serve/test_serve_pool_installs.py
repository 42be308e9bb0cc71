"""The adapter pool's installs: queued requests read each adapter once, the host tier (evicted adapters come
back without a read, preload beyond the pool), installs laid out for the mixed-batch store, adapters taking
over an evicted one's modules, and eval mode for what the pool installs."""

from __future__ import annotations

import json
import time

import pytest
import torch
from pool_fixtures import GREEDY, fresh_pool, make_adapter_dirs, settle, wait_read
from serving_models import add_random_adapter, tiny_lm

import grafting as gf
from grafting.serve import AdapterError, AdapterPool, Engine, SamplingParams


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    return make_adapter_dirs(tmp_path_factory.mktemp("adapters"))


def run_all(engine, handles, steps: int = 3000):
    for _ in range(steps):
        if all(h.request.finish_reason is not None for h in handles):
            return
        engine.step()
        time.sleep(0.001)
    raise AssertionError("requests did not finish")


def test_queued_requests_for_more_adapters_than_the_pool_holds_read_each_once(adapter_dirs):
    dirs, expected = adapter_dirs
    pool = fresh_pool(max_loras=2, max_cpu_loras=0)  # no host tier: a second install would read again
    for name, d in dirs.items():
        pool.register(name, d)
    engine = Engine(pool.model, pool=pool, max_batch=2)
    names = list(dirs)
    handles = [engine.submit([1, 2, 3], GREEDY, n) for n in names]
    engine.step()
    # only what fits is read now; the rest wait their turn (pending, so the loop does not spin on them)
    assert pool._deferred == set(names[2:]) and all(pool.pending(n) for n in names[2:])
    run_all(engine, handles)
    assert [h.result().token_ids for h in handles] == [expected[n] for n in names]
    # read and installed once each: before, every queued request's adapter was read at once and most were
    # evicted again before their request ran
    assert pool.stats["reads"] == len(names) and pool.stats["loads"] == len(names)
    pool.close()


def test_evicted_adapters_come_back_from_the_host_tier_without_a_read(adapter_dirs, tmp_path):
    dirs, expected = adapter_dirs
    pool = fresh_pool(max_loras=1, max_cpu_loras=3)
    for name in ("ad0", "ad1", "ad4"):
        pool.register(name, dirs[name])
    for name in ("ad0", "ad1", "ad4", "ad0", "ad1"):  # each install evicts the previous adapter
        pool.release(settle(pool, name))
    assert pool.stats["reads"] == 3 and pool.stats["loads"] == 5 and pool.stats["evictions"] == 4
    assert pool.in_memory == ["ad4", "ad0", "ad1"]
    engine = Engine(pool.model, pool=pool)
    assert engine.generate([[1, 2, 3]], GREEDY, ["ad4"])[0].token_ids == expected["ad4"]  # from memory
    assert pool.stats["reads"] == 3
    # an installed adapter holds its host copy's tensors, not copies of them
    internal = settle(pool, "ad4")
    host = next(h for _, h in pool.model.hosts() if internal in h.adapters)
    copy = pool._host["ad4"].tensors
    ptrs = {t.data_ptr() for t in copy.values()}
    assert host.adapters[internal].lora_A.data_ptr() in ptrs
    pool.release(internal)
    # re-registering a name drops its host copy: the new registration reads its files
    pool.register("ad0", dirs["ad5"])
    assert "ad0" not in pool.in_memory
    pool.release(settle(pool, "ad0"))
    assert pool.stats["reads"] == 4
    assert engine.generate([[1, 2, 3]], GREEDY, ["ad0"])[0].token_ids == expected["ad5"]
    # a tier of 0 keeps nothing
    none = fresh_pool(max_loras=1, max_cpu_loras=0)
    none.register("ad0", dirs["ad0"])
    none.register("ad1", dirs["ad1"])
    for name in ("ad0", "ad1", "ad0"):
        none.release(settle(none, name))
    assert none.stats["reads"] == 3 and none.in_memory == []
    with pytest.raises(gf.GraftingError, match="max_cpu_loras: expected >= 0"):
        fresh_pool(max_cpu_loras=-1)
    pool.close()
    none.close()


def test_preload_reads_adapters_beyond_the_pool_into_the_host_tier(adapter_dirs):
    dirs, expected = adapter_dirs
    pool = fresh_pool(max_loras=2, max_cpu_loras=5)
    for name, d in dirs.items():
        pool.register(name, d)
    assert pool.preload() == ["ad0", "ad1"]
    assert pool.in_memory == ["ad0", "ad1", "ad2", "ad3", "ad4"] and pool.stats["reads"] == 5
    engine = Engine(pool.model, pool=pool, max_batch=2)
    out = engine.generate([[1, 2, 3]] * 3, GREEDY, ["ad2", "ad3", "ad4"])
    assert [o.token_ids for o in out] == [expected[n] for n in ("ad2", "ad3", "ad4")]
    assert pool.stats["reads"] == 5  # all three came from memory
    # the host tier's byte budget: the least recently used copies go first
    small = fresh_pool(max_loras=1, max_cpu_loras=6, max_cpu_bytes=sum(
        t.numel() * t.element_size() for t in pool._host["ad0"].tensors.values()) + 1)
    for name, d in dirs.items():
        small.register(name, d)
    small.preload(["ad0", "ad1", "ad5"])
    assert small.in_memory == ["ad5"]  # ad1 alone is over the budget; ad5 (ad0's size) pushed ad0 out
    pool.close()
    small.close()


def test_a_nan_adapter_is_refused_by_the_loader_with_the_file_named(adapter_dirs, tmp_path):
    from safetensors.torch import load_file, save_file
    dirs, _ = adapter_dirs
    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((dirs["ad0"] / "adapter_config.json").read_text())
    tensors = load_file(dirs["ad0"] / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    pool = fresh_pool()
    pool.register("nan", bad)
    assert pool.acquire("nan") is None
    for _ in range(200):
        time.sleep(0.01)
        pool.poll()
        if not pool.pending("nan"):
            break
    with pytest.raises(AdapterError, match=f"adapter_model.safetensors: tensor '{key}' holds NaN"):
        pool.acquire("nan")
    assert pool.model.adapter_names() == []
    pool.close()


@pytest.mark.parametrize("first", ["one_token", "expired"])
def test_a_request_deferred_behind_one_that_finished_at_once_still_runs(adapter_dirs, first):
    """The pool holds one adapter; the first request takes its room and is gone within the same step (one
    token, or its deadline already passed). The second one's adapter was deferred behind it: the loop must read
    it after all instead of sleeping on a stale 'waits its turn'."""
    dirs, expected = adapter_dirs
    pool = fresh_pool(max_loras=1)
    pool.register("ad0", dirs["ad0"])
    pool.register("ad1", dirs["ad1"])
    pool.release(settle(pool, "ad0"))  # resident, unpinned: ad0's request is admitted on the first step
    engine = Engine(pool.model, pool=pool)
    if first == "one_token":
        head = engine.submit([1, 2, 3], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), "ad0")
    else:
        head = engine.submit([1, 2, 3], GREEDY, "ad0", timeout=1e-9)
    tail = engine.submit([1, 2, 3], GREEDY, "ad1")
    engine.start()
    try:
        assert tail.result(timeout=20).token_ids == expected["ad1"]
        assert head.result(timeout=5).finish_reason == ("length" if first == "one_token" else "timeout")
    finally:
        engine.stop(drain=False, timeout=10)


def test_installed_factors_are_the_host_copys_laid_out_for_the_store(adapter_dirs):
    """The loader lays LoRA factors out as the store keeps them (transposed views of contiguous tensors); the
    install shares them, so the store's write is a contiguous copy and the host tier holds the only copy."""
    dirs, expected = adapter_dirs
    pool = fresh_pool(max_loras=2)
    pool.register("ad1", dirs["ad1"])
    internal = settle(pool, "ad1")
    held = pool._host["ad1"].tensors
    hosts = [(n, h) for n, h in pool.model.hosts() if internal in h.adapters]
    assert hosts
    for module_name, host in hosts:
        A, B = host.adapters[internal].lora_A, host.adapters[internal].lora_B
        assert A.t().is_contiguous() and not A.is_contiguous() and B.t().is_contiguous()
        key = next(k for k in held if k.endswith(f"{module_name}.lora_A.weight"))
        assert A.data_ptr() == held[key].data_ptr()
    pool.release(internal)
    engine = Engine(pool.model, pool=pool)
    assert engine.generate([[1, 2, 3]], GREEDY, ["ad1"])[0].token_ids == expected["ad1"]
    pool.close()


def _modules_of(model, internal):
    return [h.adapters[internal] for _, h in model.hosts() if internal in h.adapters]


def test_an_adapter_with_the_evicted_ones_config_takes_over_its_modules(adapter_dirs, tmp_path):
    """ad1 and ad4 share a config (r=8): installing one in the other's place hands the modules over and only
    the weights change. The host tier's copies, which the parameters shared, are never written; a half-precision
    file with the same config is copied into storage of its own."""
    from safetensors.torch import load_file, save_file
    dirs, expected = adapter_dirs
    half = tmp_path / "ad4_half"
    half.mkdir()
    (half / "adapter_config.json").write_text((dirs["ad4"] / "adapter_config.json").read_text())
    save_file({k: t.half() for k, t in load_file(dirs["ad4"] / "adapter_model.safetensors").items()},
              half / "adapter_model.safetensors")
    reference = fresh_pool(max_loras=1)
    reference.register("ad4_half", half)
    reference.release(settle(reference, "ad4_half"))
    want_half = Engine(reference.model, pool=reference).generate([[1, 2, 3]], GREEDY, ["ad4_half"])[0].token_ids
    reference.close()

    pool = fresh_pool(max_loras=1, max_cpu_loras=4)
    for name in ("ad1", "ad4", "ad0"):
        pool.register(name, dirs[name])
    pool.register("ad4_half", half)
    engine = Engine(pool.model, pool=pool)
    first = settle(pool, "ad1")
    modules = _modules_of(pool.model, first)
    pool.release(first)
    kept = {k: t.clone() for k, t in pool._host["ad1"].tensors.items()}
    for name, want in (("ad4", expected["ad4"]), ("ad4_half", want_half), ("ad1", expected["ad1"]),
                       ("ad4", expected["ad4"])):
        internal = settle(pool, name)
        assert internal == first and pool.model.adapter_names() == [first]
        assert all(a is b for a, b in zip(_modules_of(pool.model, internal), modules, strict=True))
        pool.release(internal)
        assert engine.generate([[1, 2, 3]], GREEDY, [name])[0].token_ids == want
    assert all(torch.equal(pool._host["ad1"].tensors[k], t) for k, t in kept.items())
    assert pool.stats["loads"] == 5 and pool.stats["evictions"] == 4
    other = settle(pool, "ad0")  # r=4: another config, new modules
    assert other != first and pool.model.adapter_names() == [other]
    pool.release(other)
    assert engine.generate([[1, 2, 3]], GREEDY, ["ad0"])[0].token_ids == expected["ad0"]
    pool.close()


def test_the_least_recently_used_adapter_with_the_same_config_gives_up_its_modules(adapter_dirs):
    """ad0 (r=4) is the least recently used resident, ad1 (r=8) the most recent: ad4 (r=8, ad1's config) takes
    over ad1's modules rather than evicting ad0 and building new ones; ad0 stays resident."""
    dirs, expected = adapter_dirs
    pool = fresh_pool(max_loras=2, max_cpu_loras=4)
    for name in ("ad0", "ad1", "ad4"):
        pool.register(name, dirs[name])
    engine = Engine(pool.model, pool=pool)
    for name in ("ad0", "ad1"):
        pool.release(settle(pool, name))
    ad0, ad1 = (pool._resident[pool._registered[n].digest].internal for n in ("ad0", "ad1"))
    internal = settle(pool, "ad4")
    pool.release(internal)
    assert internal == ad1 and sorted(pool.model.adapter_names()) == sorted([ad0, ad1])
    assert pool._registered["ad0"].digest in pool._resident and pool._registered["ad1"].digest not in pool._resident
    assert engine.generate([[1, 2, 3]], GREEDY, ["ad4"])[0].token_ids == expected["ad4"]
    pool.close()


def test_an_adapter_evicted_for_another_config_keeps_its_modules_for_the_next_with_its_own(adapter_dirs):
    """max_loras 1, one spare: ad0 (r=4) evicts ad1 (r=8), whose modules stay in the model unserved; ad4 (r=8,
    ad1's config) then takes them (the same module objects, ad4's outputs) and ad0's go aside in turn, the
    spare of the config being installed kept over the older one of another config."""
    dirs, expected = adapter_dirs
    pool = fresh_pool(max_loras=1, max_spares=1, max_cpu_loras=4)
    for name in ("ad0", "ad1", "ad4"):
        pool.register(name, dirs[name])
    engine = Engine(pool.model, pool=pool)
    first = settle(pool, "ad1")
    modules = _modules_of(pool.model, first)
    pool.release(first)
    second = settle(pool, "ad0")
    pool.release(second)
    assert second != first and sorted(pool.model.adapter_names()) == sorted([first, second])
    assert pool.resident == [pool._registered["ad0"].digest]  # the spare is not resident: nothing routes to it
    assert engine.generate([[1, 2, 3]], GREEDY, ["ad0"])[0].token_ids == expected["ad0"]
    third = settle(pool, "ad4")
    pool.release(third)
    assert third == first and all(a is b for a, b in zip(_modules_of(pool.model, third), modules, strict=True))
    assert sorted(pool.model.adapter_names()) == sorted([first, second])  # ad0's modules are the spare now
    assert engine.generate([[1, 2, 3]], GREEDY, ["ad4"])[0].token_ids == expected["ad4"]
    assert pool.stats["loads"] == 3 and pool.stats["evictions"] == 2
    back = settle(pool, "ad0")  # takes its own modules back from the spare
    pool.release(back)
    assert back == second and engine.generate([[1, 2, 3]], GREEDY, ["ad0"])[0].token_ids == expected["ad0"]
    pool.close()


def test_spares_count_against_the_byte_budget_and_go_before_residents(adapter_dirs):
    """A byte budget that holds one adapter: the evicted one's modules cannot stay aside, and a pool with room
    for more adapters but not more bytes drops spares before it evicts anything resident."""
    from grafting.serve.host_tier import read_adapter, tensor_bytes

    dirs, expected = adapter_dirs
    sizes = {n: tensor_bytes(read_adapter(dirs[n], None)[2]) for n in ("ad0", "ad1", "ad3")}
    pool = fresh_pool(max_loras=4, max_spares=2, max_bytes=sizes["ad3"] + sizes["ad0"], max_cpu_loras=4)
    for name in ("ad0", "ad1", "ad3"):
        pool.register(name, dirs[name])
    engine = Engine(pool.model, pool=pool)
    for name in ("ad1", "ad0"):
        pool.release(settle(pool, name))
    assert len(pool.model.adapter_names()) == 2 and not pool._spares
    # r=32 fits beside ad0 only: ad1 (least recent) is set aside, then dropped for the bytes before ad0 goes
    pool.release(settle(pool, "ad3"))
    assert len(pool.resident) == 2 and len(pool.model.adapter_names()) == 2 and not pool._spares
    for name in ("ad0", "ad3"):
        assert engine.generate([[1, 2, 3]], GREEDY, [name])[0].token_ids == expected[name]
    pool.close()


def test_a_served_pool_reserves_store_room_for_its_spares_and_never_reallocates_it(tmp_path):
    """build_engine reserves every layer's stack for the resident adapters and the spares (max_loras // 4 by
    default); twelve adapters of two configs turning over through eight, with modules set aside and taken
    back, leave every stack where it was and serve each adapter's own outputs."""
    from grafting.serve.server import build_engine

    tiny_lm("gpt2").save_pretrained(tmp_path / "gpt2")
    source = gf.AdaptedModel(tiny_lm("gpt2"))
    for i in range(12):
        add_random_adapter(source, f"x{i}", "gpt2", r=16 if i % 2 else 12, seed=70 + i)  # one bucket, two configs
        source.save_adapter(tmp_path / "adapters" / f"x{i}", name=f"x{i}")
    expected = {f"x{i}": Engine(source).generate([[1, 2, 3]], GREEDY, [f"x{i}"])[0].token_ids for i in range(12)}
    engine, _ = build_engine(str(tmp_path / "gpt2"), adapter_root=str(tmp_path / "adapters"), max_loras=8,
                             max_lora_rank=16, max_cpu_loras=12)
    pool = engine.pool
    assert pool.max_spares == 2 and pool.max_installed == 10 and not pool.model.adapter_names()
    pool.release(settle(pool, "x0"))  # the server started with no adapter: its layers' stacks are made now
    assert engine.generate([[1, 2, 3]], GREEDY, ["x0"])[0].token_ids == expected["x0"]
    stacks = [h._stack for _, h in pool.model.hosts()]
    assert stacks and all(st.buckets[16].capacity == pool.max_installed + 1 for st in stacks)
    where = [st.buckets[16].A_t.data_ptr() for st in stacks]
    held = {n: settle(pool, n) for n in ("x1", "x3", "x5", "x7")}  # r=16 held (running requests)
    for n in ("x2", "x4", "x6"):
        pool.release(settle(pool, n))
    # x9 (r=16) needs room and no r=16 adapter is free: x0 (r=12, least recent) is set aside, x9 gets new modules
    held["x9"] = settle(pool, "x9")
    assert len(pool._spares) == 1 and len(pool.model.adapter_names()) == 9  # 8 resident, 1 spare
    for n in ("x1", "x3", "x5", "x7", "x9"):
        pool.release(held.pop(n))
    held = {n: settle(pool, n) for n in ("x2", "x4", "x6")}  # now the r=12 ones are held
    spares = set(pool._spares)
    internal = settle(pool, "x8")  # r=12: takes x0's modules from the spares; an r=16 one is set aside
    assert internal in spares and len(pool._spares) == 1 and len(pool.model.adapter_names()) == 9
    pool.release(internal)
    for n in list(held):
        pool.release(held.pop(n))
    for i in (8, 9, 10, 11, 0, 5):
        name = f"x{i}"
        pool.release(settle(pool, name))
        assert engine.generate([[1, 2, 3]], GREEDY, [name])[0].token_ids == expected[name]
        assert len(pool.model.adapter_names()) <= pool.max_installed and len(pool._spares) <= pool.max_spares
    assert [st.buckets[16].A_t.data_ptr() for st in stacks] == where
    with pytest.raises(Exception, match="max_spares: expected >= 0"):
        fresh_pool(max_spares=-1)
    pool.close()


def test_dora_adapters_taking_over_modules_never_serve_the_previous_norms(tmp_path):
    """DoRA caches ||W0 + sBA|| per layer; an adapter installed into another's modules must not see its norm."""
    model = gf.AdaptedModel(tiny_lm("gpt2"))
    expected = {}
    for i in range(2):
        add_random_adapter(model, f"d{i}", "gpt2", r=8, seed=40 + i, use_dora=True)
        model.save_adapter(tmp_path / f"d{i}", name=f"d{i}")
    for i in range(2):
        expected[f"d{i}"] = Engine(model).generate([[1, 2, 3]], GREEDY, [f"d{i}"])[0].token_ids
    assert expected["d0"] != expected["d1"]
    pool = fresh_pool(max_loras=1)
    for i in range(2):
        pool.register(f"d{i}", tmp_path / f"d{i}")
    engine = Engine(pool.model, pool=pool)
    internals = set()
    for name in ("d0", "d1", "d0"):
        internal = settle(pool, name)
        internals.add(internal)
        pool.release(internal)
        assert engine.generate([[1, 2, 3]], GREEDY, [name])[0].token_ids == expected[name]
    assert len(internals) == 1 and pool.stats["evictions"] == 2
    pool.close()


def test_an_adapter_that_fails_to_take_over_modules_leaves_the_pool_serving(adapter_dirs, tmp_path):
    """ad4's config with a base fingerprint of another base: the install into ad1's modules fails, the modules
    are dropped (they hold part of each), the request for it fails with the reason, and the pool serves on."""
    from safetensors.torch import load_file, save_file
    dirs, expected = adapter_dirs
    bad = tmp_path / "other_base"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((dirs["ad4"] / "adapter_config.json").read_text())
    tensors = load_file(dirs["ad4"] / "adapter_model.safetensors")
    module = next(iter(tensors)).removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
    save_file(tensors, bad / "adapter_model.safetensors",
              metadata={"grafting.base_fingerprint": json.dumps({module: "0" * 32})})
    pool = fresh_pool(max_loras=1)
    pool.register("ad1", dirs["ad1"])
    pool.register("bad", bad)
    pool.release(settle(pool, "ad1"))
    assert pool.acquire("bad") is None
    wait_read(pool, "bad")
    with pytest.raises(AdapterError, match=f"initialised against one exact base .* '{module}'"):
        pool.acquire("bad")
    assert pool.model.adapter_names() == [] and pool.resident == []
    engine = Engine(pool.model, pool=pool)
    assert engine.generate([[1, 2, 3]], GREEDY, ["ad1"])[0].token_ids == expected["ad1"]
    pool.close()


def test_a_pool_never_names_an_install_after_an_adapter_the_model_already_holds(adapter_dirs):
    dirs, expected = adapter_dirs
    model = gf.AdaptedModel(tiny_lm("gpt2"))
    add_random_adapter(model, "pool-1", "gpt2", r=4, seed=99)  # e.g. left by another pool on the same model
    pool = AdapterPool(model, max_loras=4)
    pool.register("ad0", dirs["ad0"])
    internal = settle(pool, "ad0")
    assert internal != "pool-1" and set(model.adapter_names()) == {"pool-1", internal}
    pool.release(internal)
    assert Engine(model, pool=pool).generate([[1, 2, 3]], GREEDY, ["ad0"])[0].token_ids == expected["ad0"]
    pool.close()


def test_an_adapter_saved_with_dropout_serves_the_same_greedy_output_every_time(tmp_path):
    """Modules start in training mode; a served adapter with lora_dropout must not drop activations."""
    model = gf.AdaptedModel(tiny_lm("gpt2"))
    add_random_adapter(model, "drop", "gpt2", r=8, seed=3, lora_dropout=0.5)
    model.save_adapter(tmp_path / "drop", name="drop")
    model.eval()
    want = Engine(model).generate([[1, 2, 3]], GREEDY, ["drop"])[0].token_ids
    pool = fresh_pool(max_loras=2)
    pool.register("drop", tmp_path / "drop")
    engine = Engine(pool.model, pool=pool)
    assert [engine.generate([[1, 2, 3]], GREEDY, ["drop"])[0].token_ids for _ in range(3)] == [want] * 3
    pool.close()


def test_the_engine_serves_a_model_in_eval_mode():
    model = gf.AdaptedModel(tiny_lm("gpt2")).train()
    add_random_adapter(model, "drop", "gpt2", r=8, seed=3, lora_dropout=0.5)
    engine = Engine(model)
    assert not any(m.training for m in model.modules())
    add_random_adapter(model, "late", "gpt2", r=8, seed=4, lora_dropout=0.5)  # added after: eval too
    assert not any(m.training for m in model.modules())
    for name in ("drop", "late"):
        outs = [engine.generate([[1, 2, 3]], GREEDY, [name])[0].token_ids for _ in range(3)]
        assert outs[0] == outs[1] == outs[2]
    model.train()
    add_random_adapter(model, "trained", "gpt2", r=8, seed=5, lora_dropout=0.5)
    assert all(m.training for _, h in model.hosts() for m in h.adapters["trained"].modules())
