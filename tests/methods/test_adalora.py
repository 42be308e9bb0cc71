"""AdaLoRA (arXiv 2303.10512): the SVD-form rule ΔW = α/r·P Λ Q on small tensors, its parameter count and init,
the orthogonality penalty, the cubic budget schedule, and the importance-based allocator run step for step
against peft's (same masks, same parameters), with adapters crossing between peft and grafting both ways,
including ones whose rank_pattern cuts triplets (and a whole layer)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import grafting as gf
from toys import assert_rows_match
from grafting.methods.adalora import AdaLoraConfig, budget_schedule

peft = pytest.importorskip("peft")


class Out:
    """What a transformers model returns with labels: peft's AdaLoRA adds its penalty to ``loss``."""

    def __init__(self, logits, loss):
        self.logits, self.loss = logits, loss


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(12, 10), nn.Linear(10, 6), nn.Linear(6, 3)

    def forward(self, x, y=None):
        out = self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))
        return out if y is None else Out(out, F.mse_loss(out, y))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 5, 3, padding=1), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean((2, 3)))


def peft_layer(theirs, name):
    return theirs.base_model.model.get_submodule(name)


def test_forward_is_the_svd_form_with_alpha_over_init_r():
    model = gf.adapt(Net(), AdaLoraConfig(init_r=4, lora_alpha=6, target_modules=["a", "b"], init_lora_weights=False))
    host = dict(model.hosts())["b"]
    ad = host.adapters["default"]
    P, lam, Q = ad.lora_B, ad.lora_E.view(-1), ad.lora_A
    assert P.shape == (6, 4) and lam.shape == (4,) and Q.shape == (4, 10)
    x = torch.randn(5, 10)
    W0, b0 = host.base_layer.weight, host.base_layer.bias
    expect = x @ W0.t() + b0 + 6 / (4 + 1e-5) * (((x @ Q.t()) * lam) @ P.t())
    torch.testing.assert_close(host(x), expect, atol=1e-6, rtol=1e-5)
    dw = host.methods["default"].delta_weight(ad, host)
    torch.testing.assert_close(dw, 6 / (4 + 1e-5) * P @ torch.diag(lam) @ Q, atol=1e-6, rtol=1e-5)


def test_init_starts_at_the_base_counts_r_times_fan_in_plus_out_plus_one_and_equals_peft():
    cfg = dict(init_r=4, target_r=2, total_step=10, target_modules=["a", "b"])
    torch.manual_seed(5)
    theirs = peft.get_peft_model(Net(), peft.AdaLoraConfig(**cfg))
    torch.manual_seed(5)
    ours = gf.adapt(Net(), AdaLoraConfig(**cfg))
    x = torch.randn(3, 12)
    with ours.disabled():
        base = ours(x)
    torch.testing.assert_close(ours(x), base)
    assert ours.trainable_summary()["trainable"] == 4 * (12 + 10 + 1) + 4 * (10 + 6 + 1)
    for name, host in ours.hosts():
        ad = host.adapters["default"]
        assert torch.all(ad.lora_E == 0) and 0.01 < ad.lora_A.std() < 0.04
        for attr in ("lora_A", "lora_B", "lora_E"):  # peft's draws, in peft's order
            assert torch.equal(getattr(ad, attr), getattr(peft_layer(theirs, name), attr)["default"])


def test_orthogonality_penalty_is_the_mean_frobenius_distance_and_equals_peft():
    cfg = dict(init_r=4, total_step=10, target_modules=["a", "b"], init_lora_weights=False, orth_reg_weight=0.3)
    ours = gf.adapt(Net(), AdaLoraConfig(**cfg))
    hosts = dict(ours.hosts())
    terms = []
    for name in ("a", "b"):
        ad = hosts[name].adapters["default"]
        terms.append(torch.linalg.norm(ad.lora_A @ ad.lora_A.t() - torch.eye(4)))  # ||QQᵀ − I||_F
        terms.append(torch.linalg.norm(ad.lora_B.t() @ ad.lora_B - torch.eye(4)))  # ||PᵀP − I||_F
    reg = ours.regularizer()
    torch.testing.assert_close(reg, 0.3 * sum(terms) / 4)
    reg.backward()
    assert hosts["a"].adapters["default"].lora_A.grad is not None

    theirs = peft.get_peft_model(Net(), peft.AdaLoraConfig(**cfg))
    for name in ("a", "b"):
        for attr in ("lora_A", "lora_B", "lora_E"):
            with torch.no_grad():
                getattr(peft_layer(theirs, name), attr)["default"].copy_(getattr(hosts[name].adapters["default"], attr))
    x, y = torch.randn(4, 12), torch.randn(4, 3)
    plain = F.mse_loss(ours(x), y)
    torch.testing.assert_close(theirs.base_model(x, y).loss - plain, reg.detach(), atol=1e-5, rtol=1e-5)
    off = gf.adapt(Net(), AdaLoraConfig(**{**cfg, "orth_reg_weight": 0.0}))
    assert float(off.regularizer()) == 0.0


def test_budget_follows_the_cubic_schedule_and_peft():
    cfg = AdaLoraConfig(init_r=6, target_r=2, tinit=10, tfinal=20, deltaT=5, total_step=100, target_modules=["a"])
    b0, bT = 6 * 3, 2 * 3  # three layers
    theirs = peft.get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)),
                                 peft.AdaLoraConfig(init_r=6, target_r=2, tinit=10, tfinal=20, deltaT=5,
                                                    total_step=100, target_modules=["0", "1", "2"]))
    allocator = theirs.base_model.rankallocator
    for step in (0, 1, 10, 11, 15, 33, 50, 79, 80, 81, 100):
        budget, mask = budget_schedule(step, b0, bT, cfg, 100)
        if step <= 10:
            assert (budget, mask) == (b0, False)
        elif step > 80:
            assert (budget, mask) == (bT, True)
        else:
            assert budget == int(bT + (b0 - bT) * (1 - (step - 10) / (100 - 20 - 10)) ** 3)
            assert mask == (step % 5 == 0)
        assert (budget, mask) == allocator.budget_schedule(step)
    assert budget_schedule(80, b0, bT, cfg, 100)[0] == bT and budget_schedule(11, b0, bT, cfg, 100)[0] < b0


def copy_from_peft(theirs, ours, names):
    hosts = dict(ours.hosts())
    with torch.no_grad():
        for name in names:
            for attr in ("lora_A", "lora_B", "lora_E"):
                getattr(hosts[name].adapters["default"], attr).copy_(getattr(peft_layer(theirs, name), attr)["default"])


def test_allocator_cuts_the_same_triplets_as_peft_step_for_step(tmp_path):
    total = 10
    cfg = dict(init_r=4, target_r=1, tinit=1, tfinal=2, deltaT=2, total_step=total, lora_alpha=4, orth_reg_weight=0.1,
               target_modules=["a", "b"], init_lora_weights=False)
    theirs = peft.get_peft_model(Net(), peft.AdaLoraConfig(**cfg))
    ours = gf.adapt(Net(), AdaLoraConfig(**cfg))
    copy_from_peft(theirs, ours, ["a", "b"])
    hosts = dict(ours.hosts())
    mine = [getattr(hosts[n].adapters["default"], a) for n in ("a", "b") for a in ("lora_A", "lora_B", "lora_E")]
    peers = [getattr(peft_layer(theirs, n), a)["default"] for n in ("a", "b") for a in ("lora_A", "lora_B", "lora_E")]
    opts = [torch.optim.AdamW(ps, lr=0.05) for ps in (mine, peers)]
    g = torch.Generator().manual_seed(1)
    kept = []
    for step in range(1, total + 1):
        x, y = torch.randn(8, 12, generator=g), torch.randn(8, 3, generator=g)
        (ours(x, y).loss + ours.regularizer()).backward()
        theirs.base_model(x, y).loss.backward()
        for opt in opts:
            opt.step()
        ours.on_step(step, total)
        theirs.base_model.update_and_allocate(step)
        for opt in opts:
            opt.zero_grad()
        for p, q in zip(mine[2::3], peers[2::3]):  # the same λ are zero (cut) after every step
            assert torch.equal(p == 0, q == 0), step
        kept.append(sum(int((p != 0).sum()) for p in mine[2::3]))
        if step == total - cfg["tfinal"] - 1:  # the smoothed sensitivity and uncertainty, entry by entry
            allocator = theirs.base_model.rankallocator
            for n in ("a", "b"):
                for attr, (avg, unc) in hosts[n].adapters["default"].importance.items():
                    torch.testing.assert_close(avg, allocator.exp_avg_ipt[f"{n}.{attr}.default"])
                    torch.testing.assert_close(unc, allocator.exp_avg_unc[f"{n}.{attr}.default"])
    for p, q in zip(mine, peers):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    assert kept[0] == 8 and kept[-1] == 2 and kept[3] < 8  # budget 8 at tinit, cut on the way, 1 per layer at the end
    pattern = theirs.peft_config["default"].rank_pattern
    assert ours.peft_config["default"].allocated == {k.replace(".default", ""): v for k, v in pattern.items()}

    theirs.save_pretrained(tmp_path / "peft")
    ours.save_adapter(tmp_path / "ours")
    read = {d: json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours")}
    assert read["ours"]["rank_pattern"] == read["peft"]["rank_pattern"] and read["ours"]["peft_type"] == "ADALORA"
    t_peft, t_ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert sorted(t_peft) == sorted(t_ours)
    for k in t_peft:
        torch.testing.assert_close(t_ours[k], t_peft[k], atol=1e-5, rtol=1e-4)
    assert sum(t_ours[f"base_model.model.{n}.lora_E"].shape[0] for n in ("a", "b")) == 2

    x = torch.randn(5, 12)
    with torch.no_grad():
        loaded = gf.load(Net(), tmp_path / "peft")
        torch.testing.assert_close(loaded(x), theirs(x), atol=1e-5, rtol=1e-4)
        back = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
        torch.testing.assert_close(back(x), ours(x), atol=1e-5, rtol=1e-4)
        # the native form (checkpoints) keeps every triplet, the cut ones at λ = 0, and loads back as it is
        ours.save_adapter(tmp_path / "native", export=False)
        native = gf.load(Net(), tmp_path / "native")
        assert dict(native.hosts())["a"].adapters["default"].lora_A.shape[0] == 4
        torch.testing.assert_close(native(x), ours(x), atol=0, rtol=0)


def test_final_phase_keeps_the_mask_and_a_resumed_run_recovers_it():
    cfg = AdaLoraConfig(init_r=4, target_r=1, total_step=4, tfinal=2, target_modules=["a", "b"],
                        init_lora_weights=False, orth_reg_weight=0.0)
    model = gf.adapt(Net(), cfg)
    for step in (1, 2):  # step 2 = total_step - tfinal: the final mask
        x, y = torch.randn(8, 12), torch.randn(8, 3)
        model(x, y).loss.backward()
        model.on_step(step, 4)
        model.zero_grad()
    lam = [h.adapters["default"].lora_E for _, h in model.hosts()]
    cut = [(p == 0).view(-1).clone() for p in lam]
    assert sum(int((~c).sum()) for c in cut) == 2
    with torch.no_grad():
        for p in lam:
            p.add_(1.0)  # training moves the cut λ again...
    model.on_step(3, 4)
    assert all(torch.equal(p.view(-1) == 0, c) for p, c in zip(lam, cut))  # ...and they are cut again

    # a run resumed from a checkpoint (native form: cut λ saved as 0) in the final phase finds the same mask
    resumed = gf.adapt(Net(), AdaLoraConfig(**{**cfg.__dict__, "allocated": {}}))
    copy = {n: h.adapters["default"] for n, h in resumed.hosts()}
    with torch.no_grad():
        for (n, h) in model.hosts():
            for attr in ("lora_A", "lora_B", "lora_E"):
                getattr(copy[n], attr).copy_(getattr(h.adapters["default"], attr))
    resumed.on_step(4, 4)
    assert resumed.peft_config["default"].allocated == model.peft_config["default"].allocated


def masked_peft_adapter(net, cfg, pattern, path):
    theirs = peft.get_peft_model(net, peft.AdaLoraConfig(**cfg))
    with torch.no_grad():
        for key, mask in pattern.items():  # what the allocator leaves: cut triplets have λ = 0
            peft_layer(theirs, key.split(".lora_E")[0]).lora_E["default"].masked_fill_(~torch.tensor(mask)[:, None], 0)
    theirs.base_model.peft_config["default"].rank_pattern = {f"{k}.default": v for k, v in pattern.items()}
    theirs.save_pretrained(path)
    return theirs


@torch.no_grad()
def test_peft_adapters_with_cut_triplets_load_at_their_kept_rank_and_serve_mixed_batches(tmp_path):
    cfg = dict(init_r=4, target_r=2, total_step=10, target_modules=["a", "b"], init_lora_weights=False)
    pattern = {"a.lora_E": [True, False, True, True], "b.lora_E": [False] * 4}
    theirs = masked_peft_adapter(Net(), cfg, pattern, tmp_path / "cut")
    full = peft.get_peft_model(Net(), peft.AdaLoraConfig(**cfg))
    full.save_pretrained(tmp_path / "full")
    x = torch.randn(4, 12)
    ours = gf.load(Net(), tmp_path / "cut")
    hosts = dict(ours.hosts())
    assert hosts["a"].adapters["default"].lora_A.shape == (3, 12) and hosts["b"].adapters["default"].lora_E.numel() == 0
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)
    reader = gf.AdapterReader(tmp_path / "cut")
    for name, host in hosts.items():  # ΔW from the file alone (merging, serving from disk)
        dw = reader.method.delta_weight_from_tensors(reader.layer_tensors(name), reader.config, name, "linear", {})
        torch.testing.assert_close(dw, host.methods["default"].delta_weight(host.adapters["default"], host))
    ours.load_adapter(tmp_path / "full", "other")
    assert_rows_match(ours, x, ["other", None, "default", "other"])
    ours.save_adapter(tmp_path / "again", name="default")  # saved as loaded: peft reads it back
    again = peft.PeftModel.from_pretrained(Net(), tmp_path / "again")
    torch.testing.assert_close(again(x), theirs(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["conv2d", "conv1d"])
@torch.no_grad()
def test_conv_layers_cross_between_peft_and_grafting(tmp_path, kind):
    if kind == "conv2d":
        make, x, target = ConvNet, torch.randn(2, 3, 6, 6), "conv"
    else:
        from transformers.pytorch_utils import Conv1D

        def make():
            torch.manual_seed(0)
            return nn.Sequential(Conv1D(10, 12), nn.Tanh(), nn.Linear(10, 3))
        x, target = torch.randn(2, 5, 12), "0"
    cfg = dict(init_r=3, target_r=1, total_step=10, target_modules=[target], init_lora_weights=False)
    theirs = masked_peft_adapter(make(), cfg, {f"{target}.lora_E": [True, False, True]}, tmp_path / "peft")
    ours = gf.load(make(), tmp_path / "peft")
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)
    mine = gf.adapt(make(), AdaLoraConfig(**cfg))
    mine.save_adapter(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    torch.testing.assert_close(back(x), mine(x), atol=1e-5, rtol=1e-4)


def test_bad_configs_are_refused_clearly():
    with pytest.raises(gf.GraftingError, match="'init_r' must be a positive integer"):
        AdaLoraConfig(init_r=0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'total_step' must be more than tinit"):
        AdaLoraConfig(tinit=5, tfinal=5, total_step=10, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'beta1' must be a number in"):
        AdaLoraConfig(beta1=1.0, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'orth_reg_weight' must be a non-negative"):
        AdaLoraConfig(orth_reg_weight=-1, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match=r"'rank_pattern\['a.lora_E'\]' must be a list of 12"):
        AdaLoraConfig(rank_pattern={"a.lora_E": [True, False]}, target_modules=["a"])
    with pytest.raises(gf.GraftingError, match="'deltaT' must be a positive integer"):
        AdaLoraConfig(deltaT=0, target_modules=["a"])
    unset = gf.adapt(Net(), AdaLoraConfig(tinit=2, tfinal=2, target_modules=["a"]))  # total_step: the trainer's
    with pytest.raises(gf.GraftingError, match="training runs 4 steps, not more than tinit"):
        unset.on_step(1, 4)
    unset.on_step(1, 5)
    assert unset.peft_config["default"].total_step == 5
    with pytest.raises(gf.GraftingError, match="does not support embedding"):
        gf.adapt(nn.Sequential(nn.Embedding(5, 4)), AdaLoraConfig(target_modules=["0"]))
