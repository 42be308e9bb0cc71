"""The training loop end to end: improvement on real data, exact resume after a crash, DDP equivalence,
recipe errors, and what a person sees (metrics file, plots, summary)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipe_files import write_recipe
from grafting import GraftingError
from grafting.train import load_recipe, train
from grafting.train.trainer import lr_at

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def adapter_tensors(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def graft(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "grafting.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def test_packaged_minilm_on_tweets_improves(tmp_path):
    """A short fine-tune of the real encoder on the real tweets beats the untrained head."""
    result = train(load_recipe(EXAMPLES / "minilm_tweets.yaml", [
        "data.max_train_samples=480", "data.max_eval_samples=160", "train.max_steps=30", "train.batch_size=16",
        "train.eval_every=15", "train.progress=false", f"output_dir={tmp_path}"]))
    assert result.after["loss"] < result.before["loss"] - 0.05
    assert result.after["accuracy"] > result.before["accuracy"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    for png in ("loss.png", "accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["kind"] == "eval"] == [0, 15, 30]
    assert all("loss" in e and "lr" in e for e in log if e["kind"] == "train")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["after"]["accuracy"] == result.after["accuracy"]


def test_schedule_shapes():
    recipe = load_recipe({"model": {"path": "x"}, "adapter": {"target_modules": ["q"]},
                          "data": {"source": "packaged:tweets"},
                          "optim": {"lr": 1.0}, "schedule": {"name": "cosine", "warmup_steps": 4}})
    lrs = [lr_at(s, 20, recipe) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 0.05


# `graft train` that dies (os._exit, like kill -9: no cleanup) inside its N-th optimizer step
CRASH_AT_STEP = """
import os, sys, torch
from grafting.cli.main import main
crash_at, calls = int(sys.argv[2]), [0]
real_step = torch.optim.AdamW.step
def step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == crash_at:
        os._exit(9)
    return real_step(self, *args, **kwargs)
torch.optim.AdamW.step = step
sys.exit(main(["train", sys.argv[1]]))
"""


def test_resume_after_kill_equals_uninterrupted(tmp_path, tiny_model_dir, jsonl_data):
    train_f, val_f = jsonl_data
    fields = dict(max_steps=40, save_every=10, eval_every=20, log_every=5, batch_size=4, grad_accum=2)
    straight = tmp_path / "straight"
    train(write_recipe(tmp_path / "a.yaml", tiny_model_dir, train_f, val_f, straight, **fields))

    killed = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "b.yaml", tiny_model_dir, train_f, val_f, killed, **fields)
    # step 27: after the checkpoint at step 20 and the log at step 25, which the resumed run must replay
    proc = subprocess.run([sys.executable, "-c", CRASH_AT_STEP, str(recipe), "27"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert json.loads((killed / "checkpoint" / "trainer_state.json").read_text())["step"] == 20
    assert not (killed / "adapter").exists()
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == 25, "the crash came after work that was logged but not checkpointed"

    r = graft("train", str(recipe), "--resume")
    assert r.returncode == 0, r.stderr
    ours, ref = adapter_tensors(killed), adapter_tensors(straight)
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-6, rtol=1e-5, msg=k)
    entries = lambda out: [(e["kind"], e["step"]) for e in map(json.loads, (out / "metrics.jsonl").open())]  # noqa: E731
    assert entries(killed) == entries(straight), "the metrics log replays nothing twice and loses nothing"


def test_two_processes_equal_one_with_doubled_accumulation(tmp_path, tiny_model_dir, jsonl_data):
    train_f, val_f = jsonl_data
    one = tmp_path / "one"
    train(write_recipe(tmp_path / "one.yaml", tiny_model_dir, train_f, val_f, one, batch_size=4, grad_accum=2))
    two = tmp_path / "two"
    recipe = write_recipe(tmp_path / "two.yaml", tiny_model_dir, train_f, val_f, two, batch_size=4, grad_accum=1)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                "-m", "grafting.cli.main", "train", str(recipe)]
    r = subprocess.run(torchrun, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trainable parameters") == 1, "only rank 0 prints the summary"
    a, b = adapter_tensors(one), adapter_tensors(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_recipe_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x}\nadapter: {target_modules: [q]}\ndata: {source: packaged:tweets}\n"
                   "train: {batchsize: 4}\n")
    with pytest.raises(GraftingError, match=r"did you mean 'train.batch_size'"):
        load_recipe(bad)
    with pytest.raises(GraftingError, match="train.batch_size"):
        load_recipe({"model": {"path": "x"}, "adapter": {"target_modules": ["q"]},
                     "data": {"source": "packaged:tweets"}}, ["train.batch_size=zero"])
    with pytest.raises(GraftingError, match="key=value"):
        load_recipe(bad, ["train.batch_size"])
    with pytest.raises(GraftingError, match="adapter.*'r'"):
        load_recipe({"model": {"path": "x"}, "adapter": {"r": -1}, "data": {"source": "packaged:tweets"}})
    with pytest.raises(GraftingError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    r = graft("train", str(bad))
    assert r.returncode == 2 and "did you mean" in r.stderr and "Traceback" not in r.stderr


def test_bad_rows_are_reported_with_line_numbers(tmp_path, tiny_model_dir, jsonl_data):
    train_f, val_f = jsonl_data
    lines = train_f.read_text().splitlines()
    lines[2] = json.dumps({"txt": "no text field", "label": "neg"})
    lines[6] = "{broken json"
    train_f.write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_f, val_f, tmp_path / "out")
    r = graft("train", str(recipe))
    assert r.returncode == 2
    assert "train.jsonl:3" in r.stderr and "train.jsonl:7" in r.stderr


def test_every_example_recipe_validates():
    for path in EXAMPLES.glob("*.yaml"):
        load_recipe(path)


@pytest.mark.skipif(shutil.which("true") is None, reason="posix")
def test_missing_checkpoint_resume_starts_fresh(tmp_path, tiny_model_dir, jsonl_data):
    train_f, val_f = jsonl_data
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_f, val_f, tmp_path / "out", max_steps=2)
    r = graft("train", str(recipe), "--resume")
    assert r.returncode == 0 and "nothing to resume" in r.stdout
