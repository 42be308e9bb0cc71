"""The README's commands and tour run as written, and CI runs the README's test command."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    return [b.strip() for b in blocks("bash")]


def test_exactly_two_commands_and_ci_runs_the_test_one():
    demo, tests = commands()
    assert "pip install torch==2.13.0" in demo and "pip install torch==2.13.0" in tests
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def argv(step: str) -> list[str]:
    words = shlex.split(step)
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    if words[0] == "graft":
        return [sys.executable, "-m", "grafting.cli.main", *words[1:]]
    raise AssertionError(f"unexpected README step {step!r}")


def test_demo_command_runs(tmp_path):
    demo = commands()[0]
    steps = [s.strip() for s in demo.split("&&") if not s.strip().startswith("pip ")]
    assert steps, "the demo command runs something after installing"
    # as on a fresh checkout: graft train refuses an output_dir left by an earlier run (runs/ in the repo)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    for step in steps:
        r = subprocess.run(argv(step), cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{step}\n{r.stdout}\n{r.stderr}"
    assert "method" in r.stdout and "lora" in r.stdout  # the last step inspects the trained adapter


def test_tour_runs(tmp_path, monkeypatch):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=64))

    peft_model = get_peft_model(tiny(), PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "path/to/peft_adapter")
    monkeypatch.chdir(tmp_path)
    (tour,) = blocks("python")
    namespace = {"base": tiny(), "batch": {"input_ids": torch.randint(0, 64, (3, 5))}}
    exec(compile(tour, "README.md", "exec"), namespace)
    assert (tmp_path / "out/math/adapter_config.json").exists()
    assert isinstance(namespace["plain"], LlamaForCausalLM)
    console = re.findall(r"\$ (graft .*?)\s{2,}#", README)
    for cmd in console:
        r = subprocess.run(argv(cmd), cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("link", re.findall(r"\]\((docs/[^)]+)\)", README))
def test_doc_links_exist(link):
    assert (ROOT / link).exists()


def test_api_demo_script_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "demo_minilm.py"), "--out", str(tmp_path / "a")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "row 0 equals the single-adapter run: True" in r.stdout
