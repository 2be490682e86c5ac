"""The mergekit configuration subset: settings (numbers, gradients, filter rules), layer
depths, coefficients, and an error that names every key outside the subset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import convexmix as cx
from convexmix.merge._config import coefficients, depths, evaluate, read_config

finite = st.floats(-10, 10, allow_nan=False)


@given(st.lists(finite, min_size=1, max_size=8), st.floats(0, 1))
def test_gradients_interpolate_linearly_over_depth(values: list[float], t: float) -> None:
    got = evaluate(values, "any.name", t)
    ref = float(np.interp(t * (len(values) - 1), np.arange(len(values)), values))
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_filters_take_the_first_rule_whose_text_occurs_in_the_name() -> None:
    rules = [
        {"filter": "mlp", "value": 1.0},
        {"filter": "layers.1.", "value": [2.0, 4.0]},
        {"filter": "*", "value": 3.0},
    ]
    assert evaluate(rules, "model.layers.1.mlp.weight", 0.5) == 1.0
    assert evaluate(rules, "model.layers.1.attn.weight", 0.5) == 3.0
    assert evaluate(rules, "model.norm.weight", 0.0) == 3.0
    assert evaluate(rules[:2], "model.norm.weight", 0.0) is None  # no rule: absent
    assert evaluate([{"filter": None, "value": 5.0}], "x", 0.0) == 5.0


def test_depths_follow_the_layer_stacks() -> None:
    names = [
        "model.embed.weight",
        *[f"model.layers.{i}.w" for i in range(5)],
        "enc.block.0.w",
        "enc.block.1.w",
        "solo.0.w",
        "0.weight",
        "3.weight",
    ]
    t = depths(names)
    assert t["model.embed.weight"] == 0.0
    assert [t[f"model.layers.{i}.w"] for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (t["enc.block.0.w"], t["enc.block.1.w"]) == (0.0, 1.0)
    assert t["solo.0.w"] == 1.0  # a stack of one layer sits at t = 1, as in mergekit
    assert (t["0.weight"], t["3.weight"]) == (0.0, 1.0)


def spec(**kw: Any) -> dict[str, Any]:
    base = {
        "merge_method": "linear",
        "models": [
            {"model": "a", "parameters": {"weight": 1.0}},
            {"model": "b", "parameters": {"weight": 3.0}},
        ],
    }
    return {**base, **kw}


def test_coefficients() -> None:
    assert coefficients(read_config(spec()), "w", 0.0) == [0.25, 0.75]
    raw = read_config(spec(parameters={"normalize": False}))
    assert coefficients(raw, "w", 0.0) == [1.0, 3.0]
    ta = read_config(
        spec(merge_method="task_arithmetic", base_model="c", parameters={"lambda": 0.5})
    )
    assert coefficients(ta, "w", 0.0) == [0.5, 1.5, -1.0]  # models, then the base
    listed = spec(merge_method="task_arithmetic", base_model="a")
    assert coefficients(read_config(listed), "w", 0.0) == [0.0, 3.0, -2.0]
    norm = spec(merge_method="task_arithmetic", base_model="c", parameters={"normalize": True})
    assert coefficients(read_config(norm), "w", 0.0) == [0.25, 0.75, 0.0]
    fallback = spec(
        models=[
            {"model": "a", "parameters": {"weight": [{"filter": "x", "value": 2.0}]}},
            {"model": "b"},
        ],
        parameters={"weight": 1.0, "normalize": False},
    )
    assert coefficients(read_config(fallback), "x.w", 0.0) == [2.0, 1.0]
    assert coefficients(read_config(fallback), "y.w", 0.0) == [1.0, 1.0]  # top level


def test_yaml_file(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "c.yml"
    path.write_text(
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: a\n"
        "    parameters:\n      weight: [0, 1]\nparameters:\n  lambda: 2\ndtype: bfloat16\n"
    )
    got = read_config(path)
    assert (got.method, got.models, got.base) == ("task_arithmetic", ["a"], "base")
    assert coefficients(got, "layers.1.w", 1.0) == [2.0, -1.0]
    path.write_text("merge_method: [unclosed\n")
    with pytest.raises(cx.ConvexMixError, match="not valid YAML"):
        read_config(path)
    with pytest.raises(cx.ConvexMixError, match="no such configuration file"):
        read_config(tmp_path / "missing.yml")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"slices": []}, "unsupported key 'slices'"),
        ({"tokenizer_source": "base"}, "unsupported key 'tokenizer_source'"),
        ({"merge_method": "ties"}, r"merge_method must be one of \['linear', 'task_arithmetic'\]"),
        ({"models": []}, "models must be a non-empty list"),
        ({"models": [{"model": "a", "lora": "x"}]}, r"models\[0\]: unsupported key 'lora'"),
        ({"models": [{"model": {"path": "a"}}]}, r"models\[0\]\.model must be a path"),
        ({"models": [{"model": "a", "parameters": {"density": 0.5}}]}, "unsupported key 'density'"),
        (
            {"models": [{"model": "a", "parameters": {"normalize": True}}]},
            "belongs in the top-level",
        ),
        ({"parameters": {"lambda": 2.0}}, "unsupported key 'lambda' for linear"),
        ({"parameters": {"int8_mask": True}}, "unsupported key 'int8_mask'"),
        ({"parameters": {"normalize": 1}}, "normalize must be true or false"),
        ({"models": [{"model": "a", "parameters": {"weight": "1"}}]}, "weight must be a number"),
        (
            {"models": [{"model": "a", "parameters": {"weight": float("nan")}}]},
            "weight must be a number",
        ),
        ({"models": [{"model": "a", "parameters": {"weight": []}}]}, "weight must be a number"),
        (
            {"models": [{"model": "a", "parameters": {"weight": {"filter": "x", "value": 1}}}]},
            "weight must be a number",
        ),
        (
            {"models": [{"model": "a", "parameters": {"weight": [{"filter": "x", "val": 1}]}}]},
            r"weight\[0\]: unsupported key 'val'",
        ),
        (
            {"models": [{"model": "a", "parameters": {"weight": [{"filter": 3, "value": 1}]}}]},
            r"filter must be a string",
        ),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"out_dtype": "float8"}, "out_dtype must be one of"),
        ({"base_model": "z"}, "linear does not use base_model 'z'"),
        ({"merge_method": "task_arithmetic"}, "task_arithmetic needs base_model"),
    ],
)
def test_everything_outside_the_subset_is_an_error_naming_the_key(
    change: dict[str, Any], match: str
) -> None:
    with pytest.raises(cx.ConvexMixError, match=match):
        read_config(spec(**change))


def test_weights_missing_or_summing_to_zero_name_the_tensor() -> None:
    rules = spec(
        models=[{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 1.0}]}}]
    )
    with pytest.raises(
        cx.ConvexMixError, match=r"no weight for models\[0\] \(a\) and tensor 'attn\.w'"
    ):
        coefficients(read_config(rules), "attn.w", 0.0)
    zero = spec(
        models=[
            {"model": "a", "parameters": {"weight": 1.0}},
            {"model": "b", "parameters": {"weight": -1.0}},
        ]
    )
    with pytest.raises(cx.ConvexMixError, match="tensor 'w' sum to 0"):
        coefficients(read_config(zero), "w", 0.0)
