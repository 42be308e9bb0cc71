"""The pool's host tier (LRU by count and bytes, one registration's copy per name) and what goes into it
(read_adapter: checked, hashed as the files are, laid out for the store with the same values; inside the
adapter root, when there is one, as the files resolve at the read)."""

from __future__ import annotations

import pytest
import torch
from serving_models import add_random_adapter, tiny_lm

import grafting as gf
from grafting.hashing import adapter_hash
from grafting.io.reader import AdapterReader
from grafting.io.peft_format import install_adapter
from grafting.serve.host_tier import AdapterError, HostTier, adapter_rank, contained, read_adapter, tensor_bytes
from grafting.stacks import int8_rows, prequantized


def tensors(nbytes: int) -> dict:
    return {"w": torch.zeros(nbytes // 4)}


def test_least_recently_used_copies_go_first_past_the_count():
    tier = HostTier(max_count=2)
    tier.keep("a", 1, "da", None, tensors(8), None)
    tier.keep("b", 2, "db", None, tensors(8), None)
    assert tier.current("a", 1) is not None  # a is now the most recent
    tier.keep("c", 3, "dc", None, tensors(8), None)
    assert tier.names() == ["a", "c"] and tier.nbytes == 16


def test_the_byte_budget_holds_and_an_adapter_alone_over_it_is_not_kept():
    tier = HostTier(max_count=10, max_bytes=40)
    tier.keep("a", 1, "da", None, tensors(16), None)
    tier.keep("b", 2, "db", None, tensors(16), None)
    tier.keep("c", 3, "dc", None, tensors(16), None)  # 48 > 40: a goes
    assert tier.names() == ["b", "c"] and tier.nbytes == 32
    tier.keep("huge", 4, "dh", None, tensors(44), None)
    assert tier.names() == ["b", "c"] and tier.nbytes == 32
    tier.drop("b")
    tier.drop("nobody")
    assert tier.names() == ["c"] and tier.nbytes == 16


def test_a_copy_serves_only_the_registration_it_was_read_for():
    tier = HostTier(max_count=4)
    tier.keep("a", 1, "da", None, tensors(8), None)
    assert tier.current("a", 2) is None and tier.current("a", 1).digest == "da"
    tier.keep("a", 2, "da2", None, tensors(4), None)  # re-read for a new registration: replaces the old copy
    assert tier.names() == ["a"] and tier.nbytes == 4 and tier.current("a", 1) is None


def test_a_tier_of_size_zero_keeps_nothing():
    tier = HostTier(max_count=0)
    tier.keep("a", 1, "da", None, tensors(8), None)
    assert tier.names() == [] and tier.nbytes == 0


@pytest.mark.parametrize("use_dora", [False, True])
def test_read_adapter_hashes_the_files_and_lays_factors_out_for_the_store(tmp_path, use_dora):
    model = gf.AdaptedModel(tiny_lm("gpt2"))
    add_random_adapter(model, "a", "gpt2", r=8, seed=3, use_dora=use_dora)
    model.save_adapter(tmp_path, name="a")
    digest, config, laid_out, _ = read_adapter(tmp_path)
    reader = AdapterReader(tmp_path)
    as_read = reader.read_all()
    assert digest == adapter_hash(reader.config, as_read) and adapter_rank(config) == 8
    assert laid_out.keys() == as_read.keys()
    factors = [k for k in as_read if k.endswith(("lora_A.weight", "lora_B.weight"))]
    assert factors
    for key, t in laid_out.items():
        assert torch.equal(t, as_read[key])
        if key in factors:  # a transposed view of a contiguous (fan_in, r) / (r, out) tensor
            assert not t.is_contiguous() and t.t().is_contiguous()


def test_for_an_int8_store_reads_quantize_each_factor_once_and_installs_copy_that(tmp_path):
    """read_adapter(int8=True) attaches each factor's int8 form (per-rank scales) on the loader thread, counted
    in its bytes; an install shares it with the parameter, and the store written from it equals quantizing
    there. A parameter written after the install is quantized anew, from its new values."""
    model = gf.AdaptedModel(tiny_lm("gpt2"))
    add_random_adapter(model, "a", "gpt2", r=8, seed=4)
    model.save_adapter(tmp_path, name="a")
    _, config, plain, _ = read_adapter(tmp_path)
    _, _, laid_out, _ = read_adapter(tmp_path, int8=True)
    for key, t in laid_out.items():
        q, scales = t.grafting_int8
        want = int8_rows(t.t(), dim=0 if "lora_A" in key else 1)
        assert q.dtype == torch.int8 and torch.equal(q, want[0]) and torch.equal(scales, want[1])
    assert tensor_bytes(laid_out) == tensor_bytes(plain) + sum(
        t.grafting_int8[0].numel() + 4 * t.grafting_int8[1].numel() for t in laid_out.values())

    def served(tensors, change=None):
        m = gf.AdaptedModel(tiny_lm("gpt2"))
        m.eval()
        m.set_stack_dtype(torch.int8)
        install_adapter(m, "a", config, tensors, tmp_path, finite_checked=True, share=True, training=False)
        if change is not None:
            change(m)
        carried = [prequantized(h.adapters["a"].lora_B.reshape(h.adapters["a"].lora_B.shape[0], -1)) is not None
                   for _, h in m.hosts()]
        assert carried == [any(hasattr(t, "grafting_int8") for t in tensors.values()) and change is None] * len(carried)
        m.stack_adapters()
        x = torch.tensor([[1, 2, 3, 4]])
        with torch.inference_mode():
            return [b.A_t.clone() for _, h in m.hosts() for b in h._stack.buckets.values()], \
                m(input_ids=x, adapter_names=["a"]).logits

    quantized_on_read, quantized_here = served(laid_out), served(plain)
    assert all(torch.equal(a, b) for a, b in zip(quantized_on_read[0], quantized_here[0]))
    assert torch.equal(quantized_on_read[1], quantized_here[1])

    def double_b(m):
        with torch.no_grad():
            for _, h in m.hosts():
                h.adapters["a"].lora_B.mul_(2)  # a write after the install: the attached int8 form is stale

    _, _, fresh, _ = read_adapter(tmp_path, int8=True)
    changed, expected = served(fresh, double_b), served(plain, double_b)
    assert torch.equal(changed[1], expected[1]) and not torch.equal(changed[1], quantized_here[1])


def test_read_adapter_refuses_non_finite_weights(tmp_path):
    model = gf.AdaptedModel(tiny_lm("gpt2"))
    add_random_adapter(model, "a", "gpt2", r=4, seed=1)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    model.save_adapter(tmp_path, name="a")
    with pytest.raises(gf.GraftingError, match="adapter_model.safetensors"):
        read_adapter(tmp_path)


def test_adapter_rank_is_the_largest_over_rank_pattern():
    assert adapter_rank(gf.LoraConfig(r=8, rank_pattern={"c_attn": 32})) == 32
    assert adapter_rank(gf.LoraConfig(r=16)) == 16


def test_containment_follows_symlinks_to_where_the_files_are_at_the_read(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    model = gf.AdaptedModel(tiny_lm("gpt2"))
    add_random_adapter(model, "a", "gpt2", r=4, seed=1)
    model.save_adapter(root / "a", name="a")
    model.save_adapter(outside / "a", name="a")
    assert contained(root, root / "a") == (root / "a").resolve()
    assert read_adapter(root / "a", root=root)[0] == read_adapter(outside / "a")[0]
    (root / "inner").symlink_to(root / "a", target_is_directory=True)  # a symlink that stays inside is fine
    assert contained(root, root / "inner") == (root / "a").resolve()
    (root / "a" / "adapter_config.json").unlink()
    (root / "a" / "adapter_config.json").symlink_to(outside / "a" / "adapter_config.json")
    with pytest.raises(AdapterError, match="adapter_config.json resolves outside the adapter root"):
        read_adapter(root / "a", root=root)
    assert read_adapter(root / "a")[0]  # unconfined, the same files read
    (root / "loop").symlink_to(root / "loop")
    for path in [root / "loop", root / "a\x00b"]:
        with pytest.raises(AdapterError, match="not a usable adapter path"):
            contained(root, path)
    with pytest.raises(AdapterError, match=r"xxx\.\.\.: cannot read the adapter \(OSError: File name too long\)$"):
        read_adapter(root / ("x" * 5000), root=root)  # the client's path once, shortened


def test_reads_under_a_root_go_to_the_files_checked_not_to_symlinks_swapped_in_after(tmp_path, monkeypatch):
    """The files are opened once, checked inside the root as opened, and read through those descriptors: a file
    replaced by a symlink out of the root between the check and the read (a race) is never followed."""
    from grafting.serve import host_tier
    root, outside = tmp_path / "root", tmp_path / "outside"
    model = gf.AdaptedModel(tiny_lm("gpt2"))
    add_random_adapter(model, "a", "gpt2", r=4, seed=1)
    add_random_adapter(model, "b", "gpt2", r=4, seed=2)
    model.save_adapter(root / "a", name="a")
    model.save_adapter(outside / "b", name="b")
    names = ("adapter_config.json", "adapter_model.safetensors")
    inside = AdapterReader(root / "a").read_all()
    with host_tier.pinned(root, root / "a") as (real, opened):
        for f in names:  # the swap lands after the check, before the read
            (root / "a" / f).unlink()
            (root / "a" / f).symlink_to(outside / "b" / f)
        read = AdapterReader(real, opened).read_all()
    assert read.keys() == inside.keys() and all(torch.equal(read[k], inside[k]) for k in inside)
    assert not torch.equal(read[next(iter(inside))], AdapterReader(outside / "b").read_all()[next(iter(inside))])
    with pytest.raises(AdapterError, match="resolves outside the adapter root"):
        read_adapter(root / "a", root=root)  # the next read sees the symlinks
    # the swap landing between the path check and the open: the descriptors' own check refuses it
    monkeypatch.setattr(host_tier, "contained", lambda root, path: path)
    with pytest.raises(AdapterError, match="adapter_config.json resolves outside the adapter root"):
        read_adapter(root / "a", root=root)
    (root / "c").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json missing"):
        read_adapter(root / "c", root=root)


def test_a_fifo_or_directory_under_the_root_is_refused_without_blocking(tmp_path):
    import os
    import threading
    root = tmp_path / "root"
    model = gf.AdaptedModel(tiny_lm("gpt2"))
    add_random_adapter(model, "a", "gpt2", r=4, seed=1)
    model.save_adapter(root / "a", name="a")
    (root / "a" / "adapter_config.json").unlink()
    os.mkfifo(root / "a" / "adapter_config.json")  # opening a FIFO for reading waits for a writer
    raised = []
    reader = threading.Thread(target=lambda: raised.append(pytest.raises(AdapterError, read_adapter, root / "a",
                                                                         root=root)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "the read blocked on a FIFO"
    assert raised and "adapter_config.json is not a regular file" in str(raised[0].value)
    (root / "a" / "adapter_config.json").unlink()
    (root / "a" / "adapter_config.json").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json is not a regular file"):
        read_adapter(root / "a", root=root)
