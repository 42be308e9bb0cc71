"""ComPEFT compression (grafting/merge/compress.py): the paper's rule on hand-built tensors, bit-exact packing,
the sizes the format promises, peft loading decompressed adapters, errors and atomic writes, and the CLI."""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import grafting as gf
from grafting.cli.compress import register
from grafting.errors import GraftingError
from grafting.io.reader import AdapterReader
from grafting.merge.compress import (MANIFEST_NAME, PAYLOAD_NAME, CompressedTensor, compress, compress_tensor,
                                     decompress, decompress_tensor, read_compressed)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- fixtures ---------------------------------------------------------------------------------------------------
def tiny_bert():
    torch.manual_seed(1)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def write_adapter(base, path, use_dora=False):
    """A trained-looking adapter: every trainable tensor moved off its init (B non-zero, magnitudes scaled)."""
    model = gf.adapt(copy.deepcopy(base), gf.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora,
                                                        target_modules=["query", "value", "intermediate.dense"],
                                                        modules_to_save=["classifier"], task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g)
                p.mul_(1 + 0.2 * noise.abs()) if "magnitude" in name else p.add_(0.3 * noise)
    model.save_adapter(path)
    return pathlib.Path(path)


@pytest.fixture(scope="module")
def base():
    return tiny_bert()


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return write_adapter(base, tmp_path_factory.mktemp("src") / "adapter")


BATCH = {"input_ids": torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))}
BATCH["attention_mask"] = torch.ones_like(BATCH["input_ids"])


def logits(model):
    with torch.no_grad():
        return model(**BATCH).logits


def expected_k(density, n):
    return min(n, math.ceil(density * n - 1e-9))


def compressed_in_memory(key, t, min_numel=64):
    return (key.endswith(("lora_A.weight", "lora_B.weight")) and t.numel() >= min_numel)


# ---- one tensor: the paper's rule -------------------------------------------------------------------------------
T = torch.tensor([[0.5, -3.0, 0.1, 2.0], [-0.2, 4.0, -1.0, 0.05]])


@pytest.mark.parametrize("scale", [1.0, 2.5, "norm"])
def test_top_k_entries_keep_their_sign_and_take_one_scale(scale):
    c = compress_tensor(T, density=0.25, scale=scale)  # 2 of 8 entries: 4.0 and -3.0
    sigma = float(T.double().std())  # with Bessel's correction, as the official code's tv.std()
    s = float(T.double().norm()) / math.sqrt(2) if scale == "norm" else scale * sigma
    want = torch.zeros(2, 4)
    want[0, 1], want[1, 1] = -s, s
    assert c.count == 2 and c.shape == (2, 4)
    torch.testing.assert_close(decompress_tensor(c), want)
    if scale == "norm":
        torch.testing.assert_close(decompress_tensor(c).norm(), T.norm())


def test_ties_go_to_the_lower_position_and_zeros_never_survive():
    t = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 0.0])
    dense = decompress_tensor(compress_tensor(t, 0.5, scale=1.0))
    assert torch.nonzero(dense).flatten().tolist() == [0, 1, 2]
    assert torch.equal(torch.sign(dense[:3]), t[:3])
    c = compress_tensor(torch.tensor([0.0, 0.0, 0.0, 2.0]), 1.0)
    assert c.count == 1
    zero = compress_tensor(torch.zeros(10), 1.0)
    assert zero.count == 0 and torch.equal(decompress_tensor(zero), torch.zeros(10))


def test_survivor_count_is_the_ceiling_of_density_times_size():
    # 0.1 * 30 is 3.0000000000000004 in floating point: still 3 survivors
    assert compress_tensor(torch.randn(30), 0.1).count == 3
    assert compress_tensor(torch.randn(31), 0.1).count == 4
    assert compress_tensor(torch.randn(1000), 1e-9).count == 1


# ---- packing round trips ----------------------------------------------------------------------------------------
def unpack(c: CompressedTensor, n: int):
    """Positions and negative-flags read straight from the documented bit layout."""
    raw = c.positions.numpy()
    if c.encoding == "all":
        pos = np.arange(n)
    elif c.encoding == "mask":
        pos = np.flatnonzero(np.unpackbits(raw, bitorder="little")[:n])
    else:
        gaps = np.frombuffer(raw.tobytes(), dtype=f"<u{int(c.encoding[5:]) // 8}").astype(np.int64)
        pos = np.cumsum(gaps + 1) - 1
    return pos, np.unpackbits(c.signs.numpy(), bitorder="little")[:c.count].astype(bool)


@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (3, 5, 7), (1023,), (64, 33)])
@pytest.mark.parametrize("density", [1e-6, 0.01, 0.1, 0.5, 0.999, 1.0])
def test_positions_and_signs_round_trip_bit_exactly(shape, density):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    n = t.numel()
    c = compress_tensor(t, density)
    k = expected_k(density, n)
    want = torch.sort(torch.topk(t.abs().flatten(), k).indices).values.numpy()
    pos, negative = unpack(c, n)
    assert c.count == k and np.array_equal(pos, want)
    assert np.array_equal(negative, (t.flatten()[want] < 0).numpy())
    assert c.signs.numel() == (k + 7) // 8 and c.positions.numel() <= (n + 7) // 8
    dense = decompress_tensor(c).flatten()
    assert np.array_equal(torch.nonzero(dense).flatten().numpy(), want)
    assert torch.equal(dense[want].abs(), torch.full((k,), c.scale))
    assert torch.equal(torch.sign(dense[want]), torch.sign(t.flatten()[want]))


def test_the_smaller_position_encoding_is_chosen():
    sparse = compress_tensor(torch.randn(100_000, generator=torch.Generator().manual_seed(0)), 1e-4)
    assert sparse.encoding == "delta16" and sparse.positions.numel() == 2 * sparse.count  # 20 B, not a 12.5 kB mask
    far = torch.zeros(200_000)
    far[0], far[-1] = 1.0, -2.0
    c = compress_tensor(far, 1.0)
    assert c.encoding == "delta32" and c.positions.numel() == 8
    assert torch.equal(torch.sign(decompress_tensor(c)), torch.sign(far))
    dense = compress_tensor(torch.randn(1000), 0.5)
    assert dense.encoding == "mask" and dense.positions.numel() == 125
    assert compress_tensor(torch.randn(100) + 10, 1.0).positions.numel() == 0  # "all": nothing to store
    assert compress_tensor(torch.randn(10_000), 0.05).encoding == "delta8"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_kept(dtype):
    t = torch.randn(40, 7).to(dtype)
    out = decompress_tensor(compress_tensor(t, 0.2))
    assert out.dtype == dtype and out.shape == t.shape


# ---- adapters on disk ------------------------------------------------------------------------------------------
def payload_data_bytes(path):
    with open(path, "rb") as fh:
        header = int.from_bytes(fh.read(8), "little")
    return path.stat().st_size - 8 - header


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_manifest_and_sizes_are_what_the_format_promises(adapter, tmp_path, density):
    res = compress(adapter, tmp_path / "c", density=density)
    m = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())
    source = AdapterReader(adapter).read_all()
    assert (m["format"], m["version"], m["density"]) == ("grafting-compeft", 1, density)
    assert m["adapter_config"] == json.loads((adapter / "adapter_config.json").read_text())
    assert [e["key"] for e in m["tensors"]] == list(AdapterReader(adapter).keys())
    for e in m["tensors"]:
        assert e["shape"] == list(source[e["key"]].shape) and e["dtype"] == "float32"
        assert (e["stored"] == "compeft") == compressed_in_memory(e["key"], source[e["key"]])
    bound = 0
    for e in m["tensors"]:
        n = math.prod(e["shape"])
        if e["stored"] == "compeft":
            assert e["count"] <= math.ceil(density * n)
            bound += (n + 7) // 8 + (math.ceil(density * n) + 7) // 8 + 4
        else:
            bound += 4 * n
    assert payload_data_bytes(tmp_path / "c" / PAYLOAD_NAME) <= bound
    on_disk = sum((tmp_path / "c" / f).stat().st_size for f in (MANIFEST_NAME, PAYLOAD_NAME))
    assert res.compressed_bytes == on_disk and res.ratio == res.original_bytes / on_disk
    assert res.compressed_tensors == sum(e["stored"] == "compeft" for e in m["tensors"])


def test_a_larger_adapter_is_over_8x_smaller(tmp_path):
    torch.manual_seed(0)
    model = gf.adapt(torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512)),
                     gf.LoraConfig(r=16, target_modules=["0", "1"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    model.save_adapter(tmp_path / "a")
    res = compress(tmp_path / "a", tmp_path / "c", density=0.1)
    assert res.ratio > 8  # 1.1 bits per entry at most, against 32


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_loads_the_decompressed_adapter_as_the_in_memory_tensors_predict(base, tmp_path, use_dora):
    src = write_adapter(base, tmp_path / "adapter", use_dora)
    compress(src, tmp_path / "c", density=0.2)
    out = decompress(tmp_path / "c", tmp_path / "d")
    source = AdapterReader(src).read_all()
    memory = {k: decompress_tensor(compress_tensor(t, 0.2)) if compressed_in_memory(k, t) else t
              for k, t in source.items()}
    on_disk = load_file(str(out / "adapter_model.safetensors"))
    assert on_disk.keys() == memory.keys()
    assert all(torch.equal(on_disk[k], memory[k]) for k in memory)  # magnitudes, head: bit-exact copies
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(src)).eval()
    original = logits(reference)
    result = peft.set_peft_model_state_dict(reference, memory)
    assert not result.unexpected_keys
    torch.testing.assert_close(logits(theirs), logits(reference), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(logits(theirs), logits(base), atol=1e-3)  # the adapter is live
    assert not torch.allclose(logits(theirs), original, atol=1e-4)  # and it is the compressed one
    torch.testing.assert_close(logits(gf.load(copy.deepcopy(base), out)), logits(theirs), atol=1e-5, rtol=1e-5)


def test_half_precision_adapters_come_back_in_their_dtype(adapter, tmp_path):
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    save_file({k: v.half() for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()},
              str(tmp_path / "h" / "adapter_model.safetensors"), metadata={"format": "pt"})
    decompress(compress(tmp_path / "h", tmp_path / "c").path, tmp_path / "d")
    assert {v.dtype for v in load_file(str(tmp_path / "d" / "adapter_model.safetensors")).values()} == {torch.float16}


# ---- errors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), "0.1", True])
def test_density_outside_the_open_closed_unit_interval_is_refused(adapter, tmp_path, density):
    with pytest.raises(GraftingError, match="density"):
        compress(adapter, tmp_path / "c", density=density)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("scale", [0, -1.0, float("inf"), "max"])
def test_bad_scale_is_refused(adapter, tmp_path, scale):
    with pytest.raises(GraftingError, match="scale"):
        compress(adapter, tmp_path / "c", scale=scale)


def test_bad_inputs_name_the_file(adapter, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraftingError, match="adapter_config.json: missing"):
        compress(tmp_path / "empty", tmp_path / "c")
    with pytest.raises(GraftingError, match="not an adapter directory"):
        compress(tmp_path / "nowhere", tmp_path / "c")
    with pytest.raises(GraftingError, match="compeft.json: missing.*uncompressed adapter"):
        decompress(adapter, tmp_path / "d")
    with pytest.raises(GraftingError, match="compeft.json: missing"):
        decompress(tmp_path / "empty", tmp_path / "d")
    with pytest.raises(GraftingError, match="floating dtype"):
        compress_tensor(torch.arange(10), 0.5)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def edit_manifest(path, fn):
    f = path / MANIFEST_NAME
    m = json.loads(f.read_text())
    fn(m)
    f.write_text(json.dumps(m))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format="something-else"), "field 'format'"),
    (lambda m: m.update(version=2), "field 'version'"),
    (lambda m: m.pop("adapter_config"), "field 'adapter_config'"),
    (lambda m: m["tensors"][0].update(count=10 ** 9), r"tensors\[0\].*field 'count'"),
    (lambda m: m["tensors"][0].update(count=m["tensors"][0]["count"] - 1), "compeft.signs|compeft.positions"),
    (lambda m: m["tensors"][1].update(shape="big"), r"tensors\[1\].*field 'shape'"),
    (lambda m: m["tensors"][0].update(encoding="zip"), "field 'encoding'"),
    (lambda m: m["adapter_config"].update(peft_type="NOT_A_METHOD"), "field 'adapter_config'"),
])
def test_foreign_or_corrupt_manifests_are_refused_by_field(adapter, tmp_path, edit, match):
    compress(adapter, tmp_path / "c", density=0.1)
    edit_manifest(tmp_path / "c", edit)
    with pytest.raises(GraftingError, match=match):
        decompress(tmp_path / "c", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_corrupt_payloads_are_refused(adapter, tmp_path):
    compress(adapter, tmp_path / "c", density=0.5)  # masks: a flipped bit changes the survivor count
    f = tmp_path / "c" / PAYLOAD_NAME
    stored = load_file(str(f))
    stored["compeft.positions"][0] ^= 1
    save_file(stored, str(f))
    with pytest.raises(GraftingError, match="position mask marks"):
        decompress(tmp_path / "c", tmp_path / "d")
    del stored["base_model.model.classifier.bias"]
    save_file(stored, str(f))
    with pytest.raises(GraftingError, match="raw tensor 'base_model.model.classifier.bias'"):
        decompress(tmp_path / "c", tmp_path / "d")
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(GraftingError, match="compeft.safetensors: missing or not a readable"):
        decompress(tmp_path / "c", tmp_path / "d")
    assert not (tmp_path / "d").exists()


# ---- atomic writes ----------------------------------------------------------------------------------------------
def fail_on(monkeypatch, name):
    real = pathlib.Path.write_text

    def write_text(self, *a, **kw):
        if self.name == name:
            raise OSError(28, "No space left on device", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_a_failed_write_leaves_no_output_and_keeps_an_earlier_one(adapter, tmp_path, monkeypatch):
    with monkeypatch.context() as mp:
        fail_on(mp, MANIFEST_NAME)  # the payload is already written by then
        with pytest.raises(OSError):
            compress(adapter, tmp_path / "c")
    assert not (tmp_path / "c").exists() and leftovers(tmp_path) == []
    compress(adapter, tmp_path / "c", density=0.1)
    before = (tmp_path / "c" / MANIFEST_NAME).read_bytes()
    with monkeypatch.context() as mp:
        fail_on(mp, MANIFEST_NAME)
        with pytest.raises(OSError):
            compress(adapter, tmp_path / "c", density=0.5)
    assert (tmp_path / "c" / MANIFEST_NAME).read_bytes() == before and leftovers(tmp_path) == []
    read_compressed(tmp_path / "c")
    with monkeypatch.context() as mp:
        fail_on(mp, "adapter_config.json")
        with pytest.raises(OSError):
            decompress(tmp_path / "c", tmp_path / "d")
    assert not (tmp_path / "d").exists() and leftovers(tmp_path) == []


# ---- CLI --------------------------------------------------------------------------------------------------------
def parser():
    p = argparse.ArgumentParser(prog="graft")
    register(p.add_subparsers(dest="command"))
    return p


def test_cli_compresses_prints_sizes_and_decompresses(adapter, tmp_path, capsys):
    args = parser().parse_args(["compress", str(adapter), str(tmp_path / "c"), "--density", "0.2", "--scale", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())
    assert (m["density"], m["scale"]) == (0.2, 2.0)
    original = sum((adapter / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors"))
    compressed = sum((tmp_path / "c" / f).stat().st_size for f in (MANIFEST_NAME, PAYLOAD_NAME))
    assert f"{original:,} bytes" in out and f"{compressed:,} bytes" in out
    assert f"{original / compressed:.1f}x" in out
    args = parser().parse_args(["decompress", str(tmp_path / "c"), str(tmp_path / "d")])
    assert args.func(args) == 0 and str(tmp_path / "d") in capsys.readouterr().out
    assert AdapterReader(tmp_path / "d").keys() == AdapterReader(adapter).keys()
    with pytest.raises(SystemExit):
        parser().parse_args(["compress", str(adapter), str(tmp_path / "e"), "--scale", "big"])
    args = parser().parse_args(["compress", str(adapter), str(tmp_path / "e"), "--density", "2"])
    with pytest.raises(GraftingError, match="density"):
        args.func(args)
