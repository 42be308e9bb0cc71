"""Malformed adapters raise GraftingError naming the file and the problem; saving is atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import grafting as gf
from toys import make_toy, randomize

CFG = dict(r=4, lora_alpha=8, target_modules=["target"])


@pytest.fixture
def saved(tmp_path) -> Path:
    model = gf.adapt(make_toy("linear"), gf.LoraConfig(**CFG))
    randomize(model)
    model.save_adapter(tmp_path / "a")
    return tmp_path / "a"


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(path: Path, fn) -> None:
    f = path / "adapter_model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


def load_error(path) -> str:
    with pytest.raises(gf.GraftingError) as e:
        gf.load(make_toy("linear"), path)
    return str(e.value)


def test_saved_layout(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["target"]
    keys = set(load_file(saved / "adapter_model.safetensors"))
    assert keys == {"base_model.model.target.lora_A.weight", "base_model.model.target.lora_B.weight"}


def test_bad_json(saved):
    (saved / "adapter_config.json").write_text("{not json")
    msg = load_error(saved)
    assert "adapter_config.json" in msg and "not valid JSON" in msg


def test_unknown_method(saved):
    edit_config(saved, peft_type="IA3")
    assert "peft_type" in load_error(saved)


def test_unknown_field_suggests(saved):
    edit_config(saved, lora_alhpa=3)
    msg = load_error(saved)
    assert "lora_alhpa" in msg and "lora_alpha" in msg


def test_unsupported_peft_feature(saved):
    edit_config(saved, use_qalora=True)
    assert "use_qalora" in load_error(saved)


def test_bad_field_value(saved):
    edit_config(saved, r=0)
    assert "'r'" in load_error(saved)


def test_missing_tensor(saved):
    edit_tensors(saved, lambda t: t.pop("base_model.model.target.lora_B.weight"))
    msg = load_error(saved)
    assert "adapter_model.safetensors" in msg and "missing" in msg and "lora_B" in msg


def test_extra_tensor(saved):
    edit_tensors(saved, lambda t: t.update({"base_model.model.other.lora_A.weight": torch.zeros(4, 12)}))
    assert "unexpected" in load_error(saved)


def test_wrong_shape(saved):
    edit_tensors(saved, lambda t: t.update({"base_model.model.target.lora_B.weight": torch.zeros(9, 4)}))
    assert "shape (9, 4)" in load_error(saved)


def test_rank_mismatch_with_config(saved):
    edit_config(saved, r=8)
    msg = load_error(saved)
    assert "r=8" in msg and "rank_pattern" in msg


def test_wrong_dtype(saved):
    edit_tensors(saved, lambda t: t.update({"base_model.model.target.lora_A.weight": torch.zeros(4, 12, dtype=torch.int32)}))
    assert "dtype" in load_error(saved)


def test_truncated_safetensors(saved):
    f = saved / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-20])
    msg = load_error(saved)
    assert "adapter_model.safetensors" in msg and "safetensors" in msg


def test_target_absent_from_base(saved):
    edit_config(saved, target_modules=["nonexistent"])
    msg = load_error(saved)
    assert "adapter_config.json" in msg and "matched no module" in msg


def test_pickle_is_never_loaded(saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    assert "pickle" in load_error(saved)


def test_failed_load_leaves_no_adapter(saved):
    edit_tensors(saved, lambda t: t.update({"base_model.model.target.lora_B.weight": torch.zeros(9, 4)}))
    model = gf.adapt(make_toy("linear"), gf.LoraConfig(**CFG), adapter_name="kept")
    with pytest.raises(gf.GraftingError):
        model.load_adapter(saved, name="broken")
    assert model.adapter_names() == ["kept"]


def test_crash_during_save_keeps_previous_adapter(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = gf.adapt(make_toy("linear"), gf.LoraConfig(**CFG, init_lora_weights=False))

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(OSError):
        model.save_adapter(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir()] == ["a"]  # no temporary directories left behind


def test_save_over_existing_directory_keeps_other_files(saved):
    (saved / "README.md").write_text("notes")
    model = gf.adapt(make_toy("linear"), gf.LoraConfig(**CFG, init_lora_weights=False))
    model.save_adapter(saved)
    assert (saved / "README.md").read_text() == "notes"
    torch.testing.assert_close(load_file(saved / "adapter_model.safetensors")["base_model.model.target.lora_B.weight"],
                               dict(model.hosts())["target"].adapters["default"].lora_B.detach())


def test_loading_draws_no_random_init(saved):
    # every factor is overwritten from the file, so loading must not spend time drawing (and discarding) random
    # values: the global generator is where it was, and the loaded factors are the saved ones exactly
    base = make_toy("linear")
    torch.manual_seed(123)
    model = gf.load(base, saved)
    after_load = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after_load, torch.rand(4))
    on_disk = load_file(saved / "adapter_model.safetensors")
    host = model.base_model.target
    assert torch.equal(host.adapters["default"].lora_A, on_disk["base_model.model.target.lora_A.weight"])
    assert torch.equal(host.adapters["default"].lora_B, on_disk["base_model.model.target.lora_B.weight"])
    # a new adapter still starts from peft's init (A random, B zero)
    model.add_adapter("fresh", gf.LoraConfig(**CFG))
    assert host.adapters["fresh"].lora_A.abs().sum() > 0 and not host.adapters["fresh"].lora_B.any()


def test_install_copies_the_callers_tensors_unless_told_to_share(saved):
    from grafting.io.peft_format import install_adapter
    from grafting.io.reader import AdapterReader
    reader = AdapterReader(saved)
    for share in (False, True):
        tensors = reader.read_all()
        model = gf.AdaptedModel(make_toy("linear"))
        install_adapter(model, "a", reader.config, tensors, saved, share=share)
        lora_A = model.get_submodule("base_model.target").adapters["a"].lora_A
        key = next(k for k in tensors if k.endswith("lora_A.weight"))
        assert torch.equal(lora_A, tensors[key])
        assert (lora_A.data_ptr() == tensors[key].data_ptr()) == share  # shared: the read tensor itself
        tensors[key].add_(1.0)  # the caller writes to its tensor afterwards
        assert torch.equal(lora_A, tensors[key]) == share
        assert lora_A.requires_grad  # still the adapter's trainable parameter either way


def test_refill_gives_an_adapter_anothers_weights_and_never_writes_what_it_shared(saved, tmp_path):
    from grafting.io.peft_format import install_adapter, refill_adapter
    from grafting.io.reader import AdapterReader
    other = gf.adapt(make_toy("linear"), gf.LoraConfig(**CFG))
    torch.manual_seed(7)
    randomize(other)
    other.save_adapter(tmp_path / "b")
    x = torch.randn(3, 12)
    first, second = AdapterReader(saved), AdapterReader(tmp_path / "b")
    model = gf.AdaptedModel(make_toy("linear"))
    held = first.read_all()
    install_adapter(model, "a", first.config, held, saved, share=True)
    model.set_active("a")
    kept = {k: t.clone() for k, t in held.items()}
    adapter = model.get_submodule("base_model.target").adapters["a"]
    for dtype in (torch.float16, torch.float32):  # float16 cannot be shared: copied into storage of its own
        tensors = {k: t.to(dtype) for k, t in second.read_all().items()}
        refill_adapter(model, "a", second.config, tensors, tmp_path / "b", share=True)
        assert model.get_submodule("base_model.target").adapters["a"] is adapter  # the same modules
        reference = gf.AdaptedModel(make_toy("linear"))
        install_adapter(reference, "b", second.config, tensors, tmp_path / "b")
        reference.set_active("b")
        assert torch.equal(model(x), reference(x))
        for k in held:  # the first adapter's tensors, which the parameters shared, are as they were read
            assert torch.equal(held[k], kept[k])
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    with pytest.raises(gf.GraftingError, match=r"b/adapter_model.safetensors: tensor .* has shape"):
        refill_adapter(model, "a", second.config, {**tensors, key: tensors[key][:, :3]}, tmp_path / "b")


def test_an_install_says_when_the_adapter_holds_the_given_tensors_so_their_hash_is_its_own(saved, tmp_path):
    """install_adapter / refill_adapter return True only when every tensor became its parameter as given and is
    read back as itself: then adopting the caller's hash without comparing (adopt_hash held=True) gives what
    the model computes in full. Copies (share=False, another dtype), DoRA (which exports its magnitude
    converted) and a file with a key read into another place (peft's full embedding weight) say False."""
    from grafting.hashing import adapter_hash, adopt_hash
    from grafting.io.peft_format import adapter_tensors, install_adapter, refill_adapter
    from grafting.io.reader import AdapterReader
    reader = AdapterReader(saved)
    model = gf.AdaptedModel(make_toy("linear"))
    tensors = reader.read_all()
    assert install_adapter(model, "a", reader.config, tensors, saved, share=True) is True
    assert adopt_hash(model, "a", reader.config, tensors, "claimed", held=True) and model.content_hash("a") == "claimed"
    model._hashes.pop("a")
    assert model.content_hash("a") == adapter_hash(reader.config, tensors)  # the full hash agrees
    assert refill_adapter(model, "a", reader.config, reader.read_all(), saved, share=True) is True
    assert refill_adapter(model, "a", reader.config, {k: t.half() for k, t in tensors.items()}, saved,
                          share=True) is False  # copied into storage of its own, converted
    assert install_adapter(gf.AdaptedModel(make_toy("linear")), "b", reader.config, reader.read_all(), saved,
                           share=False) is False
    dora = gf.DoraConfig(**CFG)
    dora_tensors = adapter_tensors(gf.adapt(make_toy("linear"), dora), "default")
    assert install_adapter(gf.AdaptedModel(make_toy("linear")), "d", dora, dora_tensors, tmp_path, share=True) is False
    assert not adopt_hash(model, "a", dora, tensors, "claimed", held=True)  # another config: never adopted

    embed_cfg = gf.LoraConfig(**CFG)
    source = gf.adapt(make_toy("embedding"), embed_cfg)
    plain = dict(adapter_tensors(source, "default"))
    assert install_adapter(gf.AdaptedModel(make_toy("embedding")), "e", embed_cfg, dict(plain), tmp_path,
                           share=True) is True
    weight = source.base_model.target.base_layer.weight
    plain["base_model.model.target.base_layer.weight"] = weight.detach().clone()  # as peft saves it
    assert install_adapter(gf.AdaptedModel(make_toy("embedding")), "e", embed_cfg, plain, tmp_path,
                           share=True) is False


def test_refill_never_serves_a_dora_norm_cached_for_the_tensors_that_lived_at_the_same_address(tmp_path):
    # A pool frees an evicted adapter's host copy and the next read may land at the same addresses: caches keyed
    # on (address, version) must still see that the parameters changed.
    from grafting.io.peft_format import adapter_tensors, install_adapter, refill_adapter
    cfg = gf.DoraConfig(**CFG)
    template = adapter_tensors(gf.adapt(make_toy("linear"), cfg), "default")

    def weights(seed):
        g = torch.Generator().manual_seed(seed)
        return {k: torch.rand(t.shape, generator=g) + 0.5 for k, t in template.items()}

    x = torch.randn(3, 12)
    model = gf.AdaptedModel(make_toy("linear"))
    first = weights(1)
    install_adapter(model, "p", cfg, first, tmp_path, share=True)
    with torch.inference_mode():
        model(x, adapter_names=["p"] * 3)  # caches the norm of the first weights
    refill_adapter(model, "p", cfg, weights(2), tmp_path, share=True)
    model.content_hash("p")
    third = weights(3)
    for k in first:  # the third adapter read into the storage the first one freed
        first[k].copy_(third[k])
    refill_adapter(model, "p", cfg, first, tmp_path, share=True)
    reference = gf.AdaptedModel(make_toy("linear"))
    install_adapter(reference, "q", cfg, {k: t.clone() for k, t in third.items()}, tmp_path)
    with torch.inference_mode():
        torch.testing.assert_close(model(x, adapter_names=["p"] * 3), reference(x, adapter_names=["q"] * 3))
    assert model.content_hash("p") == reference.content_hash("q")


def test_refill_refuses_another_config(saved):
    from grafting.io.peft_format import install_adapter, refill_adapter
    from grafting.io.reader import AdapterReader
    reader = AdapterReader(saved)
    model = gf.AdaptedModel(make_toy("linear"))
    install_adapter(model, "a", reader.config, reader.read_all(), saved)
    other = gf.LoraConfig(**{**CFG, "lora_alpha": 32})  # same shapes, another scale
    with pytest.raises(gf.GraftingError, match=r"a/adapter_config.json: adapter 'a' was installed from another"):
        refill_adapter(model, "a", other, reader.read_all(), saved)


def test_loading_for_inference_turns_dropout_off_as_peft_does(tmp_path):
    # peft's load_adapter(is_trainable=False) puts the model in eval mode; an adapter saved with lora_dropout
    # must then answer the same input the same way every time
    model = gf.adapt(make_toy("linear"), gf.LoraConfig(**CFG, lora_dropout=0.5))
    randomize(model)
    model.save_adapter(tmp_path / "a")
    x = torch.randn(8, 12)
    served = gf.load(make_toy("linear").train(), tmp_path / "a")
    assert not any(m.training for m in served.modules())
    with torch.no_grad():
        assert torch.equal(served(x), served(x))
    trainable = gf.load(make_toy("linear").train(), tmp_path / "a", is_trainable=True)
    assert all(m.training for m in trainable.modules())  # left as it was, as peft leaves it


def test_an_install_can_put_the_new_adapters_modules_in_eval_mode_alone(saved):
    from grafting.io.peft_format import install_adapter
    from grafting.io.reader import AdapterReader
    reader = AdapterReader(saved)
    model = gf.AdaptedModel(make_toy("linear")).train()
    install_adapter(model, "a", reader.config, reader.read_all(), saved, training=False)
    adapter = model.get_submodule("base_model.target").adapters["a"]
    assert not any(m.training for m in adapter.modules())
    assert model.training and model.base_model.training  # nothing else walked
