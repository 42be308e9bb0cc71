"""Merge configs: precedence of parameter settings, base roles, paths, and refusals by name."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from grafting.errors import GraftingError
from grafting.merge import base as merge_base
from grafting.merge.base import WEIGHT, Param, merge_method
from grafting.merge.config import load_config


@pytest.fixture
def models(tmp_path, monkeypatch):
    """Three model directories (config checks only need them to exist), and a cwd elsewhere."""
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def _cfg(root, **over):
    cfg = {"merge_method": "task_arithmetic", "base_model": str(root / "base"),
           "models": [{"model": str(root / "a"), "parameters": {"weight": 0.5}},
                      {"model": str(root / "b"), "parameters": {"weight": 0.25}}]}
    cfg.update(over)
    return cfg


def test_model_setting_beats_global_beats_default(models):
    cfg = load_config(_cfg(models, merge_method="ties", parameters={
        "weight": 0.1, "density": [{"filter": "mlp", "value": 0.3}], "lambda": 2}))
    b = cfg.bound()
    mlp, attn = "model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert b.model_params(0, mlp, 0.5)["weight"] == 0.5  # the model's own, over the global 0.1
    assert b.model_params(0, mlp, 0.5)["density"] == 0.3  # global conditional
    assert b.model_params(0, attn, 0.5)["density"] == 1.0  # no filter matched: the method's default
    assert b.global_params(mlp, 0.5) == {"lambda": 2.0, "normalize": True, "rescale": False, "int8_mask": False}
    assert isinstance(b.global_params(mlp, 0.5)["lambda"], float)
    override = load_config(_cfg(models, models=[
        {"model": str(models / "a"), "parameters": {"weight": [{"filter": "embed", "value": 2}]}},
        {"model": str(models / "b")}], parameters={"weight": 0.1})).bound()
    assert override.model_params(0, "model.embed_tokens.weight", 0)["weight"] == 2
    assert override.model_params(0, mlp, 0)["weight"] == 0.1  # model's filter missed: falls to the global
    assert override.model_params(1, mlp, 0)["weight"] == 0.1


def test_base_roles_follow_the_method(models):
    ta = load_config(_cfg(models, models=[{"model": str(models / "base")}, *_cfg(models)["models"]])).bound()
    assert ta.base == (models / "base").resolve() and len(ta.inputs) == 2  # listed base is the base, not a model
    lin = load_config(_cfg(models, merge_method="linear", parameters={"weight": 1})).bound()
    # linear gives the base no role: as in mergekit it is one more weighted input, appended
    assert lin.base is None and lin.inputs[-1] == (models / "base").resolve() and len(lin.inputs) == 3
    assert lin.donor == (models / "base").resolve()


def test_relative_paths_resolve_beside_the_yaml_file(models):
    (models / "merge.yaml").write_text(textwrap.dedent("""\
        merge_method: task_arithmetic
        base_model: base
        models:
          - model: a
            parameters: {weight: 1e-1}
        parameters:
          lambda: [0.5, 1]
        """))
    cfg = load_config(models / "merge.yaml")
    b = cfg.bound()
    assert b.inputs == [(models / "a").resolve()] and b.base == (models / "base").resolve()
    assert b.model_params(0, "x", 0)["weight"] == 0.1
    assert "lambda" in cfg.text and cfg.source.endswith("merge.yaml")


@pytest.mark.parametrize("change, match", [
    ({"slices": []}, r"slices: layer slicing"),
    ({"modules": {}}, r"modules: per-module"),
    ({"tokenizer": {"source": "base"}}, r"tokenizer: vocabulary surgery"),
    ({"merge_methd": "ties"}, r"merge_methd: unknown key \(did you mean 'merge_method'\?\)"),
    ({"tokenizer_source": "union"}, r"tokenizer_source: 'union'"),
    ({"chat_template": "chatml"}, r"chat_template: 'chatml' is not a Jinja template"),
    ({"dtype": "float8"}, r"dtype: unknown dtype 'float8'"),
    ({"out_dtype": 3}, r"out_dtype"),
    ({"merge_method": "nope"}, r"merge_method: unknown merge_method 'nope'"),
    ({"models": []}, r"models: at least one"),
    ({"parameters": {"normalize": 3}}, r"parameters.normalize: expected bool, got 3"),
    ({"parameters": {"lambda": "big"}}, r"parameters.lambda: expected float, got 'big'"),
    ({"parameters": {"lambda": []}}, r"parameters.lambda: an empty list"),
    ({"parameters": {"lambda": [{"filter": "x", "valeu": 1}]}}, r"parameters.lambda\[0\]: unknown key 'valeu'"),
    ({"parameters": {"densty": 0.5}}, r"parameters.densty: merge_method 'task_arithmetic' has no parameter "
                                      r"'densty' \(did you mean 'density'\?\)"),
])
def test_refused_by_name(models, change, match):
    with pytest.raises(GraftingError, match=match):
        load_config(_cfg(models, **change))


@pytest.mark.parametrize("entry, match", [
    ({"layer_range": [0, 2]}, r"models\[0\].layer_range: layer ranges"),
    ({"parameters": {"lambda": 2}}, r"models\[0\].parameters.lambda: 'lambda' is a global parameter"),
    ({"parameters": {"weight": {"value": "x"}}}, r"models\[0\].parameters.weight\[0\].value: expected float"),
    ({"model": "a+lora"}, r"models\[0\].model: 'a\+lora' is not a local path; model\+lora"),
    ({"model": {"model": "a", "lora": "l"}}, r"models\[0\].model.lora: LoRA references"),
    ({"model": {"model": {"path": "org/x", "revision": "main"}}}, r"models\[0\].model.model.revision"),
    ({"model": "org/missing@main"}, r"Hub revisions"),
    ({"model": "missing"}, r"models\[0\].model: model 'missing' not found"),
])
def test_model_entries_refused_by_name(models, entry, match):
    cfg = _cfg(models)
    cfg["models"][0] = {**cfg["models"][0], **entry}
    with pytest.raises(GraftingError, match=match):
        load_config(cfg)


def test_errors_name_the_file(models):
    (models / "bad.yaml").write_text(f"merge_method: ties\nmodels:\n  - model: a\n    parameters: {{weight: 1}}\n")
    with pytest.raises(GraftingError, match=r"bad.yaml: base_model: merge_method 'ties' needs a base_model"):
        load_config(models / "bad.yaml")
    (models / "bad2.yaml").write_text("merge_method: [")
    with pytest.raises(GraftingError, match="bad2.yaml: not valid YAML"):
        load_config(models / "bad2.yaml")
    (models / "bad3.yaml").write_text("merge_method: linear\n")
    with pytest.raises(GraftingError, match="bad3.yaml: models: Field required"):
        load_config(models / "bad3.yaml")


def test_structural_checks_before_any_tensor(models):
    with pytest.raises(GraftingError, match=r"parameter 'weight' is required .* model '.*b'"):
        load_config(_cfg(models, models=[{"model": str(models / "a"), "parameters": {"weight": 1}},
                                         {"model": str(models / "b")}]))
    with pytest.raises(GraftingError, match=r"models\[1\]: the same model as models\[0\]"):
        load_config(_cfg(models, models=[{"model": str(models / "a")}, {"model": str(models / "a")}],
                         parameters={"weight": 1}))
    with pytest.raises(GraftingError, match="tokenizer_source: 'base' needs a base_model"):
        load_config(_cfg(models, merge_method="linear", base_model=None, tokenizer_source="base"))
    with pytest.warns(UserWarning, match="parameters of the base model are not used"):
        load_config(_cfg(models, models=[{"model": str(models / "base"), "parameters": {"weight": 3}},
                                         {"model": str(models / "a"), "parameters": {"weight": 1}}]))


def test_model_counts_come_from_the_method(models):
    @merge_method("_pair_only_test", params=[WEIGHT, Param("mode", str, "x", "global")], needs_base=True,
                  paper="-", summary="-", min_models=1, max_models=1)
    def _pair(group, params):
        return group.base

    try:
        with pytest.raises(GraftingError, match=r"'_pair_only_test' takes exactly 1 models besides the base, got 2"):
            load_config(_cfg(models, merge_method="_pair_only_test"))
        ok = load_config(_cfg(models, merge_method="_pair_only_test", models=_cfg(models)["models"][:1],
                              parameters={"mode": 7})).bound()
        assert ok.global_params("x", 0) == {"mode": "7"}
    finally:
        merge_base._MERGES.pop("_pair_only_test", None)


def test_import_grafting_needs_no_pydantic_and_config_says_which_extra():
    code = textwrap.dedent("""
        import sys
        sys.modules["pydantic"] = None  # as if not installed
        import grafting, grafting.merge, grafting.merge.io, grafting.merge.run, grafting.cli.merge
        from grafting.merge import merge_methods
        merge_methods()
        from grafting.errors import GraftingError
        try:
            from grafting.merge.run import merge
            merge({"merge_method": "linear", "models": []}, "out")
        except GraftingError as e:
            print("ERR", e)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pydantic" in out.stdout and "pip install 'grafting[" in out.stdout
