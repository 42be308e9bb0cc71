"""The torch path's gather plans against the rule they implement, y[i] = x[i] @ A[slot_i] @ B[slot_i]
(S-LoRA's gather, arXiv:2311.03285), for each kind of plan: views, per-adapter groups, per-row copies and the
decode row bank."""

from __future__ import annotations

import pytest
import torch

from grafting.plans import _bank_rows, _gather_plan, _lowrank_rows, BankPlan, layer_slots
from grafting.batching import RowRouting
from grafting.stacks import RowBank, _Bucket


def filled_bucket(fan_in=6, out=5, rank=4, slots=6) -> _Bucket:
    torch.manual_seed(0)
    bucket = _Bucket(fan_in, out, rank, slots, torch.float32, torch.device("cpu"))
    for s in range(1, slots):
        bucket.write(s, torch.randn(rank, fan_in), torch.randn(out, rank), 0.5, None)
    return bucket


def expected(bucket, x, slots):
    return torch.stack([x[i] @ bucket.A_t[s] @ bucket.B_t[s] for i, s in enumerate(slots)])


@pytest.mark.parametrize("slots,kind", [([1, 2, 3, 4], "views"), ([2, 2, 3, 3, 2, 1], "groups"),
                                        ([4, 1, 3, 2], "copies"), ([3, 0, 5], "copies")])
def test_each_plan_gives_every_row_its_own_slot(slots, kind):
    bucket = filled_bucket()
    x = torch.randn(len(slots), 3, 6)
    A, B, _, groups = _gather_plan(bucket, torch.tensor(slots))
    assert (groups is not None) == (kind == "groups")
    if kind == "views":  # rows in slot order read the stack itself
        assert A.data_ptr() == bucket.A_t[slots[0]].data_ptr()
    if kind == "groups":  # each adapter's factors once
        assert A.shape[0] == len(set(slots))
    torch.testing.assert_close(_lowrank_rows(x, A, B, groups), expected(bucket, x, slots))


def test_the_row_bank_copies_only_what_a_new_composition_adds():
    bucket, bank = filled_bucket(), RowBank()
    x = torch.randn(4, 1, 6)
    for slots in ([4, 1, 3, 2], [2, 5, 3, 4]):
        plan = _gather_plan(bucket, torch.tensor(slots), bank)
        assert isinstance(plan, BankPlan)
        order, (A, B, _, groups) = _bank_rows(None, plan, len(slots), x.device)
        order = list(range(len(slots))) if order is None else order.tolist()
        low = _lowrank_rows(x[order], A, B, groups)
        torch.testing.assert_close(low, expected(bucket, x, slots)[order])
    # the second composition kept slots 2, 3 and 4 where they were: only slot 5 was copied in
    assert sorted(s for s, _ in bank.owner[:4]) == [2, 3, 4, 5]


def test_rows_whose_adapter_a_layer_lacks_read_slot_zero():
    rows = RowRouting.build(["a", "b", None, "a"], {"a": (4, 1), "b": (4, 2)}, {"a": "ha", "b": "hb"}, None)
    _, slots, names = rows.buckets[4]
    assert slots.tolist() == [1, 2, 0, 1]
    assert layer_slots(rows, None, slots, names, ["b"]).tolist() == [0, 2, 0, 0]
    assert layer_slots(rows, None, slots, names, ["a", "b"]) is slots
