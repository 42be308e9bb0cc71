"""Merge inputs (single file, directory, sharded directory; pickle refused) and the sharded writer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from grafting.errors import GraftingError
from grafting.merge.io import INDEX, MergeInput, ShardWriter, layer_index, num_layers, open_input


def _gpt2(path, *, shard=None, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: not saved


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("io")
    whole = _gpt2(root / "whole")
    sharded = _gpt2(root / "sharded", shard="20KB", seed=1)
    return root, whole, sharded


def _assert_matches(inp, expected):
    assert set(inp.names()) == set(expected)
    for name, tensor in expected.items():
        assert inp.shape(name) == tuple(tensor.shape)
        assert inp.dtype(name) == tensor.dtype
        torch.testing.assert_close(inp.get(name), tensor, rtol=0, atol=0)


def test_directory_input_reads_every_tensor_and_the_config(saved):
    root, whole, _ = saved
    inp = open_input(root / "whole")
    assert isinstance(inp, MergeInput)
    _assert_matches(inp, whole)
    assert inp.config["n_layer"] == 3 and num_layers(inp.config) == 3


def test_single_file_input_has_no_config(saved):
    root, whole, _ = saved
    inp = open_input(root / "whole" / "model.safetensors")
    _assert_matches(inp, whole)
    assert inp.config is None


def test_sharded_input_follows_the_index(saved):
    root, _, sharded = saved
    index = json.loads((root / "sharded" / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # the fixture really is sharded
    inp = open_input(root / "sharded")
    _assert_matches(inp, sharded)
    # names come shard by shard, so reading in order walks each file once
    files = [index["weight_map"][n] for n in inp.names()]
    assert files == sorted(files)


def test_index_naming_a_missing_shard_or_a_path_outside_is_refused(saved, tmp_path):
    root, _, _ = saved
    index = json.loads((root / "sharded" / INDEX).read_text())
    for bad, expect in (("model-00009-of-00009.safetensors", "missing"), ("../whole/model.safetensors", "file name")):
        broken = dict(index, weight_map=dict(index["weight_map"]))
        broken["weight_map"][next(iter(broken["weight_map"]))] = bad
        d = tmp_path / expect.replace(" ", "_")
        d.mkdir()
        (d / INDEX).write_text(json.dumps(broken))
        with pytest.raises(GraftingError, match=expect):
            open_input(d)


def test_index_that_misplaces_a_tensor_is_refused(saved, tmp_path):
    root, _, _ = saved
    index = json.loads((root / "sharded" / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    for s in shards:
        (tmp_path / s).symlink_to(root / "sharded" / s)
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(GraftingError, match=f"'{name}'"):
        open_input(tmp_path)


def test_pickle_weights_are_never_loaded(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GraftingError, match="pickle.*pytorch_model.bin"):
        open_input(tmp_path)
    with pytest.raises(GraftingError, match="pickle"):
        open_input(tmp_path / "pytorch_model.bin")


def test_other_paths_get_clear_errors(tmp_path):
    with pytest.raises(GraftingError, match="no such file"):
        open_input(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraftingError, match="model.safetensors"):
        open_input(tmp_path / "empty")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(GraftingError, match="adapter"):
        open_input(tmp_path / "adapter")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(GraftingError, match="not a safetensors file"):
        open_input(tmp_path / "junk.safetensors")


def test_layer_index_and_layer_count():
    cases = {"model.layers.7.mlp.up_proj.weight": 7, "transformer.h.2.attn.c_attn.bias": 2,
             "bert.encoder.layer.11.output.dense.weight": 11, "blocks.4.norm.weight": 4,
             "encoder.block.3.layer.0.SelfAttention.q.weight": 3, "layers.0.w": 0,
             "model.embed_tokens.weight": None, "lm_head.weight": None, "transformer.wte.weight": None,
             "model.norm.weight": None, "transformer.high.5.weight": None}
    for name, layer in cases.items():
        assert layer_index(name) == layer, name
    assert num_layers({"num_hidden_layers": 5}) == 5
    assert num_layers({"n_layer": 4}) == 4
    assert num_layers({"text_config": {"num_hidden_layers": 6}, "vision_config": {}}) == 6
    assert num_layers({"hidden_size": 8}) is None and num_layers(None) is None


def _tensors(n, numel, dtype=torch.float32):
    g = torch.Generator().manual_seed(n)
    return {f"t{i:02d}": torch.randn(numel, generator=g).to(dtype) for i in range(n)}


def test_writer_holds_at_most_one_shard_and_flushes_as_it_goes(tmp_path):
    tensors = _tensors(12, 100)  # 400 bytes each
    writer = ShardWriter(tmp_path, shard_size=1000)
    on_disk = []
    for name, t in tensors.items():
        writer.add(name, t)
        assert writer.held_bytes <= 1000 and len(writer._held) <= 2
        on_disk.append(len(list(tmp_path.glob("*.safetensors"))))
    assert writer.peak_held_bytes <= 1000
    assert on_disk[-1] >= 5 and on_disk == sorted(on_disk)  # shards left memory while tensors kept coming
    files = writer.finish()
    assert [f.name for f in files] == [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == 12 * 400
    assert set(index["weight_map"]) == set(tensors)
    _assert_matches(open_input(tmp_path), tensors)
    assert not list(tmp_path.glob(".shard-*"))


def test_writer_single_shard_and_oversized_tensor(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    w = ShardWriter(small, shard_size=10**6)
    tensors = _tensors(3, 10, torch.bfloat16)
    for k, v in tensors.items():
        w.add(k, v)
    assert [f.name for f in w.finish()] == ["model.safetensors"] and not (small / INDEX).exists()
    loaded = load_file(small / "model.safetensors")
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == torch.bfloat16 for k, v in tensors.items())

    big = tmp_path / "big"
    big.mkdir()
    w = ShardWriter(big, shard_size=100)
    w.add("huge", torch.ones(1000))  # larger than a shard: alone in its own
    w.add("tiny", torch.ones(2))
    assert len(w.finish()) == 2
    assert json.loads((big / INDEX).read_text())["weight_map"] == {
        "huge": "model-00001-of-00002.safetensors", "tiny": "model-00002-of-00002.safetensors"}


def test_writer_stores_views_on_their_own_and_refuses_duplicates(tmp_path):
    base = torch.arange(100, dtype=torch.float32)
    w = ShardWriter(tmp_path, shard_size=10**6)
    w.add("view", base[10:20])
    w.add("strided", base.view(10, 10).t())
    with pytest.raises(GraftingError, match="twice"):
        w.add("view", base[:3])
    w.finish()
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["view"], base[10:20])
    assert torch.equal(loaded["strided"], base.view(10, 10).t())
    assert (tmp_path / "model.safetensors").stat().st_size < 100 * 4 + 400  # not the whole buffer twice


def test_input_round_trips_what_safetensors_wrote(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(6).reshape(2, 3), "c": torch.ones(5, dtype=torch.float16)}
    save_file(tensors, tmp_path / "x.safetensors")
    _assert_matches(open_input(tmp_path / "x.safetensors"), tensors)
