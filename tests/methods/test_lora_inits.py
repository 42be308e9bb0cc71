"""LoRA inits that decompose the base weight (lora_inits.py): pissa_niter_N, MiLoRA, CorDA, checked against peft
where peft has them, and adapters peft saved with these inits *without* conversion, read against the original
base."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import grafting as gf
from grafting.io.reader import AdapterReader
from test_inits import KW, peft_model, perturb
from test_model import Net


def assert_same_as_peft(ours, theirs):
    sd = theirs.state_dict()
    for name, host in ours.hosts():
        a, key = host.adapters["default"], f"base_model.model.{name}"
        for mine, suffix in ((a.lora_A, "lora_A.default.weight"), (a.lora_B, "lora_B.default.weight"),
                             (host.base_layer.weight, "base_layer.weight")):
            torch.testing.assert_close(mine.detach(), sd[f"{key}.{suffix}"], atol=1e-5, rtol=1e-4)


# ---- pissa_niter_N ----------------------------------------------------------------------------------------------
def test_pissa_niter_factors_and_residual_equal_peft_on_the_same_seed():
    torch.manual_seed(0)
    base = Net()
    torch.manual_seed(7)
    ours = gf.adapt(copy.deepcopy(base), gf.LoraConfig(init_lora_weights="pissa_niter_2", **KW))
    torch.manual_seed(7)
    theirs = peft_model(copy.deepcopy(base), init_lora_weights="pissa_niter_2", **KW)
    assert_same_as_peft(ours, theirs)
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), base(x), atol=1e-5, rtol=1e-4)  # residual + adapter = the original
    # the draws matter: another seed gives other factors (so the comparison above is not vacuous)
    torch.manual_seed(8)
    other = gf.adapt(copy.deepcopy(base), gf.LoraConfig(init_lora_weights="pissa_niter_0", **KW))
    host = dict(other.hosts())["layers.0.q_proj"]
    assert not torch.allclose(host.adapters["default"].lora_A, dict(ours.hosts())["layers.0.q_proj"]
                              .adapters["default"].lora_A, atol=1e-3)


def test_pissa_niter_saves_converted_and_peft_loads_it(tmp_path):
    torch.manual_seed(0)
    base = Net()
    model = gf.adapt(copy.deepcopy(base), gf.LoraConfig(init_lora_weights="pissa_niter_3", **KW))
    perturb(model)
    x = torch.randn(4, 8)
    model.save_adapter(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["init_lora_weights"] is True
    import peft
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-4)


# ---- MiLoRA -----------------------------------------------------------------------------------------------------
def test_milora_adapts_the_minor_singular_components():
    torch.manual_seed(0)
    base = Net()
    model = gf.adapt(copy.deepcopy(base), gf.LoraConfig(init_lora_weights="milora", **KW))
    x = torch.randn(4, 8)
    torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=1e-4)
    for name, host in model.hosts():
        a, w = host.adapters["default"], base.get_submodule(name).weight.detach()
        S = torch.linalg.svdvals(w)
        delta = a.scaling * a.lora_B.detach() @ a.lora_A.detach()
        torch.testing.assert_close(torch.linalg.svdvals(delta)[:3], S[-3:], atol=1e-5, rtol=1e-4)
        residual = torch.linalg.svdvals(host.base_layer.weight.detach())
        torch.testing.assert_close(residual[:len(S) - 3], S[:-3], atol=1e-5, rtol=1e-4)  # principal part kept
        _, _, Vh = torch.linalg.svd(w)
        # A's rows span the minor right singular directions: projecting them out leaves nothing
        A = a.lora_A.detach()
        torch.testing.assert_close(A - (A @ Vh[-3:].t()) @ Vh[-3:], torch.zeros_like(A), atol=1e-5, rtol=0)


def test_milora_saves_as_plain_lora_peft_loads_and_native_file_round_trips(tmp_path):
    torch.manual_seed(0)
    base = Net()
    model = gf.adapt(copy.deepcopy(base), gf.LoraConfig(init_lora_weights="milora", **KW))
    perturb(model)
    x = torch.randn(4, 8)
    model.save_adapter(tmp_path / "converted")
    cfg = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 6
    import peft
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "converted"))
    torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-4)
    model.save_adapter(tmp_path / "native", convert_init=False)
    assert json.loads((tmp_path / "native" / "adapter_config.json").read_text())["init_lora_weights"] == "milora"
    torch.testing.assert_close(gf.load(copy.deepcopy(base), tmp_path / "native")(x), model(x), atol=1e-5, rtol=1e-4)
    reader, converted = AdapterReader(tmp_path / "native"), AdapterReader(tmp_path / "converted")
    for module in reader.modules():  # the native file read as tensors: the same ΔW against the original base
        w0 = base.get_submodule(module).weight.detach()
        torch.testing.assert_close(reader.delta_weight(module, w0), converted.delta_weight(module), atol=1e-5,
                                   rtol=1e-4)


# ---- adapters peft saved without conversion ---------------------------------------------------------------------
def peft_native(tmp_path, base, init):
    theirs = peft_model(copy.deepcopy(base), init_lora_weights=init, **KW)
    perturb(theirs)
    theirs.save_pretrained(str(tmp_path / init))
    return theirs, tmp_path / init


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_native_adapter_loads_onto_the_original_base_with_peft_s_outputs(init, tmp_path):
    torch.manual_seed(0)
    base = Net()
    theirs, path = peft_native(tmp_path, base, init)
    x = torch.randn(4, 8)
    torch.testing.assert_close(gf.load(copy.deepcopy(base), path)(x), theirs(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_native_adapter_read_as_tensors_is_a_delta_against_the_original_base(init, tmp_path):
    """Merging / serving from files: ΔW read from the directory must turn the original W into peft's model."""
    torch.manual_seed(0)
    base = Net()
    theirs, path = peft_native(tmp_path, base, init)
    merged = theirs.merge_and_unload()
    reader = AdapterReader(path)
    for module in reader.modules():
        w0 = base.get_submodule(module).weight.detach()
        torch.testing.assert_close(w0 + reader.delta_weight(module, w0), merged.get_submodule(module).weight,
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(gf.GraftingError, match="init_lora_weights.*original base"):
        reader.delta_weight(reader.modules()[0])  # without the base weight it cannot be right


# ---- CorDA ------------------------------------------------------------------------------------------------------
def batches(n=3, rows=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 8, generator=g) for _ in range(n)]


def peft_corda(base, calib, method, **kw):
    import peft
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    cfg = peft.LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method=method),
                          **kw)
    model = copy.deepcopy(base)

    def run():
        for b in calib:
            model(b)
    preprocess_corda(model, cfg, run_model=run)
    return peft.get_peft_model(model, cfg)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_factors_and_residual_equal_peft(method):
    torch.manual_seed(0)
    base, calib = Net(), batches()
    cfg = gf.LoraConfig(init_lora_weights="corda", corda_config={"corda_method": method}, **KW)
    ours = gf.adapt(copy.deepcopy(base), cfg, calibration=calib)
    assert_same_as_peft(ours, peft_corda(base, calib, method, **KW))
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), base(x), atol=1e-5, rtol=1e-4)  # residual + adapter = the original


def test_corda_modes_split_w_c_into_principal_and_minor_parts():
    """ipm adapts the r largest singular directions of W·C, kpm the r smallest (Sec. 3): checked from the
    covariance computed here by hooks on a plain copy."""
    torch.manual_seed(0)
    base, calib = Net(), batches()
    seen = []
    hook = base.layers[0].q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0] / a[0].max().abs()))
    with torch.no_grad():
        for b in calib:
            base(b)
    hook.remove()
    cov = sum(x.t() @ x for x in seen) / len(seen)
    w = base.layers[0].q_proj.weight.detach()
    damped = cov + torch.eye(8) * cov.diagonal().mean() * 0.01
    S = torch.linalg.svdvals(w @ damped)
    for method, part in (("ipm", S[:3]), ("kpm", S[-3:])):
        model = gf.adapt(copy.deepcopy(base), gf.LoraConfig(init_lora_weights="corda", corda_config={
            "corda_method": method}, **KW), calibration=calib)
        a = dict(model.hosts())["layers.0.q_proj"].adapters["default"]
        delta = a.scaling * a.lora_B.detach() @ a.lora_A.detach()
        torch.testing.assert_close(torch.linalg.svdvals(delta @ damped)[:3], part, atol=1e-4, rtol=1e-4)


def test_corda_saves_converted_for_peft_and_its_native_file_is_refused(tmp_path):
    torch.manual_seed(0)
    base, calib = Net(), batches()
    model = gf.adapt(copy.deepcopy(base), gf.LoraConfig(init_lora_weights="corda", **KW), calibration=calib)
    perturb(model)
    x = torch.randn(4, 8)
    model.save_adapter(tmp_path / "converted")
    cfg = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["corda_config"] is None
    import peft
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "converted"))
    torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gf.load(copy.deepcopy(base), tmp_path / "converted")(x), model(x), atol=1e-5,
                               rtol=1e-4)
    peft_corda(base, calib, "ipm", **KW).save_pretrained(str(tmp_path / "peft"))  # peft's native form
    with pytest.raises(gf.GraftingError, match=r"adapter_config.json: field 'init_lora_weights' = 'corda'.*"
                                               r"path_initial_model_for_weight_conversion"):
        gf.load(copy.deepcopy(base), tmp_path / "peft")


def test_corda_needs_calibration():
    with pytest.raises(gf.GraftingError, match="calibration"):
        gf.adapt(Net(), gf.LoraConfig(init_lora_weights="corda", **KW))


@pytest.mark.parametrize("field, value", [
    ("corda_config", {"corda_method": "both"}),
    ("corda_config", {"cache_file": "svd.pt"}),
    ("corda_config", {"corda_mode": "ipm"}),
    ("corda_config", "ipm"),
    ("init_lora_weights", "pissa_niter_"),
    ("init_lora_weights", "pissa_niter_x"),
])
def test_bad_init_settings_name_the_field(field, value):
    init = {"init_lora_weights": "corda"} if field == "corda_config" else {}
    with pytest.raises(gf.GraftingError, match=field):
        gf.LoraConfig(**{**init, field: value})


# ---- EVA --------------------------------------------------------------------------------------------------------
EVA_KW = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "mlp.0"])


def eva_batches(n=4, rows=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(3.0, 0.2, 8)  # distinct variances: components that settle
    return [torch.randn(rows, 8, generator=g) * scale for _ in range(n)]


def peft_eva(base, calib, eva_config, **kw):
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights
    model = peft_model(copy.deepcopy(base), init_lora_weights="eva", eva_config=EvaConfig(**eva_config), **kw)
    initialize_lora_eva_weights(model, dataloader=calib, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                                prepare_layer_inputs_fn=None, show_progress_bar=False)
    return model


@pytest.mark.parametrize("eva_config", [{}, {"rho": 1.0}, {"whiten": True, "adjust_scaling_factors": False}])
def test_eva_a_and_redistributed_ranks_equal_peft(eva_config):
    torch.manual_seed(0)
    base, calib = Net(), eva_batches()
    ours = gf.adapt(copy.deepcopy(base), gf.LoraConfig(init_lora_weights="eva", eva_config=eva_config, **EVA_KW),
                    calibration=calib)
    theirs = peft_eva(base, calib, eva_config, **EVA_KW)
    cfg, their_cfg = ours.peft_config["default"], theirs.peft_config["default"]
    assert cfg.rank_pattern == their_cfg.rank_pattern and cfg.alpha_pattern == their_cfg.alpha_pattern
    assert sorted(n for n, h in ours.hosts() if "default" in h.adapters) == sorted(their_cfg.target_modules)
    if not eva_config:
        assert cfg.rank_pattern  # the default rho = 2 moved ranks between layers here (the test is not vacuous)
    sd = theirs.state_dict()
    for name, host in ours.hosts():
        if "default" in host.adapters:
            a = host.adapters["default"]
            mine, peft_a = a.lora_A.detach(), sd[f"base_model.model.{name}.lora_A.default.weight"]
            if eva_config.get("whiten") and not name.endswith("mlp.0"):
                # q_proj and v_proj see the same input and share one SVD; peft 0.21.2 whitens that shared tensor
                # in place once per layer (rows divided by √σ twice), grafting once as the paper says: same
                # directions, other lengths
                mine, peft_a = F.normalize(mine, dim=1), F.normalize(peft_a, dim=1)
            torch.testing.assert_close(mine, peft_a, atol=1e-5, rtol=1e-4)
            assert a.scaling == theirs.base_model.model.get_submodule(name).scaling["default"]
            assert not a.lora_B.any()
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), base(x))  # B = 0 and the base untouched: the base model's output


def test_eva_a_spans_the_top_principal_directions_of_the_layer_inputs():
    """With rho = 1 every layer keeps r ranks; its A must be the top-r right singular vectors of its centred inputs
    (Sec. 3), computed here directly from all calibration rows of a plain copy."""
    torch.manual_seed(0)
    base, calib = Net(), eva_batches(n=6)
    model = gf.adapt(copy.deepcopy(base), gf.LoraConfig(init_lora_weights="eva", eva_config={"rho": 1.0, "tau": 0.999},
                                                        **EVA_KW), calibration=calib)
    seen = []
    h = base.layers[1].mlp[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for b in calib:
            base(b)
    h.remove()
    X = torch.cat(seen)
    _, _, Vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    A = dict(model.hosts())["layers.1.mlp.0"].adapters["default"].lora_A.detach()
    # approximate: a randomized SVD, stopped once the components settle (cosine >= tau), as in the paper
    torch.testing.assert_close((A @ Vh[:2].t()).abs(), torch.eye(2), atol=3e-2, rtol=0)


def test_incremental_svd_is_seeded_and_leaves_the_caller_s_generator_alone():
    from grafting.methods.lora_eva import IncrementalSvd
    x = torch.randn(12, 8)
    state = torch.random.get_rng_state()
    a, b = IncrementalSvd(3), IncrementalSvd(3)
    a.update(x)
    torch.randn(5)
    b.update(x)
    assert torch.equal(a.components, b.components)
    torch.random.set_rng_state(state)
    a.update(x)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_eva_masks_padding_and_unlabelled_positions():
    from grafting.methods.lora_eva import eva_mask
    cfg = gf.LoraConfig(init_lora_weights="eva", target_modules=["q_proj"])
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
             "labels": torch.tensor([[-100, 5, 5], [5, -100, 5]])}
    assert eva_mask(cfg, batch).tolist() == [[False, True, False], [True, False, True]]
    cfg = gf.LoraConfig(init_lora_weights="eva", eva_config={"use_label_mask": False}, target_modules=["q_proj"])
    assert eva_mask(cfg, batch).tolist() == [[True, True, False], [True, True, True]]
    assert eva_mask(cfg, torch.zeros(2, 3)) is None


def test_eva_adapter_saves_for_peft_and_loads_back(tmp_path):
    torch.manual_seed(0)
    base, calib = Net(), eva_batches()
    model = gf.adapt(copy.deepcopy(base), gf.LoraConfig(init_lora_weights="eva", **EVA_KW), calibration=calib)
    perturb(model)
    x = torch.randn(4, 8)
    model.save_adapter(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["rank_pattern"] == model.peft_config["default"].rank_pattern
    import peft
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gf.load(copy.deepcopy(base), tmp_path / "a")(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("value", [{"rho": 0.5}, {"tau": 1.5}, {"whiten": "yes"}, {"rank": 3}, [1.0]])
def test_bad_eva_config_names_the_field(value):
    with pytest.raises(gf.GraftingError, match="eva_config"):
        gf.LoraConfig(init_lora_weights="eva", eva_config=value, target_modules=["q_proj"])


def test_eva_that_never_converges_stops_with_an_error_naming_tau(monkeypatch):
    from grafting.methods import lora_eva
    monkeypatch.setattr(lora_eva, "MAX_STEPS", 3)  # peft would cycle the batches forever
    with pytest.raises(gf.GraftingError, match=r"eva_config\['tau'\]"):
        gf.adapt(Net(), gf.LoraConfig(init_lora_weights="eva", eva_config={"tau": 1.0}, **EVA_KW),
                 calibration=eva_batches())


@pytest.mark.parametrize("how", ["add", "load"])
def test_a_base_changing_init_is_refused_next_to_adapters_that_use_the_original_base(how, tmp_path):
    """Before: adding (or loading peft's native) PiSSA next to another adapter rewrote the base under it."""
    torch.manual_seed(0)
    base = Net()
    model = gf.adapt(copy.deepcopy(base), gf.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                     adapter_name="x")
    x = torch.randn(3, 8)
    before = model(x).detach()
    with pytest.raises(gf.GraftingError, match=r"rewrites the base weight, which adapters \['x'\]"):
        if how == "add":
            model.add_adapter("p", gf.LoraConfig(init_lora_weights="pissa", **KW))
        else:
            model.load_adapter(peft_native(tmp_path, base, "pissa")[1], "p")
    torch.testing.assert_close(model(x), before)  # nothing changed
    assert model.adapter_names() == ["x"]
