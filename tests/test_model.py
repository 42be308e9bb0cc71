"""AdaptedModel behaviour as users drive it: targets, adapters, trainability, mixed batches, HF models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import grafting as gf
from toys import randomize


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x):
        return self.mlp(self.q_proj(x) + self.v_proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)


def hosted(model: gf.AdaptedModel) -> list[str]:
    return sorted(name for name, _ in model.hosts())


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=64)).eval()


def test_target_list_matches_suffixes():
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj", "mlp.2"]))
    assert hosted(model) == ["layers.0.mlp.2", "layers.0.q_proj", "layers.1.mlp.2", "layers.1.q_proj"]


def test_target_regex_is_a_full_match():
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=r"layers\.1\.(q|v)_proj"))
    assert hosted(model) == ["layers.1.q_proj", "layers.1.v_proj"]
    with pytest.raises(gf.GraftingError, match="matched no module"):
        gf.adapt(Net(), gf.LoraConfig(target_modules=r"q_proj"))  # a regex must match the whole name


def test_no_match_lists_existing_modules():
    with pytest.raises(gf.GraftingError) as e:
        gf.adapt(Net(), gf.LoraConfig(target_modules=["query"]))
    assert "layers.0.q_proj" in str(e.value) and "classifier" in str(e.value)


def test_unsupported_module_type_is_named():
    with pytest.raises(gf.GraftingError, match="GELU"):
        gf.adapt(Net(), gf.LoraConfig(target_modules=["mlp.1"]))


def test_all_linear_skips_the_output_head():
    model = gf.adapt(tiny_gpt2(), gf.LoraConfig(target_modules="all-linear"))
    names = hosted(model)
    assert "lm_head" not in names
    assert {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    assert len(names) == 2 * 4


def test_trainable_only_active_and_summary_counts():
    model = gf.adapt(Net(), gf.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("big", gf.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    per_layer = lambda r: r * 8 + 8 * r  # noqa: E731
    s = model.trainable_summary()
    assert s["trainable"] == 2 * per_layer(2)
    model.set_active("big")
    assert model.trainable_summary()["trainable"] == 4 * per_layer(4)
    total_base = sum(p.numel() for p in Net().parameters())
    assert model.trainable_summary()["total"] == total_base + 2 * per_layer(2) + 4 * per_layer(4)


def test_rank_and_alpha_patterns():
    cfg = gf.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"layers.1.q_proj": 2}, alpha_pattern={"v_proj": 2})
    model = gf.adapt(Net(), cfg)
    hosts = dict(model.hosts())
    a = hosts["layers.1.q_proj"].adapters["default"]
    assert a.lora_A.shape == (2, 8) and a.scaling == 8 / 2
    v = hosts["layers.0.v_proj"].adapters["default"]
    assert v.lora_A.shape == (4, 8) and v.scaling == 2 / 4
    rs = gf.adapt(Net(), gf.LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert dict(rs.hosts())["layers.0.q_proj"].adapters["default"].scaling == pytest.approx(8 / 4)


def test_adapter_name_and_duplicate_errors():
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(gf.GraftingError, match="already exists"):
        model.add_adapter("default", gf.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(gf.GraftingError, match="name"):
        model.add_adapter("a.b", gf.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(gf.GraftingError, match="no adapter named"):
        model.set_active("missing")
    with pytest.raises(gf.GraftingError, match="already adapted"):
        gf.adapt(model, gf.LoraConfig(target_modules=["q_proj"]))


def test_failed_add_leaves_model_unchanged():
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(gf.GraftingError):
        model.add_adapter("x", gf.LoraConfig(target_modules=["q_proj"], modules_to_save=["nothing_like_this"]))
    assert model.adapter_names() == ["default"]
    assert before.keys() == model.state_dict().keys()


def test_listed_hosts_follow_every_change_to_the_module_tree():
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"]))
    assert hosted(model) == ["layers.0.q_proj", "layers.1.q_proj"]
    model.add_adapter("v", gf.LoraConfig(target_modules=["v_proj"], modules_to_save=["classifier"]))
    assert hosted(model) == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert [n for n, _ in model.saved_modules()] == ["classifier"]
    host = model.base_model.layers[1].v_proj
    model.base_model.layers[1].v_proj = host.base_layer  # a user swaps a module out: listed anew
    assert hosted(model) == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj"]
    model.base_model.layers[0] = Block()  # a whole block replaced
    assert hosted(model) == ["layers.1.q_proj"]
    # changes that register nothing (torch's hooks do not see them) are caught too
    blocks = model.base_model.layers
    blocks.insert(0, copy.deepcopy(blocks[1]))
    assert hosted(model) == ["layers.0.q_proj", "layers.2.q_proj"]
    del blocks[0]
    assert hosted(model) == ["layers.1.q_proj"]
    blocks.insert(2, copy.deepcopy(blocks[1]))  # at the end: no existing child moves
    assert hosted(model) == ["layers.1.q_proj", "layers.2.q_proj"]
    blocks.pop(1)
    assert hosted(model) == ["layers.1.q_proj"]
    delattr(blocks[1], "q_proj")
    assert hosted(model) == []
    copied = copy.deepcopy(model)  # a copy lists its own modules, not the original's
    assert all(h is copied.base_model.get_submodule(n) for n, h in copied.hosts())


class SlicingNet(Net):
    """Builds a ModuleList in every forward, as transformers' Llama-family models do (``self.layers[:n]``)."""

    def forward(self, x):
        for layer in self.layers[:2]:
            x = layer(x)
        return self.classifier(x)


def test_module_lists_built_during_a_forward_do_not_relist_the_model_or_its_adapters():
    model = gf.adapt(SlicingNet(), gf.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", gf.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    x, names = torch.randn(2, 8), ["default", "b"]
    with torch.no_grad():
        model(x, adapter_names=names)
        hosts, owners = model._tree()[0], dict(model._owners)
        model(x, adapter_names=names)
    assert model._tree()[0] is hosts and all(model._owners[n] is owners[n] for n in owners)
    b = dict(model.hosts())["layers.0.v_proj"].adapters["b"]
    b.register_buffer("extra", torch.ones(1))  # a listed adapter module registering still counts
    model.base_model.layers[1] = Block()  # and so does a module swapped into the model
    with torch.no_grad():
        model(x, adapter_names=names)
    assert model._tree()[0] is not hosts and model._owners["b"] is not owners["b"]
    assert hosted(model) == ["layers.0.q_proj", "layers.0.v_proj"]


def test_adding_or_deleting_one_adapter_does_not_relist_the_others_or_the_tree():
    """A serving pool installs and evicts adapters between decode steps: each change re-lists only the adapter it
    touched, not every adapter of the next call (nor the model's tree, when it lands in existing hosts)."""
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", gf.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        model(x, adapter_names=["default", "b"])
    hosts, owners = model._tree()[0], dict(model._owners)
    model.add_adapter("c", gf.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        model(torch.randn(3, 8), adapter_names=["default", "b", "c"])
    model.delete_adapter("c")
    with torch.no_grad():
        model(x, adapter_names=["default", "b"])
    assert model._tree()[0] is hosts and all(model._owners[n] is owners[n] for n in owners)
    before = model.content_hash("b")
    module = dict(model.hosts())["layers.0.q_proj"].adapters["b"]
    module.lora_B = torch.nn.Parameter(torch.randn_like(module.lora_B))  # a registration on b's own module
    assert model.content_hash("b") != before and model._owners["b"] is not owners["b"]
    assert model._owners["default"] is owners["default"]


def _mixed_row_error(model, x, name):
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", name])
        model.set_active(name)
        return (mixed[1] - model(x)[1]).abs().max().item()


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "replace_root"])
def test_an_adapter_changed_on_a_copy_or_swapped_whole_is_served_anew(how):
    """A copied model carries grafting's listings but not their watch on its modules; an adapter replaced
    whole is a registration on its host's container: both must re-list and re-hash the adapter."""
    import pickle
    torch.manual_seed(0)
    model = gf.adapt(Net(), gf.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", gf.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    x = torch.randn(2, 8)
    assert _mixed_row_error(model, x, "b") < 1e-5
    if how == "deepcopy":
        model = copy.deepcopy(model)
    elif how == "pickle":
        model = pickle.loads(pickle.dumps(model))
    assert _mixed_row_error(model, x, "b") < 1e-5
    host = dict(model.hosts())["layers.0.q_proj"]
    before = model.content_hash("b")
    if how == "replace_root":
        new = copy.deepcopy(host.adapters["b"])
        with torch.no_grad():
            new.lora_B.mul_(5)
        host.adapters["b"] = new
    else:
        host.adapters["b"].lora_B = nn.Parameter(torch.randn_like(host.adapters["b"].lora_B) * 3)
    assert model.content_hash("b") != before
    assert _mixed_row_error(model, x, "b") < 1e-5


def test_delete_adapter_frees_its_slot_and_layers():
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", gf.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    x = torch.randn(2, 8)
    with torch.no_grad():
        model(x, adapter_names=["default", "b"])
    model.delete_adapter("b")
    assert all("b" not in h.adapters for _, h in model.hosts())
    model.add_adapter("c", gf.LoraConfig(r=7, target_modules=["q_proj"], init_lora_weights=False))
    assert model._routing.slot_of["c"] == (8, 2)  # rank bucket 8 (r=7 padded), the freed slot is reused
    with torch.no_grad():
        mixed = model(x, adapter_names=["c", "default"])
    model.set_active("c")
    torch.testing.assert_close(mixed[0], model(x)[0], atol=1e-5, rtol=1e-4)


def test_deleting_adapters_keeps_exactly_the_active_ones_trainable():
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"]))
    for name in ("b", "c"):
        model.add_adapter(name, gf.LoraConfig(target_modules=["q_proj"]))
    model.set_active(["default", "c"])

    def trainable():
        return {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}

    assert trainable() == {"default", "c"}
    model.delete_adapter("b")  # inactive: the others keep their state
    assert trainable() == {"default", "c"}
    model.delete_adapter("c")  # active: gone from the active set
    assert trainable() == {"default"} and model.active_adapters == ("default",)


def test_mixed_batch_sees_parameter_updates():
    """The stacked factors are a cache: training between mixed forwards must not serve stale weights."""
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", gf.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    x = torch.randn(2, 8)
    with torch.no_grad():
        first = model(x, adapter_names=["default", "b"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).sum().backward()
    opt.step()
    with torch.no_grad():
        second = model(x, adapter_names=["default", "b"])
        assert not torch.allclose(first[0], second[0])
        torch.testing.assert_close(second[0], model(x)[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(second[1], first[1])


def test_mixed_batch_errors():
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"]))
    x = torch.randn(3, 8)
    with pytest.raises(gf.GraftingError, match="3 rows"):
        model(x, adapter_names=["default", None])
    with pytest.raises(gf.GraftingError, match="unknown adapter"):
        model(x, adapter_names=["default", None, "nope"])
    model.merge()
    with pytest.raises(gf.GraftingError, match="merged"):
        model(x, adapter_names=["default", None, None])
    with pytest.raises(gf.GraftingError, match="merged"), model.disabled():
        model(x)


def test_modules_to_save_trains_a_copy_per_adapter():
    base = Net()
    reference = copy.deepcopy(base)
    model = gf.adapt(base, gf.LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))
    saved = dict(model.saved_modules())["classifier"]
    assert saved.copies["default"].weight.requires_grad
    assert not saved.original_module.weight.requires_grad
    with torch.no_grad():
        saved.copies["default"].bias.add_(1.0)
    x = torch.randn(2, 8)
    torch.testing.assert_close(model(x), reference(x) + 1.0)
    with model.disabled():
        torch.testing.assert_close(model(x), reference(x))
    mixed = model(x, adapter_names=[None, "default"])
    torch.testing.assert_close(mixed, torch.stack([reference(x)[0], reference(x)[1] + 1.0]))
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(x), reference(x) + 1.0)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_make_biases_trainable(bias):
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"], bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    targeted = {f"base_model.layers.{i}.q_proj.base_layer.bias" for i in range(2)}
    if bias == "lora_only":
        assert trainable == targeted
    else:
        assert targeted < trainable and "base_model.classifier.bias" in trainable
    model.add_adapter("plain", gf.LoraConfig(target_modules=["q_proj"]))
    model.set_active(["default", "plain"])
    model.delete_adapter("default")  # the biases were trainable for it alone: frozen again
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))
    assert all(p.requires_grad for n, p in model.named_parameters() if ".plain" in n or "plain." in n)


def test_inference_adapter_stays_frozen(tmp_path):
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"]))
    model.save_adapter(tmp_path / "a")
    loaded = gf.load(Net(), tmp_path / "a")
    assert loaded.trainable_summary()["trainable"] == 0
    loaded.set_active("default")
    assert loaded.trainable_summary()["trainable"] == 0
    trainable = gf.load(Net(), tmp_path / "a", is_trainable=True)
    assert trainable.trainable_summary()["trainable"] > 0


def test_hf_kwargs_and_generate_with_mixed_rows():
    base = tiny_gpt2()
    model = gf.adapt(base, gf.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    model.add_adapter("b", gf.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    randomize(model, scale=1.0)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.loss is not None and model.config.n_layer == 2
    names = ["default", "b", None]
    mixed = model.generate(ids, max_new_tokens=6, do_sample=False, adapter_names=names, pad_token_id=0)
    for i, name in enumerate(names):
        if name is None:
            with model.disabled():
                single = model.generate(ids[i:i + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        else:
            model.set_active(name)
            single = model.generate(ids[i:i + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(mixed[i], single[0])
    assert not torch.equal(mixed[0], mixed[2])


def test_dropout_only_in_training():
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False))
    x = torch.randn(4, 8)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_inference_mode_then_training_and_deleting():
    """Caches filled under inference_mode (DoRA norms, mixed-batch stacks) must not leak into autograd or
    block in-place updates afterwards."""
    model = gf.adapt(Net(), gf.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    model.add_adapter("b", gf.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    x = torch.randn(2, 8)
    with torch.inference_mode():
        model(x)
        model(x, adapter_names=["default", "b"])
    model(x).sum().backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", "b"])
        torch.testing.assert_close(mixed[0], model(x)[0], atol=1e-5, rtol=1e-4)
    model.delete_adapter("b")
    assert model.adapter_names() == ["default"]


def test_mixed_batch_views_and_gathers_agree():
    """Rows in slot order read stacked factors as views; any other order gathers: same answers."""
    model = gf.adapt(Net(), gf.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    for name in ("b", "c"):
        model.add_adapter(name, gf.LoraConfig(r=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    x = torch.randn(3, 8)
    with torch.no_grad():
        in_order = model(x, adapter_names=["a", "b", "c"])
        shuffled = model(x[[2, 0, 1]], adapter_names=["c", "a", "b"])
        # rows sharing adapters (9 rows, 4 slots incl. the base): each adapter's factors gathered once, rows
        # grouped behind them; "a" does not touch v_proj, so its rows fall into the zero slot there
        names = ["b", None, "a", "b", "c", "a", "b", None, "c"]
        pick = [{"a": 0, "b": 1, "c": 2}.get(n, 0) for n in names]
        grouped = model(x[pick], adapter_names=names)
        with model.disabled():
            base = model(x[pick])
    torch.testing.assert_close(shuffled, in_order[[2, 0, 1]], atol=1e-6, rtol=1e-5)
    for i, name in enumerate(names):
        want = base[i] if name is None else in_order[pick[i]]
        torch.testing.assert_close(grouped[i], want, atol=1e-6, rtol=1e-5)
