"""NF4 codes, blockwise absmax and double quantization: QLoRA's rule, and byte-for-byte bitsandbytes on CPU."""

from __future__ import annotations

import math

import pytest
import torch

import bnb_reference  # noqa: F401  (bitsandbytes' reference kernels on every CPU: see the module)

from grafting.errors import GraftingError
from grafting.quant import NF4_CODE, dynamic_code, quantize_nf4

bnbf = pytest.importorskip("bitsandbytes.functional")


def normal_quantiles(offset=0.9677083):
    """QLoRA Appendix E / bitsandbytes' create_normal_map: 8 positive and 7 negative N(0,1) quantiles, plus 0."""
    from statistics import NormalDist
    nd = NormalDist()
    pos = [nd.inv_cdf(offset + (0.5 - offset) * i / 8) for i in range(9)][:-1]  # linspace(offset, 0.5, 9)[:-1]
    neg = [-nd.inv_cdf(offset + (0.5 - offset) * i / 7) for i in range(8)][:-1]  # linspace(offset, 0.5, 8)[:-1]
    v = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64)
    return v / v.abs().max()


def test_codebook_is_qloras_normal_float():
    torch.testing.assert_close(NF4_CODE.double(), normal_quantiles(), atol=1e-6, rtol=0)
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


def test_each_value_takes_the_nearest_level_of_its_block():
    w = torch.randn(4, 64)
    q = quantize_nf4(w, 64, double_quant=False)
    absmax = w.abs().amax(1, keepdim=True)
    expect = NF4_CODE[(w / absmax).unsqueeze(-1).sub(NF4_CODE).abs().argmin(-1)] * absmax
    torch.testing.assert_close(q.dequantize(), expect, atol=1e-7, rtol=0)
    # packing: element 2i in the high nibble
    first = (q.packed[0] >> 4).item()
    assert NF4_CODE[first] * absmax[0, 0] == pytest.approx(expect[0, 0].item())


def test_error_within_the_analytic_bound():
    """|w - q| <= absmax * (largest half-gap between adjacent levels), per block; with double quantization the
    absmax itself moves by at most half an 8-bit dynamic-code step of its 256-block's maximum."""
    w = torch.randn(256, 512) * 0.05
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    q = quantize_nf4(w, 64, double_quant=False)
    err = (q.dequantize() - w).abs().view(-1, 64).amax(1)
    assert (err <= w.view(-1, 64).abs().amax(1) * half_gap + 1e-7).all()
    qd = quantize_nf4(w, 64, double_quant=True)
    true_absmax = w.view(-1, 64).abs().amax(1)
    code = dynamic_code()
    nested_step = (code[1:] - code[:-1]).max()
    dev = (qd.block_scales() - true_absmax).abs()
    assert (dev <= (true_absmax - true_absmax.mean()).abs().max() * nested_step).all()
    err_d = (qd.dequantize() - w).abs().view(-1, 64).amax(1)
    assert (err_d <= qd.block_scales() * half_gap + dev + 1e-6).all()


def test_bits_per_parameter_with_every_statistic():
    q = quantize_nf4(torch.randn(576, 1536), 64, True)
    assert q.bits_per_parameter <= 4.2
    # 4 bits + 8/64 for the absmax codes + 32/(64*256) for the nested absmax + the codebooks
    assert q.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 8 * (16 + 256 + 1) * 4 / q.numel,
                                                 abs=1e-3)
    assert quantize_nf4(torch.randn(576, 1536), 64, False).bits_per_parameter == pytest.approx(4.5, abs=0.01)


@pytest.mark.parametrize("shape", [(64, 64), (33, 70), (7, 9), (3, 5), (300, 257), (1000, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size,double_quant", [(64, True), (64, False), (32, True), (256, True)])
def test_same_bytes_and_statistics_as_bitsandbytes(shape, dtype, block_size, double_quant):
    torch.manual_seed(math.prod(shape) + block_size)
    w = (torch.randn(*shape) * 0.03).to(dtype)
    w.view(-1)[:5] = 0  # a zero run, and (for small shapes) an all-zero-ish block
    ref, state = bnbf.quantize_4bit(w, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)
    ours = quantize_nf4(w, block_size, double_quant)
    assert torch.equal(ours.packed, ref.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_code, state.state2.code)
        assert torch.equal(ours.offset, state.offset)
    dense = ours.dequantize()
    assert dense.dtype == dtype
    assert torch.equal(dense, bnbf.dequantize_4bit(ref, state))


def test_bad_input_is_refused_clearly():
    with pytest.raises(GraftingError, match="block_size must be one of"):
        quantize_nf4(torch.randn(8, 8), block_size=48)
    with pytest.raises(GraftingError, match="float tensor"):
        quantize_nf4(torch.ones(8, 8, dtype=torch.int64))
    with pytest.raises(GraftingError, match="empty"):
        quantize_nf4(torch.empty(0, 8))
