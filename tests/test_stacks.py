"""The mixed-batch store's parts on their own: rank buckets and the decode row bank."""

from __future__ import annotations

import torch

from grafting.stacks import RowBank, _Bucket, bucket_of


def test_bucket_of_pads_ranks_to_powers_of_two_from_four():
    assert [bucket_of(r) for r in (1, 4, 5, 8, 9, 64, 65)] == [4, 4, 8, 8, 16, 64, 128]


def test_row_bank_serves_each_row_its_slot_and_copies_only_what_it_lacks():
    """Decode calls whose rows are not in slot order read a bank with one position per row; a new batch
    composition copies only adapters the bank lacks, and a rewritten slot is copied again."""
    bucket = _Bucket(fan_in=3, out=2, rank=4, capacity=6, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for s in range(1, 6):
            bucket.clear(s)
            bucket.A_t[s].fill_(s)
            bucket.B_t[s].fill_(10 * s)
    bank = RowBank()

    def check(slots):
        before = list(bank.owner)
        order, (A, B, g, groups) = bank.rows(bucket, slots)
        assert sorted(order) == list(range(len(slots))) and groups is None
        for p, i in enumerate(order):
            assert torch.equal(A[p], bucket.A_t[slots[i]]) and torch.equal(B[p], bucket.B_t[slots[i]])
        return sum(1 for p in range(len(slots)) if p >= len(before) or bank.owner[p] != before[p])

    assert check([4, 2, 1]) == 3
    assert check([1, 4, 2]) == 0  # the same adapters in another row order: nothing copied
    assert check([1, 4]) == 1  # 2 left: at most the adapter outside the first two positions moves
    assert check([1, 4, 5, 5]) == 2  # two rows of a new adapter
    with torch.no_grad():
        bucket.clear(5)  # slot 5 now holds another adapter
        bucket.A_t[5].fill_(-5)
    assert check([1, 4, 5, 5]) == 2


def test_write_folds_the_scale_zeroes_only_the_padding_and_takes_either_layout():
    """A slot written with rank r < the bucket's holds A^T, scale * B^T and zeros past r, even where a
    larger adapter was before; factors as trained and factors laid out for the store (transposed views of
    contiguous tensors, serve.pool.stack_layout) land the same; the stamp moves so row banks copy anew."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        bucket = _Bucket(fan_in=5, out=6, rank=8, capacity=3, dtype=dtype, device="cpu")
        bucket.write(1, torch.randn(8, 5), torch.randn(6, 8), 0.5, torch.rand(6))  # a rank-8 adapter first
        A, B, g = torch.randn(3, 5), torch.randn(6, 3), None
        stamp = bucket.stamps[1]
        bucket.write(1, A, B, 2.0, g)
        assert bucket.stamps[1] == stamp + 1
        want_A = torch.zeros(5, 8)
        want_A[:, :3] = A.t()
        want_B = torch.zeros(8, 6)
        want_B[:3] = 2.0 * B.t()
        assert torch.equal(bucket.A_t[1], want_A.to(dtype)) and torch.equal(bucket.B_t[1], want_B.to(dtype))
        assert torch.equal(bucket.g[1], torch.ones(6, dtype=dtype))
        laid_out = (A.t().contiguous().t(), B.t().contiguous().t())
        assert not laid_out[0].is_contiguous() and torch.equal(laid_out[0], A)
        bucket.write(2, *laid_out, 2.0, torch.full((6,), 3.0))
        assert torch.equal(bucket.A_t[2], bucket.A_t[1]) and torch.equal(bucket.B_t[2], bucket.B_t[1])
        assert torch.equal(bucket.g[2], torch.full((6,), 3.0, dtype=dtype))
        assert torch.equal(bucket.A_t[0], torch.zeros(5, 8, dtype=dtype))  # slot 0 untouched: "no adapter"


def test_an_int8_bucket_quantizes_each_rank_symmetrically_and_reads_back_dequantized():
    """int8 slots: one fp32 scale per rank (absmax / 127 over A's column and over scale * B's row), values
    within half a step of the factors, zeros and zero scales past the rank; clear and grow keep that."""
    torch.manual_seed(3)
    bucket = _Bucket(fan_in=40, out=30, rank=8, capacity=2, dtype=torch.int8, device="cpu")
    A, B = torch.randn(3, 40), torch.randn(30, 3)
    bucket.write(1, A, B, 2.0, None)
    sa, sb = bucket.a_scale[1], bucket.b_scale[1]
    torch.testing.assert_close(sa[:3], A.abs().amax(dim=1) / 127)
    torch.testing.assert_close(sb[:3], (2.0 * B).abs().amax(dim=0) / 127)
    assert torch.equal(sa[3:], torch.zeros(5)) and torch.equal(bucket.A_t[1, :, 3:], torch.zeros(40, 5, dtype=torch.int8))
    assert bucket.A_t[1, :, :3].abs().amax(dim=0).tolist() == [127] * 3  # each rank's largest maps to 127
    deq_A, deq_B, g = bucket.factors(torch.tensor([1]))
    assert deq_A.dtype == torch.float32 and torch.equal(g[0], torch.ones(30))
    assert ((deq_A[0, :, :3] - A.t()).abs() <= sa[:3] / 2 + 1e-7).all()
    assert ((deq_B[0, :3] - 2.0 * B.t()).abs() <= sb[:3, None] / 2 + 1e-7).all()
    assert torch.equal(bucket.factors(slice(1, 2))[0], deq_A)
    bucket.grow(4)
    assert bucket.a_scale.shape == (4, 8) and torch.equal(bucket.factors(slice(1, 2))[1], deq_B)
    bucket.clear(1)
    assert not bucket.a_scale[1].any() and not bucket.factors(slice(1, 2))[0].any()


def test_an_int8_slot_written_from_a_pools_prequantized_factors_equals_one_quantized_in_place():
    """A serving pool's install copies the int8 forms its loader thread computed (``share_int8``) instead of
    quantizing: the slot holds exactly what quantizing the same factors in place writes, scale folded into
    B's row scales, padding past the rank zeroed where a wider adapter was before; a factor edited since it
    was quantized (its version moved) is quantized again rather than copied stale."""
    from grafting.stacks import int8_rows, share_int8

    torch.manual_seed(5)

    def shared(t):  # a parameter holding a host-tier tensor laid out for the store, with its int8 form
        laid = t.t().contiguous().t()
        laid.grafting_int8 = int8_rows(laid.t(), dim=0 if t.shape[0] < t.shape[1] else 1)
        param = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        param.data = laid
        share_int8(param, laid)
        return param

    for r, scale in ((8, 1), (6, 2.5), (3, 0.75)):
        A, B = torch.randn(r, 40), torch.randn(30, r)
        fast = _Bucket(fan_in=40, out=30, rank=8, capacity=2, dtype=torch.int8, device="cpu")
        slow = _Bucket(fan_in=40, out=30, rank=8, capacity=2, dtype=torch.int8, device="cpu")
        for bucket in (fast, slow):  # a rank-8 adapter first: its values past r must not survive
            bucket.write(1, torch.randn(8, 40), torch.randn(30, 8), 3.0, None)
        fast.write(1, shared(A), shared(B), scale, None)
        (qa, sa), (qb, sb) = int8_rows(A.t(), dim=0), int8_rows(B.t(), dim=1)
        want_A, want_B = torch.zeros(40, 8, dtype=torch.int8), torch.zeros(8, 30, dtype=torch.int8)
        want_A[:, :r], want_B[:r] = qa, qb
        assert torch.equal(fast.A_t[1], want_A) and torch.equal(fast.B_t[1], want_B)
        assert torch.equal(fast.a_scale[1], torch.cat([sa, torch.zeros(8 - r)]))
        assert torch.equal(fast.b_scale[1], torch.cat([sb * scale, torch.zeros(8 - r)]))  # the scale, folded in
        assert torch.equal(fast.g[1], torch.ones(30)) and not fast.A_t[0].any()  # slot 0 untouched
        deq_A, deq_B, _ = fast.factors(torch.tensor([1]))
        assert ((deq_A[0, :, :r] - A.t()).abs() <= sa / 2 + 1e-6).all()
        assert ((deq_B[0, :r] - scale * B.t()).abs() <= scale * sb[:, None] / 2 + 1e-6).all()
        if scale == 1:  # quantizing in place gives the same slot
            slow.write(1, A, B, scale, None)
            assert all(torch.equal(a, b) for a, b in zip(fast.tensors(), slow.tensors(), strict=True))
    A, B = torch.randn(8, 40), torch.randn(30, 8)
    pA, pB = shared(A), shared(B)
    with torch.no_grad():
        pA.mul_(2)  # edited after its int8 form was made
    fast = _Bucket(fan_in=40, out=30, rank=8, capacity=2, dtype=torch.int8, device="cpu")
    slow = _Bucket(fan_in=40, out=30, rank=8, capacity=2, dtype=torch.int8, device="cpu")
    fast.write(1, pA, pB, 1, None)
    slow.write(1, 2 * A, B, 1, None)
    assert all(torch.equal(a, b) for a, b in zip(fast.tensors(), slow.tensors(), strict=True))


def test_put_writes_what_torch_would_into_strided_slots():
    """``put`` (a slot write on the calling thread) gives exactly torch's values: copies, products with a
    number or a per-column tensor, conversions to bf16 (in pieces past torch's grain size), fills; into a
    strided slice of a larger tensor or of its NumPy view, from a transposed source and from a parameter that
    requires grad."""
    from grafting.stacks import put

    torch.manual_seed(0)
    source = torch.randn(1000, 40).t()  # (40, 1000), transposed: 40,000 elements, above the grain size
    per_column = torch.rand(1000)
    cases = [(torch.float32, torch.float32, None), (torch.float32, torch.float32, 0.37),
             (torch.float32, torch.float32, per_column), (torch.float32, torch.float16, 0.37),
             (torch.bfloat16, torch.bfloat16, None), (torch.bfloat16, torch.float32, None),
             (torch.bfloat16, torch.float32, 0.37), (torch.bfloat16, torch.float32, per_column),
             (torch.int8, torch.int8, None)]
    for dst_dtype, src_dtype, scale in cases:
        src = (source * 40).to(src_dtype) if src_dtype == torch.int8 else source.to(src_dtype)
        want = (src if scale is None else src * scale).to(dst_dtype)
        for as_numpy in (False, True) if dst_dtype != torch.bfloat16 else (False,):
            store = torch.full((3, 48, 1000), 7, dtype=dst_dtype)
            view = store.numpy() if as_numpy else store
            put(view[1, :40], torch.nn.Parameter(src, requires_grad=src.is_floating_point()), scale)
            assert torch.equal(store[1, :40], want), (dst_dtype, src_dtype, scale, as_numpy)
            assert (store[0] == 7).all() and (store[2] == 7).all() and (store[1, 40:] == 7).all()
            put(view[2, :, 900:], 0)  # a strided slice: zeros there only
            assert (store[2, :, 900:] == 0).all() and (store[2, :, :900] == 7).all()
