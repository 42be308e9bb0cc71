"""Adapters as plain tensors: AdapterReader iterates a directory without building a model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import grafting as gf
import toy_method  # noqa: F401  (registers "toy-shared")
from toys import make_toy, randomize
from grafting.io import peft_format
from grafting.io.reader import AdapterReader


def saved_adapter(tmp_path, config, kind="linear"):
    model = gf.adapt(make_toy(kind), config)
    randomize(model)
    model.save_adapter(tmp_path / "a")
    return model, tmp_path / "a"


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_factors_and_delta_weight_equal_the_model_s(tmp_path, kind, use_dora):
    model, path = saved_adapter(tmp_path, gf.LoraConfig(r=3, lora_alpha=5, target_modules=["target"],
                                                        use_dora=use_dora), kind)
    host = dict(model.hosts())["target"]
    adapter = host.adapters["default"]
    reader = AdapterReader(path)
    assert reader.method.name == ("dora" if use_dora else "lora") and reader.modules() == ["target"]
    roles = {(t.module, t.role) for t in reader}
    assert ("target", "lora_A") in roles and ("target", "lora_B") in roles
    A, B, scale = reader.factors("target")
    torch.testing.assert_close(A, adapter.lora_A.detach().reshape(3, -1))
    torch.testing.assert_close(B, adapter.lora_B.detach().reshape(B.shape[0], -1))
    assert scale == pytest.approx(5 / 3)
    w = host.kind.to_out_in(host.dense_weight().detach())
    expected = host.kind.to_out_in(host.methods["default"].delta_weight(adapter, host).detach())
    dW = reader.delta_weight("target", base_weight=w if use_dora else None)
    torch.testing.assert_close(dW, expected, atol=1e-5, rtol=1e-4)


def test_dora_delta_weight_without_the_base_says_so(tmp_path):
    _, path = saved_adapter(tmp_path, gf.LoraConfig(r=2, target_modules=["target"], use_dora=True))
    with pytest.raises(gf.GraftingError, match="base_weight"):
        AdapterReader(path).delta_weight("target")


def test_shared_tensors_are_saved_once_and_read_as_shared(tmp_path):
    from toy_method import ToySharedConfig, toy_delta

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(5)
    model = gf.adapt(TwoLayers(), ToySharedConfig(target_modules=["a", "b"], scale=0.5))
    randomize(model)
    model.save_adapter(tmp_path / "t")
    with safe_open(str(tmp_path / "t" / "adapter_model.safetensors"), framework="pt") as fh:
        keys = sorted(fh.keys())
    assert keys == ["base_model.model.a.toy_d", "base_model.model.a.toy_mask", "base_model.model.b.toy_d",
                    "base_model.model.b.toy_mask", "base_model.toy_P"]
    assert json.loads((tmp_path / "t" / "adapter_config.json").read_text())["peft_type"] == "GRAFT_TOY_SHARED"
    reader = AdapterReader(tmp_path / "t")
    P = reader.shared_tensors()["toy_P"]
    assert P.shape == (5, 6)  # the largest (out, fan_in) over the adapted layers
    host = dict(model.hosts())["b"]
    a = host.adapters["default"]
    expected = toy_delta(a.toy_d.detach(), a.toy_mask, P, 0.5)
    torch.testing.assert_close(reader.delta_weight("b"), expected)
    assert reader.factors("b") is None  # full rank: no factors
    x = torch.randn(2, 6)
    torch.manual_seed(5)
    loaded = gf.load(TwoLayers(), tmp_path / "t")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_inspect_reads_the_header_only(tmp_path, monkeypatch):
    _, path = saved_adapter(tmp_path, gf.LoraConfig(r=4, target_modules=["target"]))

    def no_data(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(AdapterReader, "get", no_data)
    monkeypatch.setattr(AdapterReader, "read_all", no_data)
    info = peft_format.inspect_adapter(path)
    assert info["method"] == "lora" and info["ranks"] == [4] and info["targets"] == ["target"]
    assert info["parameters"] == 4 * 12 + 10 * 4
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="read tensor data"):  # the guard does catch a data read
        monkeypatch.setattr(AdapterReader, "read_all", no_data)
        peft_format.read_tensors(path)
