"""Merge inputs: single file, directory, sharded directory, pickle refused, damaged files named; layer indices."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from grafting.errors import GraftingError
from grafting.merge.io import INDEX, MergeInput, layer_index, num_layers, open_input


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


def test_input_round_trips_what_safetensors_wrote(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(6).reshape(2, 3), "c": torch.ones(5, dtype=torch.float16)}
    save_file(tensors, tmp_path / "x.safetensors")
    _assert_matches(open_input(tmp_path / "x.safetensors"), tensors)


def test_input_reads_every_dtype_and_hands_out_its_own_buffers(tmp_path):
    tensors = {"f": torch.randn(4, 3), "h": torch.randn(5).half(), "b": torch.randn(2, 2).bfloat16(),
               "i": torch.arange(7), "m": torch.tensor([True, False, True]), "s": torch.tensor(2.5),
               "z": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "x.safetensors")
    inp = open_input(tmp_path / "x.safetensors")
    _assert_matches(inp, tensors)
    first = inp.get("f")
    first.zero_()  # a merge method may overwrite what get returned; the next read must not see it
    assert torch.equal(inp.get("f"), tensors["f"])
    inp.close()
    assert torch.equal(inp.get("h"), tensors["h"])  # reopens after close


def test_damaged_files_are_named(tmp_path):
    save_file({"a": torch.ones(64), "b": torch.ones(8)}, tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-16])
    with pytest.raises(GraftingError, match=r"cut.safetensors: tensor '.' ends past the end of the file"):
        open_input(tmp_path / "cut.safetensors")
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["a"]["shape"] = [65]
    body = json.dumps(header).encode()
    (tmp_path / "shape.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])
    with pytest.raises(GraftingError, match=r"shape.safetensors: tensor 'a' has shape \[65\] of F32 \(260 bytes\) "
                                            r"but data_offsets span 256 bytes"):
        open_input(tmp_path / "shape.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")
    with pytest.raises(GraftingError, match="junk.safetensors: not a safetensors file"):
        open_input(tmp_path / "junk.safetensors")
