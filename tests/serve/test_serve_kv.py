"""The running batch's key/value cache: joins, leaves and decode steps keep every row's keys/values exactly as
concatenating them would, and a decode step writes in place until a buffer is full."""

from __future__ import annotations

import pytest
import torch
from serving_models import add_random_adapter, tiny_lm

import grafting as gf
from grafting.serve import Engine, SamplingParams
from grafting.serve.kv import BatchCache, room

LAYERS, HEADS, DIM = 2, 2, 4


def random_rows(lengths: list, width: int, seed: int):
    """(kv per layer, mask) of right-aligned rows of ``lengths`` real columns, zero padding on the left."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    kv = []
    for _ in range(LAYERS):
        k, v = (torch.randn(len(lengths), HEADS, width, DIM, generator=g) * mask[:, None, :, None] for _ in "kv")
        kv.append((k, v))
    return kv, mask


def left_pad(t, width):
    return torch.cat([t.new_zeros(*t.shape[:2], width - t.shape[2], t.shape[3]), t], dim=2)


def step_columns(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(rows, HEADS, 1, DIM, generator=g) for _ in "kv") for _ in range(LAYERS)]


def decode_step(cache: BatchCache, new) -> None:
    """What a model does with the cache it is handed: one update per layer, then the engine's append_step."""
    lent = cache.model_cache()
    for i, (k, v) in enumerate(new):
        lent.update(k, v, i)
    cache.append_step([(layer.keys, layer.values) for layer in lent.layers])


def test_join_keep_and_decode_equal_concatenation():
    cache = BatchCache()
    a_kv, a_mask = random_rows([3, 5], 5, seed=0)
    b_kv, b_mask = random_rows([7, 2, 4], 7, seed=1)
    cache.set(a_kv, a_mask)
    cache.join(b_kv, b_mask)
    expected = [(torch.cat([left_pad(ak, 7), bk]), torch.cat([left_pad(av, 7), bv]))
                for (ak, av), (bk, bv) in zip(a_kv, b_kv)]
    assert cache.rows == 5 and cache.columns == 7 and cache.capacity == room(7)
    for (k, v), (ek, ev) in zip(cache.kv, expected):
        assert torch.equal(k, ek) and torch.equal(v, ev)
    for s in range(3):
        new = step_columns(5, seed=10 + s)
        decode_step(cache, new)
        expected = [(torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)) for (ek, ev), (k, v) in zip(expected, new)]
    assert cache.columns == 10 and cache.mask[:, -3:].all()
    for (k, v), (ek, ev) in zip(cache.kv, expected):
        assert torch.equal(k, ek) and torch.equal(v, ev)
    # rows 1 and 2 (5 and 7 real columns, then 3 decoded) leave: the longest kept row is row 4, 4 + 3
    rows = torch.tensor([4, 0, 3])
    start = cache.buffers[0][0].untyped_storage().data_ptr()
    cache.keep(rows)
    assert cache.buffers[0][0].untyped_storage().data_ptr() == start  # rows moved inside the buffers
    used = int(cache.mask.sum(1).max())
    assert cache.columns == used == 7
    for (k, v), (ek, ev) in zip(cache.kv, expected):
        assert torch.equal(k, ek[rows][:, :, -used:]) and torch.equal(v, ev[rows][:, :, -used:])
    cache.keep(torch.tensor([], dtype=torch.long))
    assert cache.rows == 0 and cache.kv is None and cache.nbytes() == 0


def test_leaving_rows_slide_the_rest_up_in_place_and_joining_rows_take_their_place():
    """Rows that keep their order are moved inside the buffers (no new buffer, padding nobody needs cut), and
    rows joining no wider than the running ones are written into the rows that left; contents and mask equal
    concatenation's throughout."""
    cache = BatchCache()
    kv, mask = random_rows([5, 3, 2, 2], 6, seed=7)
    cache.set(kv, mask)
    expected, emask = [(k.clone(), v.clone()) for k, v in kv], mask.clone()

    def step(seed):
        nonlocal expected, emask
        new = step_columns(cache.rows, seed=seed)
        decode_step(cache, new)
        expected = [(torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)) for (ek, ev), (k, v) in zip(expected, new)]
        emask = torch.cat([emask, torch.ones(cache.rows, 1, dtype=torch.long)], dim=1)

    def check():
        assert torch.equal(cache.mask, emask)
        for (k, v), (ek, ev) in zip(cache.kv, expected):
            assert torch.equal(k, ek) and torch.equal(v, ev)

    step(20), step(21)
    start = cache.buffers[0][0].untyped_storage().data_ptr()
    cache.keep(torch.tensor([0, 2]))  # rows 1 and 3 leave: row 2 slides up; the longest kept row has 7 of 8 columns
    assert cache.buffers[0][0].untyped_storage().data_ptr() == start and cache.columns == 7
    expected, emask = [(ek[[0, 2]][:, :, 1:], ev[[0, 2]][:, :, 1:]) for ek, ev in expected], emask[[0, 2]][:, 1:]
    check()
    j_kv, j_mask = random_rows([4, 1], 5, seed=8)  # narrower than the running rows' 7 columns: written in place
    cache.join(j_kv, j_mask)
    assert cache.buffers[0][0].untyped_storage().data_ptr() == start and cache.rows == 4
    expected = [(torch.cat([ek, left_pad(k, 7)]), torch.cat([ev, left_pad(v, 7)])) for (ek, ev), (k, v) in zip(expected, j_kv)]
    emask = torch.cat([emask, torch.cat([torch.zeros(2, 2, dtype=torch.long), j_mask], dim=1)])
    check()
    step(30)
    check()
    w_kv, w_mask = random_rows([12], 12, seed=9)  # wider than the running rows: new buffers, rows shifted right
    cache.keep(torch.tensor([1, 2, 3]))
    cache.join(w_kv, w_mask)
    assert cache.buffers[0][0].untyped_storage().data_ptr() != start and cache.columns == 12
    expected = [(torch.cat([left_pad(ek[1:], 12), k]), torch.cat([left_pad(ev[1:], 12), v]))
                for (ek, ev), (k, v) in zip(expected, w_kv)]
    emask = torch.cat([torch.cat([torch.zeros(3, 4, dtype=torch.long), emask[1:]], dim=1), w_mask])
    check()


def test_a_decode_step_writes_in_place_until_the_buffer_is_full():
    cache = BatchCache()
    kv, mask = random_rows([4, 2], 4, seed=3)
    cache.set(kv, mask)
    start = cache.buffers[0][0].data_ptr()
    history = [kv[0][0]]
    while cache.columns < room(4):
        new = step_columns(2, seed=cache.columns)
        decode_step(cache, new)
        history.append(new[0][0])
        assert cache.buffers[0][0].data_ptr() == start  # no copy of the cache while there is room
    new = step_columns(2, seed=99)
    decode_step(cache, new)  # the buffer is full: a bigger one, the columns carried over
    history.append(new[0][0])
    assert cache.buffers[0][0].data_ptr() != start and cache.capacity == room(room(4) + 1)
    assert torch.equal(cache.kv[0][0], torch.cat(history, dim=2))


def test_a_model_that_returns_concatenated_tensors_gets_its_last_column_copied():
    """transformers before 4.56 has no cache layers to lend: the model concatenates and the cache copies the
    new column into its buffer."""
    cache = BatchCache()
    kv, mask = random_rows([3, 1], 3, seed=4)
    cache.set(kv, mask)
    new = step_columns(2, seed=5)
    returned = [(torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2)) for (k, v), (nk, nv) in zip(kv, new)]
    cache._layers = None  # as model_cache leaves it without DynamicLayer
    cache.append_step(returned)
    for (k, v), (ek, ev) in zip(cache.kv, returned):
        assert torch.equal(k, ek) and torch.equal(v, ev)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_long_generations_regrow_the_buffers_and_match_generate(arch):
    model = gf.AdaptedModel(tiny_lm(arch))
    add_random_adapter(model, "a", arch, r=4, seed=1)
    engine = Engine(model)
    params = SamplingParams(max_tokens=70, temperature=0, ignore_eos=True)
    handles = [engine.submit([1, 2, 3], params, "a"), engine.submit([5, 6, 7, 8, 9, 10], params, None)]
    capacities = set()
    while engine.running or engine.waiting:
        engine.step()
        capacities.add(engine.cache.capacity)
    assert len(capacities - {0}) >= 2  # the buffers did fill and grow
    for h, adapter in zip(handles, ["a", None]):
        prompt = h.request.prompt_ids
        with torch.no_grad():
            if adapter is None:
                with model.disabled():
                    ref = model.base_model.generate(torch.tensor([prompt]), max_new_tokens=70, do_sample=False,
                                                    eos_token_id=None, pad_token_id=0)
            else:
                model.set_active(adapter)
                ref = model.base_model.generate(torch.tensor([prompt]), max_new_tokens=70, do_sample=False,
                                                eos_token_id=None, pad_token_id=0)
        assert h.result(timeout=1).token_ids == ref[0, len(prompt):].tolist()
