"""The mixed-batch store as serving will keep it: buckets, in-place growth, content hashes, per-call routing."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import grafting as gf
from toys import assert_rows_match as _rows_match
from test_model import Net, tiny_gpt2


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def mixed_path(request, monkeypatch):
    """Every test here runs through the compiled kernel (where it builds) and through the torch path."""
    if request.param == "torch":
        monkeypatch.setenv("GRAFTING_KERNELS", "0")
    return request.param


def assert_rows_match(model, x, names):
    with torch.no_grad():
        _rows_match(model, x, names)


def lora(r=4, **kw):
    return gf.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw)


def stack_of(model):
    return dict(model.hosts())["layers.0.q_proj"]._stack


def test_ranks_in_other_buckets_never_reallocate_or_pad_existing_slots():
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora(4))
    model.add_adapter("b", lora(4))
    x = torch.randn(3, 8)
    assert_rows_match(model, x, ["default", "b", None])
    small = stack_of(model).buckets[4]
    small_A = small.A_t
    model.add_adapter("big", lora(12))  # bucket 16: a new bucket, the rank-4 one is not touched
    assert_rows_match(model, torch.randn(4, 8), ["big", "default", None, "b"])
    assert stack_of(model).buckets[4].A_t is small_A and small_A.shape[-1] == 4
    assert stack_of(model).buckets[16].A_t.shape[-1] == 16


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_the_stack_keeps_no_autograd_history_so_deleted_adapters_are_freed(mode):
    """Serving writes slots under inference_mode; the stack must not record those writes in a graph, or every
    adapter it ever held stays alive through the graph (a pool evicting and reloading leaked them all)."""
    import gc
    import weakref
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora(4))
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    refs = []
    for i in range(3):
        model.add_adapter(f"a{i}", lora(4))
        refs += [weakref.ref(p) for n, p in model.named_parameters() if f".a{i}." in n]
        with ctx():
            model(torch.randn(2, 8), adapter_names=[f"a{i}", "default"])
        stack = stack_of(model)
        assert all(t.grad_fn is None for b in stack.buckets.values() for t in (b.A_t, b.B_t, b.g))
        model.delete_adapter(f"a{i}")
    gc.collect()
    assert refs and all(r() is None for r in refs)


def test_reserve_preallocates_so_loading_adapters_reallocates_nothing():
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora(4))
    model.reserve(adapters=8, rank=8)
    stack = stack_of(model)
    A_before = stack.buckets[8].A_t
    assert A_before.shape[0] == 9  # 8 adapters + the zero slot
    for i in range(6):
        model.add_adapter(f"a{i}", lora(8))
    assert_rows_match(model, torch.randn(7, 8), ["a0", "a1", "a2", "a3", "a4", "a5", None])
    assert stack.buckets[8].A_t is A_before


def test_a_no_grad_call_writes_its_new_adapters_into_every_layer_before_any_layer_runs():
    """Without grad, a call's adapters that the stacks lack are written into every layer's stack up front, one
    layer after another, not each at its layer's turn between the matmuls; a copied model (empty stacks) and a
    rewritten adapter are still written, by the call or by the layer."""
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora(4))
    model.add_adapter("b", lora(8))
    model.eval()
    hosts = [h for _, h in model.hosts()]
    seen = []
    hooks = [h.register_forward_pre_hook(lambda *_: seen.append(
        all(x._stack is not None and "b" in x._stack.keys for x in hosts))) for h in hosts]
    x, names = torch.randn(3, 8), ["b", None, "default"]
    with torch.no_grad():
        out = model(x, adapter_names=names)
    assert seen and seen[0]
    for hook in hooks:
        hook.remove()
    assert_rows_match(model, x, names)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.allclose(twin(x, adapter_names=names), out, atol=1e-6)
        for _, host in model.hosts():
            host.adapters["b"].lora_B.mul_(2.0)
    assert_rows_match(model, x, names)


def test_a_slot_rewritten_in_place_keeps_the_kernel_s_table_and_serves_the_new_adapter(mixed_path):
    """The compiled kernel's table holds the buckets' addresses: an adapter written into a freed slot leaves
    them where they were, so the table is kept (rebuilt only when a bucket grows or moves)."""
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora(4))
    model.add_adapter("b", lora(4))
    model.eval()
    x = torch.randn(3, 8)
    assert_rows_match(model, x, ["b", "default", None])
    stack = stack_of(model)
    tables = dict(stack.tables)
    model.delete_adapter("b")
    model.add_adapter("c", lora(4))  # b's slot, same bucket
    assert model._routing.slot_of["c"] == (4, 2)
    assert_rows_match(model, x, ["c", "default", None])
    if mixed_path == "kernel" and gf.kernels.lora_rows() is not None:
        assert tables and all(stack.tables[k] is t for k, t in tables.items())


def test_same_name_reloaded_with_other_weights_never_serves_stale_factors(tmp_path):
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora(4))
    model.add_adapter("b", lora(4))
    x = torch.randn(2, 8)
    with torch.no_grad():
        first = model(x, adapter_names=["b", None])
    hash_before = model.content_hash("b")
    other = gf.adapt(Net(), lora(4))  # same shapes, other weights
    other.save_adapter(tmp_path / "b2")
    model.delete_adapter("b")
    model.load_adapter(tmp_path / "b2", name="b")  # same name, same slot, fresh parameters
    assert model.content_hash("b") != hash_before
    assert_rows_match(model, x, ["b", None])
    with torch.no_grad():
        assert not torch.allclose(model(x, adapter_names=["b", None])[0], first[0])


def _edit_in_place(a):
    a.lora_B.add_(0.5)


def _reassign(a):
    a.lora_B = torch.nn.Parameter(torch.randn_like(a.lora_B))


def _swap_storage(a):
    a.lora_A.data = torch.randn_like(a.lora_A)  # .data bypasses the version counter


@pytest.mark.parametrize("edit", [_edit_in_place, _reassign, _swap_storage])
def test_a_repeated_call_replays_its_plans_yet_sees_every_change_to_an_adapter(edit):
    """Each layer replays the plans of an earlier call with the same rows and adapters (a decode step skips the
    per-adapter checks); an in-place edit, a reassigned parameter or a swapped storage must still be served."""
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora(4))
    model.add_adapter("b", lora(4))
    model.eval()  # a model in training mode replays nothing (see the next test)
    x, names = torch.randn(3, 8), ["b", "default", None]
    host = dict(model.hosts())["layers.0.q_proj"]
    with torch.no_grad():
        model(x, adapter_names=names)
        key, = host._stack.calls
        model(x, adapter_names=names)
        assert list(host._stack.calls) == [key]  # replayed, not rebuilt
        edit(host.adapters["b"])
    assert_rows_match(model, x, names)
    assert key not in host._stack.calls


def test_layers_share_a_call_s_split_only_while_they_hold_the_same_adapters():
    """A mixed call works out once which adapters run through the store for all layers holding the same
    adapters; a layer holding others (here: "b" targets q_proj only) gets its own, and add/delete re-key it."""
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora(4))
    model.add_adapter("b", gf.LoraConfig(r=16, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("c", lora(8))
    model.eval()
    hosts = dict(model.hosts())
    q0, q1, v0 = hosts["layers.0.q_proj"], hosts["layers.1.q_proj"], hosts["layers.0.v_proj"]
    assert q0.adapter_set() is q1.adapter_set() and q0.adapter_set() is not v0.adapter_set()
    names = ["b", "c", None, "default", "b", "c", "default"]  # three rank buckets in one call
    assert_rows_match(model, torch.randn(7, 8), names)
    model.delete_adapter("b")
    assert q0.adapter_set() is v0.adapter_set()
    assert_rows_match(model, torch.randn(7, 8), ["c", "default", None, "c", "default", "c", "c"])


def test_replayed_plans_never_skip_dropout_in_training_mode():
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora(4, lora_dropout=0.5))
    x, names = torch.randn(4, 8), ["default", "default", None, "default"]
    with torch.no_grad():
        model.eval()
        evaluated = model(x, adapter_names=names)
        model(x, adapter_names=names)
        model.train()  # dropout now active: the eval call's gathered plans must not be replayed
        torch.manual_seed(1)
        first = model(x, adapter_names=names)
        torch.manual_seed(2)
        second = model(x, adapter_names=names)
        model.eval()
        again = model(x, adapter_names=names)
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(first[2], evaluated[2])  # the base row has no dropout
    torch.testing.assert_close(again, evaluated)


def test_content_hash_is_what_would_be_saved(tmp_path):
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora(4))
    model.save_adapter(tmp_path / "a")
    loaded = gf.load(Net(), tmp_path / "a")
    assert loaded.content_hash("default") == model.content_hash("default")
    with torch.no_grad():
        dict(loaded.hosts())["layers.0.q_proj"].adapters["default"].lora_B.add_(1.0)
    assert loaded.content_hash("default") != model.content_hash("default")  # in-place edit: a new hash


def test_concurrent_callers_with_different_routings():
    torch.manual_seed(0)
    model = gf.adapt(Net(), lora(4))
    model.add_adapter("b", lora(2))
    model.eval()
    x = torch.randn(4, 8)
    routings = [["default", "b", None, "b"], ["b", None, "default", "default"], [None, None, "b", "default"]]
    with torch.no_grad():
        expected = [model(x, adapter_names=r) for r in routings]
        with model.disabled():
            base_out = model(x)
    errors, barrier = [], threading.Barrier(4)

    def caller(i):
        try:
            barrier.wait(timeout=30)
            with torch.no_grad():
                for _ in range(20):
                    if i == 3:
                        with model.disabled():  # disabled() in one thread is not seen by the others
                            torch.testing.assert_close(model(x), base_out)
                        continue
                    torch.testing.assert_close(model(x, adapter_names=routings[i]), expected[i])
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]


@pytest.mark.parametrize("gen_kwargs", [{"num_beams": 2}, {"do_sample": True, "num_return_sequences": 2},
                                        {"num_beams": 2, "num_return_sequences": 2}])
def test_generate_expands_adapter_names_for_beams_and_return_sequences(gen_kwargs):
    base = tiny_gpt2()
    model = gf.adapt(base, gf.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    model.add_adapter("b", gf.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    common = dict(max_new_tokens=4, pad_token_id=0, **gen_kwargs)
    with torch.no_grad():
        torch.manual_seed(0)
        mixed = model.generate(input_ids=ids, adapter_names=["b", None], **common)
        per_row = []
        for i, name in enumerate(["b", None]):
            torch.manual_seed(0)
            if name is None:
                with model.disabled():
                    per_row.append(model.generate(input_ids=ids[i:i + 1], **common))
            else:
                model.set_active(name)
                per_row.append(model.generate(input_ids=ids[i:i + 1], **common))
    k = gen_kwargs.get("num_return_sequences", 1)
    assert mixed.shape[0] == 2 * k
    if not gen_kwargs.get("do_sample"):  # sampling draws differ between a batch of 2 and of 1
        torch.testing.assert_close(mixed, torch.cat(per_row))


def test_forward_with_wrong_row_count_is_an_error():
    model = gf.adapt(Net(), lora(4))
    with pytest.raises(gf.GraftingError, match="2 entries but the batch has 4 rows"):
        with torch.no_grad():
            model(torch.randn(4, 8), adapter_names=["default", None])

