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
