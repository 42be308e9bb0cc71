"""KaSA (arXiv 2412.06071): the paper's rule h = W_world x + s·B diag(Δσ) A x with W_world the base minus its r
smallest singular components, the parameter count, the truncated base and the regularizer equal to peft's,
adapters crossing between peft and grafting in both directions, and KaSA adapters served side by side."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import grafting as gf
from grafting.config import config_from_peft_dict
from grafting.io.reader import AdapterReader
from grafting.methods.kasa import KasaConfig
from toys import Mlp as Net

peft = pytest.importorskip("peft")

TARGETS = ["a", "b"]


def peft_kasa(**kw):
    kasa = peft.KasaConfig(**kw.pop("kasa", {}))
    return peft.get_peft_model(Net(), peft.LoraConfig(target_modules=TARGETS, kasa_config=kasa, **kw))


def world(w: torch.Tensor, r: int) -> torch.Tensor:
    """W minus its r smallest singular components (the paper's W_world)."""
    U, S, Vh = torch.linalg.svd(w.detach(), full_matrices=False)
    k = S.shape[0] - r
    return (U[:, :k] * S[:k]) @ Vh[:k]


def test_forward_is_the_papers_rule_on_the_truncated_base():
    model = gf.adapt(Net(), KasaConfig(r=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False))
    host = dict(model.hosts())["b"]
    ad = host.adapters["default"]
    W, b0 = host.base_layer.weight, host.base_layer.bias
    Ww = world(W, 3)
    assert torch.linalg.matrix_rank(Ww) == 6 - 3
    x = torch.randn(5, 10)
    expect = x @ Ww.t() + b0 + 2.0 * (((x @ ad.lora_A.t()) * ad.lora_diag) @ ad.lora_B.t())
    torch.testing.assert_close(host(x), expect, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the frozen-factor form and the mixed-batch factors are the same ΔW
        A, B, s = host.methods["default"].low_rank(ad)
        assert A.shape == (6, 10) and B.shape == (6, 6)  # rank 2r against the untouched base
        torch.testing.assert_close(W + s * B @ A, Ww + 2.0 * (ad.lora_B * ad.lora_diag) @ ad.lora_A,
                                   atol=1e-5, rtol=1e-5)


def test_init_truncates_the_base_and_trains_r_times_in_plus_out_plus_r_parameters():
    net = Net()
    W = net.a.weight.detach().clone()
    model = gf.adapt(net, KasaConfig(r=4, target_modules=TARGETS))
    for _, host in model.hosts():
        assert torch.all(host.adapters["default"].lora_B == 0)
    assert torch.equal(model.base_model.a.base_layer.weight, W)  # the base layer itself is never written
    x = torch.randn(3, 12)
    with model.disabled():
        base = model(x)
    truncated = Net()
    with torch.no_grad():
        truncated.a.weight.copy_(world(truncated.a.weight, 4))
        truncated.b.weight.copy_(world(truncated.b.weight, 4))
    torch.testing.assert_close(model(x), truncated(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x), base, atol=1e-3)  # the truncation changes the function at init
    assert model.trainable_summary()["trainable"] == (4 * (12 + 10) + 4) + (4 * (10 + 6) + 4)
    model.delete_adapter("default")
    torch.testing.assert_close(model(x), base, atol=0, rtol=0)


@torch.no_grad()
def test_truncated_base_equals_peft():
    theirs = peft_kasa(r=3)
    ours = gf.adapt(Net(), KasaConfig(r=3, target_modules=TARGETS))
    for name, host in ours.hosts():
        ad = host.adapters["default"]
        effective = host.base_layer.weight - ad.kasa_us @ ad.kasa_vh
        torch.testing.assert_close(effective, getattr(theirs.base_model.model, name).base_layer.weight,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
@torch.no_grad()
def test_adapters_cross_between_peft_and_grafting(tmp_path, rslora):
    x = torch.randn(4, 12)
    kw = dict(r=3, lora_alpha=5, use_rslora=rslora, init_lora_weights=False)
    theirs = peft_kasa(kasa={"beta": 0.02, "gamma": 0.3}, **kw)
    theirs.save_pretrained(tmp_path / "peft")
    ours = gf.load(Net(), tmp_path / "peft")
    assert isinstance(ours.peft_config["default"], KasaConfig) and ours.peft_config["default"].method == "kasa"
    assert ours.peft_config["default"].kasa_config == {"beta": 0.02, "gamma": 0.3}
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)

    mine = gf.adapt(Net(), KasaConfig(target_modules=TARGETS, kasa_config={"gamma": 0.5}, **kw))
    mine.save_adapter(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["kasa_config"] == {"beta": 1e-4, "gamma": 0.5}
    loaded = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
    assert loaded.peft_config["default"].kasa_config.gamma == 0.5
    torch.testing.assert_close(loaded(x), mine(x), atol=1e-5, rtol=1e-5)
    back = gf.load(Net(), tmp_path / "ours")
    torch.testing.assert_close(back(x), mine(x), atol=0, rtol=0)


def test_regularizer_equals_peft_kasa_loss_and_trains_the_singular_values(tmp_path):
    theirs = peft_kasa(r=3, init_lora_weights=False, kasa={"beta": 0.05, "gamma": 0.2})
    theirs.save_pretrained(tmp_path / "p")
    ours = gf.load(Net(), tmp_path / "p", is_trainable=True)
    reg = ours.regularizer()
    torch.testing.assert_close(reg, theirs.base_model._get_kasa_loss(), atol=1e-6, rtol=1e-6)
    reg.backward()
    ad = dict(ours.hosts())["a"].adapters["default"]
    # d/dΔσ of β||Δσ||² is 2βΔσ (the orthogonality term does not involve Δσ)
    torch.testing.assert_close(ad.lora_diag.grad, 2 * 0.05 * ad.lora_diag.detach())
    assert ad.lora_A.grad.abs().sum() > 0 and ad.lora_B.grad.abs().sum() > 0


@torch.no_grad()
def test_merge_gives_peft_merged_weights_and_files_merge_without_a_model(tmp_path):
    theirs = peft_kasa(r=3, lora_alpha=4, init_lora_weights=False)
    theirs.save_pretrained(tmp_path / "p")
    ours = gf.load(Net(), tmp_path / "p")
    x = torch.randn(3, 12)
    before = ours(x)
    plain_theirs = theirs.merge_and_unload()
    reader, original = AdapterReader(tmp_path / "p"), Net()
    plain = ours.merge_and_unload()
    for name in TARGETS:
        merged = getattr(plain_theirs, name).weight
        torch.testing.assert_close(getattr(plain, name).weight, merged, atol=1e-5, rtol=1e-5)
        dw = reader.delta_weight(name, getattr(original, name).weight)  # from the file and the original base
        torch.testing.assert_close(getattr(original, name).weight + dw, merged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain(x), before, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_kasa_adapters_side_by_side_each_see_the_original_base(tmp_path):
    for i, r in enumerate((2, 3)):
        torch.manual_seed(10 + i)
        peft_kasa(r=r, init_lora_weights=False).save_pretrained(tmp_path / f"k{i}")
    model = gf.load(Net(), tmp_path / "k0", adapter_name="k0")
    model.load_adapter(tmp_path / "k1", name="k1")
    model.add_adapter("plain", gf.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    x = torch.randn(4, 12)
    mixed = model(x, adapter_names=["k1", None, "k0", "plain"])
    alone = [peft.PeftModel.from_pretrained(Net(), tmp_path / "k1")(x), Net()(x),
             peft.PeftModel.from_pretrained(Net(), tmp_path / "k0")(x)]
    for i, expect in enumerate(alone):
        torch.testing.assert_close(mixed[i], expect[i], atol=1e-5, rtol=1e-5)
    model.set_active("plain")
    torch.testing.assert_close(mixed[3], model(x)[3], atol=1e-5, rtol=1e-5)


def test_adapter_config_flags_select_kasa_and_plain_lora_files_stay_lora():
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": TARGETS}
    assert config_from_peft_dict(base).method == "lora"  # no kasa_config (older files): plain LoRA
    assert config_from_peft_dict({**base, "kasa_config": None}).method == "lora"
    cfg = config_from_peft_dict({**base, "kasa_config": {"beta": 0.1}})
    assert type(cfg) is KasaConfig and cfg.kasa_config == {"beta": 0.1, "gamma": 1e-3}
    assert gf.get_method("kasa").make_config(target_modules=TARGETS).method == "kasa"


@pytest.mark.parametrize("fields,named", [
    (dict(kasa_config={"beta": -1.0}), "kasa_config['beta']"),
    (dict(kasa_config={"gama": 0.1}), "kasa_config['gama']"),
    (dict(kasa_config=[0.1, 0.2]), "kasa_config"),
    (dict(use_dora=True), "use_dora"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(init_lora_weights="eva"), "init_lora_weights"),
    (dict(r=0), "r"),
])
def test_bad_config_names_the_field(fields, named):
    with pytest.raises(gf.GraftingError, match=f"field '{named}'".replace("[", r"\[").replace("]", r"\]")):
        KasaConfig(target_modules=TARGETS, **fields)


def test_rank_not_below_the_layer_size_and_other_layer_kinds_are_refused():
    with pytest.raises(gf.GraftingError, match="field 'r'.*min\\(in, out\\) = 6"):
        gf.adapt(Net(), KasaConfig(r=6, target_modules=TARGETS))
    emb = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 2))
    with pytest.raises(gf.GraftingError, match="does not support embedding"):
        gf.adapt(emb, KasaConfig(r=2, target_modules=["0"]))


def test_dropout_acts_on_the_update_only_as_in_peft(tmp_path):
    theirs = peft_kasa(r=3, lora_dropout=0.5, init_lora_weights=False)
    theirs.save_pretrained(tmp_path / "p")
    ours = gf.load(Net(), tmp_path / "p", is_trainable=True)
    theirs.train()
    ours.train()
    x = torch.randn(6, 12)
    torch.manual_seed(5)
    expect = theirs(x)
    torch.manual_seed(5)
    torch.testing.assert_close(ours(x), expect, atol=1e-5, rtol=1e-5)
