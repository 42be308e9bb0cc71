"""The streaming shard writer: files safetensors reads back exactly, HF's shard layout, one tensor in memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from grafting.errors import GraftingError
from grafting.merge.io import INDEX, open_input
from grafting.merge.shards import ShardWriter


def _tensors(n, numel, dtype=torch.float32):
    g = torch.Generator().manual_seed(n)
    return {f"t{i:02d}": torch.randn(numel, generator=g).to(dtype) for i in range(n)}


def _layout(tensors):
    return [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def test_each_tensor_is_on_disk_when_add_returns(tmp_path):
    tensors = _tensors(12, 100)  # 400 bytes each: 2 per 1000-byte shard
    writer = ShardWriter(tmp_path, _layout(tensors), shard_size=1000)
    assert len(writer.files) == 6
    for name, t in tensors.items():
        writer.add(name, t)
        # the file holding it already has its bytes: the writer keeps no tensor
        data = writer.files[int(name[1:]) // 2].read_bytes()
        assert t.numpy().tobytes() in data
    files = writer.finish()
    assert [f.name for f in files] == [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == 12 * 400
    assert index["weight_map"]["t03"] == "model-00002-of-00006.safetensors"
    loaded = open_input(tmp_path)
    assert all(torch.equal(loaded.get(k), v) for k, v in tensors.items())


def test_files_are_what_safetensors_reads(tmp_path):
    tensors = {"w": torch.randn(3, 5), "h": torch.randn(7).half(), "b": torch.randn(2, 3).bfloat16(),
               "ids": torch.arange(5), "mask": torch.tensor([True, False]), "scalar": torch.tensor(1.5),
               "empty": torch.zeros(0, 4)}
    w = ShardWriter(tmp_path, _layout(tensors), shard_size=10**6, metadata={"merge_method": "ties"})
    for k, v in tensors.items():
        w.add(k, v)
    assert [f.name for f in w.finish()] == ["model.safetensors"] and not (tmp_path / INDEX).exists()
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "merge_method": "ties"}
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0  # the data starts aligned


def test_oversized_tensor_gets_its_own_shard_and_views_are_written_as_values(tmp_path):
    base = torch.arange(1000, dtype=torch.float32)
    tensors = {"huge": torch.ones(1000), "view": base[10:20], "strided": base[:100].view(10, 10).t()}
    w = ShardWriter(tmp_path, _layout(tensors), shard_size=100 * 4 + 400)
    for k, v in tensors.items():
        w.add(k, v)
    assert len(w.finish()) == 2
    assert json.loads((tmp_path / INDEX).read_text())["weight_map"] == {
        "huge": "model-00001-of-00002.safetensors", "strided": "model-00002-of-00002.safetensors",
        "view": "model-00002-of-00002.safetensors"}
    second = load_file(tmp_path / "model-00002-of-00002.safetensors")
    assert torch.equal(second["view"], base[10:20]) and torch.equal(second["strided"], base[:100].view(10, 10).t())
    assert (tmp_path / "model-00002-of-00002.safetensors").stat().st_size < 110 * 4 + 400  # not the whole buffer


def test_layout_is_enforced(tmp_path):
    with pytest.raises(GraftingError, match="'a' written twice"):
        ShardWriter(tmp_path, [("a", (2,), torch.float32), ("a", (2,), torch.float32)], 100)
    with pytest.raises(GraftingError, match="positive number of bytes"):
        ShardWriter(tmp_path, [("a", (2,), torch.float32)], 0)
    w = ShardWriter(tmp_path, [("a", (2,), torch.float32), ("b", (3,), torch.float16)], 100)
    with pytest.raises(GraftingError, match="expected tensor 'a' next, got 'b'"):
        w.add("b", torch.zeros(3).half())
    with pytest.raises(GraftingError, match=r"'a': the layout says \(2,\) torch.float32, got \(3,\) torch.float32"):
        w.add("a", torch.zeros(3))
    w.add("a", torch.zeros(2))
    with pytest.raises(GraftingError, match="stopped before tensor 'b'"):
        w.finish()
