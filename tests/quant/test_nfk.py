"""k-bit NormalFloat (LQ-LoRA's configurations): QLoRA's construction at 2, 3, 4 and 8 bits, packing, the
layer, and LQ-LoRA's budget over bits and block sizes with its export and reload."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnb_reference  # noqa: F401  (bitsandbytes' reference kernels on every CPU: see the module)

import grafting as gf
from grafting.quant import NF4Linear, from_pretrained, quantize_nf4, save_pretrained
from grafting.quant.loftq import allocate_configs, lq_decompose, quantize_with_adapter
from grafting.quant.nf4 import NF4_CODE
from test_loftq import IDS, LORA, tiny_llama
from grafting.quant.nfk import (BITS, NFkLinear, normal_float_code, pack_codes, quantize_nfk, unpack_codes,
                                zero_index)

transformers = pytest.importorskip("transformers")


def test_the_construction_gives_qloras_nf4_and_the_rule_at_other_widths():
    torch.testing.assert_close(normal_float_code(4, exact_nf4=False), NF4_CODE, atol=2e-7, rtol=0)
    for bits in BITS:
        code = normal_float_code(bits)
        assert code.numel() == 2 ** bits and code[0] == -1 and code[-1] == 1
        assert bool((code[1:] > code[:-1]).all()) and code[zero_index(bits)] == 0
        # 2^(k-1) positive levels: the normal quantiles at linspace(offset, 0.5, 2^(k-1) + 1)[:-1], normalised
        p = torch.linspace(0.9677083, 0.5, 2 ** (bits - 1) + 1, dtype=torch.float64)[:-1]
        positive = torch.distributions.Normal(0.0, 1.0).icdf(p.float().double())
        torch.testing.assert_close(code[code > 0].flip(0).double(), positive / positive.max(), atol=1e-5, rtol=0)
    with pytest.raises(gf.GraftingError, match="bits must be one of"):
        normal_float_code(5)


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip_and_bytes(bits):
    codes = torch.randint(0, 2 ** bits, (1003,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == (1003 if bits == 8 else -(-1003 // 8) * bits)
    assert torch.equal(unpack_codes(packed, bits, 1003), codes.long())


def test_nf4_through_the_k_bit_path_is_bitsandbytes_nf4_byte_for_byte():
    w = torch.randn(96, 128)
    ours, ref = quantize_nfk(w, 4, 64), quantize_nf4(w, 64)
    assert torch.equal(ours.packed, ref.packed) and torch.equal(ours.absmax, ref.absmax)
    assert torch.equal(ours.dequantize(), ref.dequantize())


@pytest.mark.parametrize("bits", BITS)
def test_quantization_is_nearest_level_times_block_absmax(bits):
    torch.manual_seed(bits)
    w = torch.randn(40, 96)
    q = quantize_nfk(w, bits, 32, double_quant=False)
    code = normal_float_code(bits)
    blocks = w.reshape(-1, 32)
    absmax = blocks.abs().amax(1, keepdim=True)
    nearest = code[(blocks / absmax).unsqueeze(-1).sub(code).abs().argmin(-1)]
    torch.testing.assert_close(q.dequantize(), (nearest * absmax).reshape(w.shape))
    # the error bound: within half the widest gap between levels, times the block's absmax
    gap = float((code[1:] - code[:-1]).max()) / 2
    assert bool(((q.dequantize() - w).abs().reshape(-1, 32) <= gap * absmax + 1e-6).all())
    # storage: bits per code plus one fp32 scale per block (the codebook aside)
    assert q.payload_nbytes == pytest.approx(w.numel() * bits / 8 + 4 * w.numel() / 32, abs=8)


def test_fewer_bits_cost_accuracy():
    w = torch.randn(128, 256)
    errors = [float((quantize_nfk(w, b).dequantize() - w).norm()) for b in BITS]
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_the_layer_computes_in_slices_trains_and_merges(bits):
    torch.manual_seed(0)
    lin = nn.Linear(80, 48)
    q = NFkLinear.from_linear(lin, bits, 16)
    q.chunk_elements = 80 * 3  # several slices
    assert len(q.row_slices()) > 1
    w = q.dequantize()
    x = torch.randn(2, 5, 80, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, F.linear(x, w, q.bias), atol=1e-5, rtol=1e-5)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(gx, torch.ones_like(y) @ w, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(q(x), F.linear(x, w, q.bias), atol=1e-5, rtol=1e-5)
    model = gf.adapt(nn.Sequential(q), gf.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    host = model.base_model[0]
    with torch.no_grad():
        host.adapters["default"].lora_B.normal_()
        before = model(x).detach()
        model.merge()
    assert host.base_layer.requantize_error is not None and host.base_layer.bits == bits
    torch.testing.assert_close(model(x).detach(), before, atol=0.6 * before.abs().max().item(), rtol=0)


def test_lq_lora_at_every_width_beats_plain_quantization():
    torch.manual_seed(0)
    w = torch.randn(64, 128) @ torch.diag(torch.linspace(0.1, 2, 128))
    for bits in BITS:
        d = lq_decompose(w, 4, 1.0, 5, 64, True, bits)
        assert d.q.bits == bits if bits != 4 else True
        assert min(d.errors) < d.qlora_error


def test_budget_mixes_widths_meets_it_and_spends_bits_where_they_pay():
    torch.manual_seed(1)
    weights = {f"w{i}": torch.randn(64, 256) * s for i, s in enumerate((0.02, 0.2, 0.02, 0.2))}
    weights["w1"][:, :4] *= 30  # heavy outlier columns: this matrix gains most from more bits
    total = sum(w.numel() for w in weights.values())
    picks = {b: allocate_configs(weights, b) for b in (2.7, 3.5, 5.0)}

    def cost(pick):
        qs = {n: quantize_nfk(w, *pick[n]) for n, w in weights.items()}
        bits = sum(8 * q.payload_nbytes for q in qs.values()) / total
        err = sum(float((w - qs[n].dequantize()).norm()) ** 2 for n, w in weights.items())
        return bits, err

    for budget, pick in picks.items():
        assert cost(pick)[0] <= budget
    assert cost(picks[5.0])[1] <= cost(picks[3.5])[1] <= cost(picks[2.7])[1]
    assert len({b for b, _ in picks[3.5].values()}) > 1  # a budget between widths mixes them
    assert picks[3.5]["w1"][0] >= max(b for n, (b, _) in picks[3.5].items() if n != "w1")
    with pytest.raises(gf.GraftingError, match="below the smallest configuration"):
        allocate_configs(weights, 2.0)


@torch.no_grad()
def test_a_mixed_width_base_saves_reloads_and_keeps_its_adapter(tmp_path):
    model, report = quantize_with_adapter(tiny_llama(), gf.LoraConfig(**LORA), init="lq_lora", num_iter=2,
                                          bits_per_parameter=3.2)
    widths = {v["bits"] for v in report.values()}
    assert widths - {4}, widths  # some matrix left NF4
    assert {type(h.base_layer).__name__ for _, h in model.hosts()} >= {"NFkLinear"}
    save_pretrained(model, tmp_path / "base")
    model.save_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "grafting"
    expect = model(IDS).logits
    base = from_pretrained(tmp_path / "base")
    assert {m.bits for m in base.modules() if isinstance(m, NFkLinear)} == widths - {4}
    again = gf.load(base, tmp_path / "adapter")
    torch.testing.assert_close(again(IDS).logits, expect, atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception):  # transformers + bitsandbytes cannot decode these layers: it must not load them
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    # nf4_only keeps the base a bitsandbytes checkpoint
    plain, report = quantize_with_adapter(tiny_llama(), gf.LoraConfig(**LORA), init="lq_lora", num_iter=2,
                                          bits_per_parameter=4.2, nf4_only=True)
    assert {v["bits"] for v in report.values()} == {4}
    assert not any(isinstance(m, NFkLinear) for m in plain.modules())
    assert any(isinstance(m, NF4Linear) for m in plain.modules())
