"""The compiled mixed-batch kernel against torch on small tensors, its build cache, and the bf16 and int8
stores."""

from __future__ import annotations

import pytest
import torch

import grafting as gf
import grafting.kernels as kernels
from test_model import Net


def built():
    kernel = kernels.lora_rows()
    assert kernel is not None, "the kernel did not build: is a C compiler (cc/gcc) installed and GRAFTING_KERNELS unset?"
    return kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,fan_in,out,tokens", [(4, 37, 21, 1), (8, 40, 33, 1), (12, 37, 21, 4), (16, 64, 48, 1),
                                                 (24, 35, 50, 5), (48, 70, 100, 3), (64, 96, 130, 9)])
def test_each_row_reads_its_own_slot_in_place(dtype, r, fan_in, out, tokens):
    kernel = built()
    torch.manual_seed(r)
    x = torch.randn(6, tokens, fan_in)
    A, B = torch.randn(5, fan_in, r).to(dtype), torch.randn(5, r, out).to(dtype)
    base = torch.randn(6, tokens, out)
    entries = torch.tensor([[4, 0, 3], [0, 0, 1], [2, 0, 3]])  # (row, bucket, slot); slot 3 twice
    y = base.clone()
    kernel(x, y, kernel.table([(A, B)]), entries, dtype)
    want = base.clone()
    for row, _, slot in entries.tolist():
        want[row] += (x[row].double() @ A[slot].double() @ B[slot].double()).float()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
    assert torch.equal(y[[1, 3, 5]], base[[1, 3, 5]])  # rows not listed are untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 6])
def test_one_call_serves_rows_of_every_rank_bucket(dtype, tokens):
    kernel = built()
    torch.manual_seed(tokens)
    fan_in, out, n = 40, 52, 9
    ranks = (64, 16, 4, 8)  # in any order: each entry names its bucket
    factors = [(torch.randn(3, fan_in, r).to(dtype), torch.randn(3, r, out).to(dtype)) for r in ranks]
    x, base = torch.randn(n, tokens, fan_in), torch.randn(n, tokens, out)
    entries = torch.tensor([[row, row % 4, 1 + row % 2] for row in range(n) if row != 5])
    y = base.clone()
    kernel(x, y, kernel.table(factors), entries, dtype)
    want = base.clone()
    for row, b, slot in entries.tolist():
        A, B = factors[b]
        want[row] += (x[row].double() @ A[slot].double() @ B[slot].double()).float()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
    assert torch.equal(y[5], base[5])


@pytest.mark.parametrize("r,fan_in,out,tokens", [(4, 37, 21, 1), (8, 40, 33, 1), (12, 37, 21, 4), (16, 64, 48, 1),
                                                 (24, 35, 50, 5), (48, 70, 100, 3), (64, 96, 130, 9)])
def test_int8_rows_apply_both_per_rank_scales(r, fan_in, out, tokens):
    """An int8 bucket: y[row] += (x @ (A * a_scale[slot])) @ (B * b_scale[slot]^T), scales per rank."""
    kernel = built()
    torch.manual_seed(100 + r)
    x, base = torch.randn(6, tokens, fan_in), torch.randn(6, tokens, out)
    A = torch.randint(-127, 128, (5, fan_in, r), dtype=torch.int8)
    B = torch.randint(-127, 128, (5, r, out), dtype=torch.int8)
    sa, sb = torch.rand(5, r) / 100, torch.rand(5, r) / 100
    entries = torch.tensor([[4, 1, 3], [0, 1, 1], [2, 0, 2], [5, 1, 3]])  # bucket 0: an fp32 bucket beside it
    other = (torch.randn(3, fan_in, 8), torch.randn(3, 8, out))
    y = base.clone()
    kernel(x, y, kernel.table([other, (A, B, sa, sb)]), entries[[0, 1, 3]], torch.int8)
    want = base.clone()
    for row, _, slot in entries[[0, 1, 3]].tolist():
        deq_A, deq_B = A[slot].double() * sa[slot].double(), B[slot].double() * sb[slot].double()[:, None]
        want[row] += (x[row].double() @ deq_A @ deq_B).float()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
    assert torch.equal(y[[1, 2, 3]], base[[1, 2, 3]])


@pytest.mark.parametrize("use_kernel", [True, False])
def test_an_int8_store_serves_mixed_batches_within_its_quantization_error(use_kernel, monkeypatch):
    """int8 factors with per-rank scales: outputs within the quantization error of the fp32 store's, and the
    kernel and the torch path (dequantized copies) computing the same thing."""
    if use_kernel:
        built()
    torch.manual_seed(1)
    model = gf.adapt(Net(), gf.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", gf.LoraConfig(r=16, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    x, names = torch.randn(5, 8), ["b", None, "default", "b", "default"]
    with torch.no_grad():
        exact = model(x, adapter_names=names)
        model.set_stack_dtype(torch.int8)
        model.stack_adapters()
        stack = dict(model.hosts())["layers.0.q_proj"]._stack
        assert all(b.A_t.dtype == b.B_t.dtype == torch.int8 for b in stack.buckets.values())
        if not use_kernel:
            monkeypatch.setenv("GRAFTING_KERNELS", "0")
        quantized = model(x, adapter_names=names)
        monkeypatch.delenv("GRAFTING_KERNELS", raising=False)
        delta = (exact - model(x, adapter_names=[None] * 5)).abs().max().item()
        assert not torch.equal(quantized, exact)  # the factors really were rounded
        # per-rank absmax scales: each factor within 1/254 of its rank's largest, so the adapters' part moves by
        # a few hundredths of itself at most
        torch.testing.assert_close(quantized, exact, rtol=0, atol=0.03 * delta)
        if use_kernel:  # the torch path over dequantized copies: the same sums, up to fp32 rounding
            monkeypatch.setenv("GRAFTING_KERNELS", "0")
            torch.testing.assert_close(model(x, adapter_names=names), quantized, rtol=1e-5, atol=1e-5 * delta)


def test_the_build_is_cached_keyed_and_can_be_refused(tmp_path, monkeypatch):
    built()
    monkeypatch.setenv("GRAFTING_KERNEL_CACHE", str(tmp_path / "cache"))
    first = kernels._load("lora_rows", kernels.LoraRows)
    assert first is not None and first.path.parent == tmp_path / "cache" and first.path.exists()
    assert list((tmp_path / "cache").iterdir()) == [first.path]  # no temporary left behind
    stamp = first.path.stat().st_mtime_ns
    again = kernels._load("lora_rows", kernels.LoraRows)
    assert again.path == first.path and first.path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    monkeypatch.setenv("GRAFTING_KERNEL_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert kernels._load("lora_rows", kernels.LoraRows) is None  # the torch path then
    monkeypatch.setenv("GRAFTING_KERNELS", "0")
    assert kernels._load("lora_rows", kernels.LoraRows) is None


@pytest.mark.parametrize("use_kernel", [True, False])
def test_a_bf16_store_serves_mixed_batches_within_bf16_rounding(use_kernel, monkeypatch):
    if use_kernel:
        built()
    else:
        monkeypatch.setenv("GRAFTING_KERNELS", "0")
    torch.manual_seed(0)
    model = gf.adapt(Net(), gf.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", gf.LoraConfig(r=16, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    x, names = torch.randn(4, 8), ["b", None, "default", "b"]
    with torch.no_grad():
        exact = model(x, adapter_names=names)
        model.set_stack_dtype(torch.bfloat16)
        model.stack_adapters()
        stack = dict(model.hosts())["layers.0.q_proj"]._stack
        assert all(t.dtype == torch.bfloat16 for b in stack.buckets.values() for t in (b.A_t, b.B_t))
        model.float()  # a store dtype set on purpose survives .float()
        assert all(b.A_t.dtype == torch.bfloat16 for b in stack.buckets.values())
        rounded = model(x, adapter_names=names)
        torch.testing.assert_close(rounded, exact, rtol=2 ** -6, atol=2 ** -6 * exact.abs().max().item())
        assert not torch.equal(rounded, exact)  # the factors really were rounded
        model.set_stack_dtype(None)
        torch.testing.assert_close(model(x, adapter_names=names), exact)  # refilled from the adapters
        stack = dict(model.hosts())["layers.0.q_proj"]._stack
        assert all(b.A_t.dtype == torch.float32 for b in stack.buckets.values())
    with pytest.raises(gf.GraftingError, match="floating-point dtype, torch.int8 or None"):
        model.set_stack_dtype(torch.int16)
