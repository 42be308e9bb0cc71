"""Merge parameter settings: scalars, gradients and filtered branches, against mergekit's own evaluator."""

from __future__ import annotations

import pytest

from grafting.errors import GraftingError
from grafting.merge.settings import evaluate, parse_setting

SETTINGS = [
    0.3,
    [0.0, 1.0],
    [0.1, 0.9, 0.2, 0.7],
    ["1e-1", 2],  # PyYAML reads 1e-1 as a string; a numeric parameter takes it as a number
    {"filter": "mlp", "value": 0.8},
    [{"filter": "self_attn", "value": [0.2, 0.6]}, {"filter": "mlp", "value": 0.9}, {"value": 0.4}],
    [{"filter": "*", "value": 0.7}],
    [{"filter": "attn", "value": 0.1}],
]
NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight", "model.embed_tokens.weight"]


@pytest.mark.parametrize("raw", SETTINGS)
def test_settings_evaluate_as_mergekit_evaluates_them(raw):
    from mergekit.config import InputModelDefinition, evaluate_setting
    from pydantic import TypeAdapter

    theirs = InputModelDefinition.model_validate({"model": "m", "parameters": {"p": raw}}).parameters["p"]
    ours = parse_setting(raw, float, "p")
    for name in NAMES:
        for t in (0.0, 0.2, 1 / 3, 0.5, 0.9, 1.0):
            expected = evaluate_setting(name, theirs, t, validate=TypeAdapter(float).validate_python)
            got = evaluate(ours, name, t, float)
            assert got == pytest.approx(expected, abs=1e-12) if expected is not None else got is None, (raw, name, t)


def test_discrete_gradients_select_instead_of_interpolating():
    s = parse_setting([True, False, True], bool, "p")
    assert [evaluate(s, "x", t, bool) for t in (0.0, 0.4, 0.5, 0.99, 1.0)] == [True, True, False, False, True]


def test_bad_settings_name_where_they_are():
    with pytest.raises(GraftingError, match=r"p\[1\]: expected float, got 'x'"):
        parse_setting([0.1, "x"], float, "p")
    with pytest.raises(GraftingError, match=r"p\[0\]: unknown key 'filtre'"):
        parse_setting([{"filtre": "mlp", "value": 1.0}], float, "p")
    with pytest.raises(GraftingError, match="an empty list has no value"):
        parse_setting([], float, "p")
