"""Inits as a stage: PiSSA / OLoRA change the base (checked against peft), data-aware inits read activations,
per-step hooks run after each optimizer step."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import grafting as gf
from grafting.registry import unregister
from test_model import Net


def peft_model(base, **kw):
    import peft
    return peft.get_peft_model(base, peft.LoraConfig(**kw))


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


KW = dict(r=3, lora_alpha=6, target_modules=["q_proj", "mlp.0"])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_base_equal_peft(init):
    torch.manual_seed(0)
    base = Net()
    ours = gf.adapt(copy.deepcopy(base), gf.LoraConfig(init_lora_weights=init, **KW))
    theirs = peft_model(copy.deepcopy(base), init_lora_weights=init, **KW)
    theirs_sd = theirs.state_dict()
    for name, host in ours.hosts():
        a = host.adapters["default"]
        key = f"base_model.model.{name}"
        torch.testing.assert_close(a.lora_A.detach(), theirs_sd[f"{key}.lora_A.default.weight"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.lora_B.detach(), theirs_sd[f"{key}.lora_B.default.weight"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(host.base_layer.weight.detach(), theirs_sd[f"{key}.base_layer.weight"],
                                   atol=1e-5, rtol=1e-4)
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), base(x), atol=1e-5, rtol=1e-4)  # residual + adapter = the original


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_adapter_applies_to_the_original_base(init, tmp_path):
    torch.manual_seed(0)
    base = Net()
    model = gf.adapt(copy.deepcopy(base), gf.LoraConfig(init_lora_weights=init, **KW))
    perturb(model)  # "training"
    x = torch.randn(4, 8)
    trained = model(x).detach()
    model.save_adapter(tmp_path / "converted")
    cfg = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 6 and cfg["lora_alpha"] == 12
    torch.testing.assert_close(gf.load(copy.deepcopy(base), tmp_path / "converted")(x), trained, atol=1e-5, rtol=1e-4)
    import peft
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "converted"))
    torch.testing.assert_close(theirs(x), trained, atol=1e-5, rtol=1e-4)

    model.save_adapter(tmp_path / "native", convert_init=False)  # peft's own form: the init is re-run on load
    assert json.loads((tmp_path / "native" / "adapter_config.json").read_text())["init_lora_weights"] == init
    torch.testing.assert_close(gf.load(copy.deepcopy(base), tmp_path / "native")(x), trained, atol=1e-5, rtol=1e-4)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "native"))
    torch.testing.assert_close(theirs(x), trained, atol=1e-5, rtol=1e-4)


def test_peft_pissa_adapter_loads_and_delete_restores_the_base(tmp_path):
    torch.manual_seed(0)
    base = Net()
    theirs = peft_model(copy.deepcopy(base), init_lora_weights="pissa", **KW)
    perturb(theirs)
    x = torch.randn(4, 8)
    theirs.save_pretrained(str(tmp_path / "p"))
    work = copy.deepcopy(base)
    ours = gf.load(work, tmp_path / "p")
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)
    ours.delete_adapter("default")
    for name, host in ours.hosts():
        torch.testing.assert_close(host.base_layer.weight, base.get_submodule(name).weight, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("init", ["corda", "loftq", "pissa_niter_4"])
def test_inits_that_cannot_be_reproduced_are_refused_by_name(init, tmp_path):
    gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"])).save_adapter(tmp_path / "a")
    f = tmp_path / "a" / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "init_lora_weights": init}))
    with pytest.raises(gf.GraftingError, match=f"init_lora_weights.*{init}"):
        gf.load(Net(), tmp_path / "a")


def test_inits_that_leave_the_base_alone_load_as_plain_lora(tmp_path):
    torch.manual_seed(0)
    model = gf.adapt(Net(), gf.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.save_adapter(tmp_path / "a")
    f = tmp_path / "a" / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "init_lora_weights": "eva"}))
    x = torch.randn(2, 8)
    torch.testing.assert_close(gf.load(copy.deepcopy(model.base_model), tmp_path / "a")(x), model(x))


def test_typos_and_strings_in_init_are_errors():
    with pytest.raises(gf.GraftingError, match="did you mean 'gaussian'"):
        gf.LoraConfig(init_lora_weights="gausian")
    with pytest.raises(gf.GraftingError, match="boolean"):
        gf.LoraConfig(init_lora_weights="true")


def test_data_aware_init_reads_each_layer_s_activations():
    """A method defined here whose init sets A to the top-r right singular vectors of the layer's inputs (the
    rule of EVA, arXiv:2410.07170, Eq. 2), computed independently below from hooks on a plain copy."""
    from dataclasses import dataclass

    from grafting.methods.lora import Lora

    @dataclass
    class PcaConfig(gf.LoraConfig):
        peft_type = "GRAFT_TEST_PCA"

    @gf.register("test-pca", config=PcaConfig)
    class Pca(Lora):
        """Test only: A from the activations' principal directions."""

        def needs_calibration(self, cfg):
            return True

        def init(self, adapter, host, cfg, activations):
            _, _, Vh = torch.linalg.svd(activations, full_matrices=False)
            with torch.no_grad():
                adapter.lora_A.copy_(Vh[: adapter.r])

    try:
        torch.manual_seed(0)
        base = Net()
        batches = [torch.randn(5, 8) for _ in range(3)]
        with pytest.raises(gf.GraftingError, match="calibration"):
            gf.adapt(copy.deepcopy(base), PcaConfig(r=2, target_modules=["q_proj"]))
        model = gf.adapt(copy.deepcopy(base), PcaConfig(r=2, target_modules=["q_proj"]), calibration=batches)
        seen = {}
        hooks = [base.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.setdefault(n, []).append(a[0])) for n in ("layers.0.q_proj", "layers.1.q_proj")]
        with torch.no_grad():
            for b in batches:
                base(b)
        for h in hooks:
            h.remove()
        for name, host in model.hosts():
            _, _, Vh = torch.linalg.svd(torch.cat(seen[name]), full_matrices=False)
            torch.testing.assert_close(host.adapters["default"].lora_A.detach().abs(), Vh[:2].abs(),
                                       atol=1e-5, rtol=1e-4)
    finally:
        unregister("test-pca")


def test_per_step_hooks_see_the_adapter_s_layers():
    from toy_method import step_recorder

    with step_recorder("test-count") as (CountingConfig, calls):
        model = gf.adapt(Net(), CountingConfig(target_modules=["v_proj"]))
        model.add_adapter("plain", gf.LoraConfig(target_modules=["q_proj"]))
        model.on_step(3, 10)
        assert calls == [(3, 10, ["layers.0.v_proj", "layers.1.v_proj"], False)]  # no backward yet: no gradients
        model.set_active("plain")
        model.on_step(4, 10)
        assert len(calls) == 1  # only active adapters' methods run
