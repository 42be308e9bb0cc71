"""AutoLoRA, BiLoRA and BiDoRA against their papers' rules on small tensors, and their exported form in peft.

The contract matrix (tests/test_contract.py) already runs all three through inject / forward / mixed batches /
merge / save-load; here: the ΔW each paper defines, the rank rule, the penalties, the parameter roles, and that
``save_adapter`` writes a plain LoRA / DoRA adapter that peft loads with the same outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import grafting as gf
from grafting.methods.autolora import kept_components
from grafting.methods.bidora import direction_penalty
from grafting.methods.bilora import orthogonality_penalty

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def host_of(model, name="transformer.h.0.attn.c_attn"):
    return model.base_model.get_submodule(name)


def test_autolora_delta_is_the_weighted_sum_of_rank_one_terms():
    model = gf.adapt(gpt2(), gf.AutoLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                               init_lora_weights=False))
    host = host_of(model)
    a = host.adapters["default"]
    # uniform weights (the init) give plain LoRA on the same factors
    lora_dw = (a.lora_B @ a.lora_A) * a.scaling
    torch.testing.assert_close(host.methods["default"].delta_weight(a, host).t(), lora_dw)
    with torch.no_grad():
        a.rank_logits.copy_(torch.tensor([2.0, 0.0, -1.0, 0.5]))
    alpha = torch.exp(a.rank_logits) / torch.exp(a.rank_logits).sum()
    expected = sum(alpha[j] * 4 * a.scaling * torch.outer(a.lora_B[:, j], a.lora_A[j]) for j in range(4))
    torch.testing.assert_close(host.methods["default"].delta_weight(a, host).t(), expected.detach())
    # the paper's rule: keep α_j >= 1/r, largest first
    assert kept_components(a) == [j for j in torch.argsort(alpha, descending=True).tolist() if alpha[j] >= 0.25]
    assert kept_components(a, threshold=0.99) == [0]  # never empty: the largest survives
    assert {id(p) for p in model.param_groups()["architecture"]} == {id(h.adapters["default"].rank_logits)
                                                                      for _, h in model.hosts()}


def test_bilora_delta_penalty_and_init():
    model = gf.adapt(gpt2(), gf.BiLoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                             fan_in_fan_out=True))
    host = host_of(model)
    a = host.adapters["default"]
    assert not a.lora_E.any()  # λ = 0: training starts from the base model
    P, Q = a.lora_B.detach(), a.lora_A.detach()
    torch.testing.assert_close(P.t() @ P, torch.eye(4), atol=1e-5, rtol=0)  # orthonormal P and Q at init
    torch.testing.assert_close(Q @ Q.t(), torch.eye(4), atol=1e-5, rtol=0)
    assert model.regularizer().item() < 1e-9
    with torch.no_grad():
        a.lora_E.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        a.lora_B.mul_(1.5)
    torch.testing.assert_close(host.methods["default"].delta_weight(a, host).t(),
                               a.scaling * a.lora_B @ torch.diag(a.lora_E) @ a.lora_A)
    eye = torch.eye(4)
    by_hand = ((a.lora_B.t() @ a.lora_B - eye) ** 2).sum() + ((a.lora_A @ a.lora_A.t() - eye) ** 2).sum()
    torch.testing.assert_close(orthogonality_penalty(a.lora_B, a.lora_A), by_hand)
    n_layers = sum(1 for _ in model.hosts())
    torch.testing.assert_close(model.regularizer(), 0.1 * by_hand / n_layers, rtol=1e-5, atol=1e-6)
    roles = model.param_groups()
    assert {id(p) for p in roles["architecture"]} == {id(h.adapters["default"].lora_E) for _, h in model.hosts()}


@pytest.mark.parametrize("target", ["c_attn", "c_proj"])  # out > in (96 x 32) and out = in
def test_bidora_penalty_is_mean_squared_cosine_between_directions(target):
    model = gf.adapt(gpt2(), gf.BiDoraConfig(r=2, lora_alpha=4, target_modules=[target], fan_in_fan_out=True,
                                             init_lora_weights=False))
    host = host_of(model, f"transformer.h.0.attn.{target}")
    a = host.adapters["default"]
    assert a.exact_norm  # hypergradients differentiate the norm
    v = host.base_layer.weight.t() + a.scaling * a.lora_B @ a.lora_A
    d = v / v.norm(dim=1, keepdim=True)
    expected = ((d @ d.t() - torch.eye(d.shape[0])) ** 2).mean()
    torch.testing.assert_close(direction_penalty(host, a), expected, rtol=1e-4, atol=1e-6)
    (g,) = torch.autograd.grad(direction_penalty(host, a), a.lora_A)
    assert g.abs().sum() > 0
    roles = model.param_groups()
    assert {id(p) for p in roles["architecture"]} == {id(h.adapters["default"].lora_magnitude)
                                                      for _, h in model.hosts()}


def perturb(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for _, host in model.hosts():
            for p in host.adapters["default"].parameters():
                p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("config,peft_kind", [
    (gf.AutoLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), "lora"),
    (gf.BiLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), "lora"),
    (gf.BiDoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), "dora"),
])
def test_saved_as_plain_peft_adapter_with_the_same_outputs(tmp_path, config, peft_kind):
    base = gpt2()
    model = gf.adapt(copy.deepcopy(base), config)
    perturb(model)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        assert (ours - base(input_ids=ids).logits).abs().max() > 1e-2
    model.save_adapter(tmp_path / "exported")
    saved = (tmp_path / "exported" / "adapter_config.json").read_text()
    assert '"peft_type": "LORA"' in saved and (f'"use_dora": {"true" if peft_kind == "dora" else "false"}' in saved)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)
    # grafting reads the export as the plain method, and its own form (export=False) as itself
    plain = gf.load(copy.deepcopy(base), tmp_path / "exported")
    assert plain.peft_config["default"].method == peft_kind
    model.save_adapter(tmp_path / "native", export=False)
    native = gf.load(copy.deepcopy(base), tmp_path / "native")
    assert native.peft_config["default"].method == config.method
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(native(input_ids=ids).logits, ours, atol=1e-6, rtol=1e-6)


def test_configs_refuse_what_they_cannot_do():
    with pytest.raises(gf.GraftingError, match="use_dora"):
        gf.AutoLoraConfig(target_modules=["x"], use_dora=True)
    with pytest.raises(gf.GraftingError, match="rank_threshold"):
        gf.AutoLoraConfig(target_modules=["x"], rank_threshold=1.5)
    with pytest.raises(gf.GraftingError, match="init_lora_weights"):
        gf.BiLoraConfig(target_modules=["x"], init_lora_weights="pissa")
    with pytest.raises(gf.GraftingError, match="orth_reg_weight"):
        gf.BiDoraConfig(target_modules=["x"], orth_reg_weight=-1)
