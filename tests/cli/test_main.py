"""The graft CLI: every subcommand has help; inspect prints text and JSON; errors exit 2 with a message."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import grafting as gf
from toys import make_toy
from grafting.cli.main import main


@pytest.fixture
def adapter(tmp_path):
    model = gf.adapt(make_toy("linear"), gf.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["target"]))
    model.save_adapter(tmp_path / "a")
    return tmp_path / "a"


def run(*args):
    return subprocess.run([sys.executable, "-m", "grafting.cli.main", *args], capture_output=True, text=True)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and gf.__version__ in r.stdout
    r = run("--help")
    assert r.returncode == 0 and "inspect" in r.stdout
    r = run("inspect", "--help")
    assert r.returncode == 0 and "--json" in r.stdout


def test_inspect_text(adapter, capsys):
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "dora" in out and "rank(s)" in out and "target" in out and "KB" in out


def test_inspect_json(adapter):
    r = run("inspect", str(adapter), "--json")
    info = json.loads(r.stdout)
    assert info["method"] == "dora" and info["ranks"] == [4]
    assert info["parameters"] == 4 * 12 + 10 * 4 + 10


def test_inspect_error_is_one_line(tmp_path):
    r = run("inspect", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.startswith("graft: error:") and "adapter_config.json" in r.stderr
    assert "Traceback" not in r.stderr


def test_methods_lists_every_registered_method_with_its_fields(capsys):
    import dataclasses

    import toy_method  # noqa: F401  (a plug-in registered from outside the package is listed too)
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(gf.method_names()) and {"lora", "dora", "toy-shared"} <= set(rows)
    for name, row in rows.items():
        cls = gf.get_method(name).config_class
        own = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(gf.AdapterConfig)}
        assert {f["name"] for f in row["fields"]} == own - set(row["flags"])
        assert row["peft_type"] == cls.peft_type and row["description"]
    assert rows["dora"]["flags"] == {"use_dora": True}
    for name, row in rows.items():  # every built-in method cites its paper by arXiv id
        if type(gf.get_method(name)).__module__.startswith("grafting.methods."):
            assert re.search(r"arXiv:\d{4}\.\d{4,5}", row["paper"]), (name, row["paper"])
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "toy-shared" in text and "exact_norm=False" in text
    assert "paper: VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2024, arXiv:2310.11454)." in text


def test_inspect_a_plug_in_adapter_with_shared_tensors(tmp_path, capsys):
    from toy_method import ToySharedConfig
    model = gf.adapt(make_toy("linear"), ToySharedConfig(target_modules=["target"]))
    model.save_adapter(tmp_path / "t")
    assert main(["inspect", str(tmp_path / "t"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "toy-shared" and info["targets"] == ["target"]
    assert info["shared_tensors"] == ["base_model.toy_P"] and info["ranks"] == []
    assert main(["inspect", str(tmp_path / "t")]) == 0
    assert "toy-shared" in capsys.readouterr().out
