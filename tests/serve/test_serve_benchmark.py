"""benchmarks/serve.py stays runnable: its quick workload drives every system it compares (grafting, the bf16
and int8 stores, base only, peft's mixed batches, peft with set_adapter, all on the engine's scheduler) to the
end with no failed request, and reports the stores' accuracy. No timing is asserted; the figures live in
docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
SCRIPT = Path(__file__).parents[2] / "benchmarks" / "serve.py"


def test_quick_workload_runs_every_system_without_failures():
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--skip-kernel", "--skip-smollm2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    accuracy = figures["workload"].pop("store_accuracy")
    assert {"bf16_max_abs_diff", "int8_max_abs_diff", "bf16_top1_agreement", "int8_top1_agreement"} <= set(accuracy)
    systems = {(trace, name): s for trace, by_name in figures["workload"].items() for name, s in by_name.items()}
    assert {"grafting", "grafting bf16 store", "grafting int8 store", "base only (c)", "peft mixed (a)",
            "peft set_adapter (b)"} <= \
        {name for _, name in systems}
    for key, s in systems.items():
        assert s["failed"] == 0 and s["requests"] > 0 and s["tokens"] > 0, key


def test_stores_picks_which_of_grafting_s_stores_run():
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--skip-kernel", "--skip-smollm2", "--stores",
                          "int8", "--goal-rounds", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])["workload"]
    figures.pop("store_accuracy")
    names = {name for by_name in figures.values() for name in by_name}
    assert "grafting int8 store" in names and not names & {"grafting", "grafting bf16 store"}


def test_store_accuracy_on_trained_adapters_runs_on_any_local_model(tmp_path):
    """benchmarks/serve_accuracy.py on a tiny Llama with two adapters: the int8 store moves logits (it
    quantizes) more than bf16 does, the adapters move the base, every answer is compared."""
    from serving_models import add_random_adapter, save_tiny_lm

    import grafting as gf
    base, _ = save_tiny_lm(tmp_path / "tiny", "llama", chat=True)
    model = gf.AdaptedModel(base)
    for i, name in enumerate(("one", "two")):
        add_random_adapter(model, name, "llama", r=[4, 16][i], seed=5 + i)
        model.save_adapter(tmp_path / "root" / name, name=name)
    script = SCRIPT.with_name("serve_accuracy.py")
    run = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "tiny"), "--adapter-root",
                          str(tmp_path / "root"), "--max-tokens", "6", "--questions", "3"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])["store_accuracy_trained"]
    assert figures["adapters"] == 2 and figures["answers"] == 6 and 0 < figures["answer_tokens"] <= 36
    assert figures["adapter_top1_changed"] > 0
    assert 0 < figures["bf16"]["max_abs_logit_diff"] < figures["int8"]["max_abs_logit_diff"]
    for key in ("bf16", "int8"):
        assert 0 <= figures[key]["greedy_identical"] <= 1 and 0 < figures[key]["top1_agreement"] <= 1
        assert figures[key]["kl_per_token"] >= 0
