"""The mergekit configuration subset that :func:`~convexmix.merge.merge_checkpoints`
reads (private): ``linear`` and ``task_arithmetic``, per-model weights, per-tensor
settings by name filter, per-layer gradients, ``dtype``.

A setting (``weight``, ``normalize``, ``lambda``) is, as in mergekit:

* a number (or a bool for ``normalize``);
* a *gradient*, a list of numbers interpolated over the depth of the network: a tensor of
  layer ``i`` of ``n`` sits at ``t = i / (n - 1)`` (``t = 1`` when ``n = 1``), tensors
  outside the layers at ``t = 0``; the value is the linear interpolation of the list at
  position ``t * (len - 1)``;
* a list of conditions ``{filter: STR, value: NUMBER | GRADIENT}``: the first whose
  ``filter`` occurs in the tensor's name (a substring; no filter or ``"*"`` matches
  every tensor) gives the value; when none matches, the setting is absent for that
  tensor and the next level applies (a model's own parameters, then the top-level
  ``parameters``, then the default).

A tensor's layer is the first dotted integer of its name (``model.layers.7.mlp...`` is
layer 7 of the stack ``model.layers``), and a stack has as many layers as its largest
index plus one.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convexmix._optional import require
from convexmix.errors import ConvexMixError

__all__: list[str] = []

METHODS = ("linear", "task_arithmetic")
TOP_KEYS = ("merge_method", "models", "base_model", "dtype", "out_dtype", "parameters")
MODEL_KEYS = ("model", "parameters")
#: the settings each method reads: top level / a model's own.
TOP_PARAMS = {
    "linear": ("weight", "normalize"),
    "task_arithmetic": ("weight", "normalize", "lambda"),
}
MODEL_PARAMS = ("weight",)
DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0},
}
DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
}

Setting = Any  # a number, a bool, a list of numbers, or a list of conditions


@dataclass
class Spec:
    """A checked configuration."""

    method: str
    models: list[str]
    model_params: list[dict[str, Setting]]
    base: str | None
    params: dict[str, Setting]
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    base_index: int | None = None  # the base's position in ``models``, if listed there
    origin: str = "config"
    extra: dict[str, Any] = field(default_factory=dict)


def _where(origin: str, key: str) -> str:
    return f"{origin}: {key}"


def _check_setting(value: object, where: str, *, flag: bool = False) -> Setting:
    """A setting of the subset, or an error naming ``where``."""
    if flag:
        if isinstance(value, bool):
            return value
        raise ConvexMixError(f"{where} must be true or false; got {value!r}.")
    if _is_number(value):
        return float(value)  # type: ignore[arg-type]
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        return [float(v) for v in value]
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        rules = []
        for i, cond in enumerate(value):
            unknown = [k for k in cond if k not in ("filter", "value")]
            if unknown:
                raise ConvexMixError(
                    f"{where}[{i}]: unsupported key {unknown[0]!r} (a condition has "
                    "'filter' and 'value')."
                )
            if "value" not in cond:
                raise ConvexMixError(f"{where}[{i}] has no 'value'.")
            filt = cond.get("filter")
            if filt is not None and not isinstance(filt, str):
                raise ConvexMixError(f"{where}[{i}].filter must be a string; got {filt!r}.")
            inner = _check_setting(cond["value"], f"{where}[{i}].value")
            if isinstance(inner, list) and inner and isinstance(inner[0], dict):
                raise ConvexMixError(f"{where}[{i}].value cannot hold conditions itself.")
            rules.append({"filter": filt, "value": inner})
        return rules
    raise ConvexMixError(
        f"{where} must be a number, a list of numbers (a gradient over the layers) or a "
        f"list of {{filter, value}} conditions; got {value!r}."
    )


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _dtype(value: object, where: str) -> torch.dtype | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in DTYPES:
        raise ConvexMixError(f"{where} must be one of {sorted(DTYPES)}; got {value!r}.")
    return DTYPES[value]


def _model_ref(value: object, where: str) -> str:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise ConvexMixError(
        f"{where} must be a path to a local safetensors checkpoint; got {value!r} "
        "(LoRA and nested model references are not supported)."
    )


def read_config(source: Mapping[str, Any] | str | os.PathLike[str]) -> Spec:
    """Check a configuration given as a mapping or a YAML file's path."""
    origin = "config"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ConvexMixError(f"{str(path)!r}: no such configuration file.")
        yaml = require("yaml", purpose="reading merge configurations (YAML)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConvexMixError(f"{path}: not valid YAML ({err}).") from None
        origin = str(path)
    else:
        data = source
    if not isinstance(data, Mapping):
        raise ConvexMixError(f"{origin}: a merge configuration is a mapping; got {data!r}.")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise ConvexMixError(
            f"{origin}: unsupported key {unknown[0]!r}; convexmix reads {list(TOP_KEYS)} "
            "(mergekit's linear and task_arithmetic subset)."
        )
    method = data.get("merge_method")
    if method not in METHODS:
        raise ConvexMixError(
            f"{_where(origin, 'merge_method')} must be one of {list(METHODS)}; got {method!r}."
        )
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConvexMixError(f"{_where(origin, 'models')} must be a non-empty list.")
    refs: list[str] = []
    model_params: list[dict[str, Setting]] = []
    for i, item in enumerate(models):
        where = f"{origin}: models[{i}]"
        if not isinstance(item, Mapping) or "model" not in item:
            raise ConvexMixError(f"{where} must be a mapping with a 'model' key; got {item!r}.")
        bad = [k for k in item if k not in MODEL_KEYS]
        if bad:
            raise ConvexMixError(f"{where}: unsupported key {bad[0]!r} (expected {MODEL_KEYS}).")
        refs.append(_model_ref(item["model"], f"{where}.model"))
        params = item.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ConvexMixError(f"{where}.parameters must be a mapping; got {params!r}.")
        for key in params:
            if key not in MODEL_PARAMS:
                hint = (
                    " (it belongs in the top-level parameters)" if key in TOP_PARAMS[method] else ""
                )
                raise ConvexMixError(
                    f"{where}.parameters: unsupported key {key!r} for {method}{hint}."
                )
        model_params.append(
            {k: _check_setting(v, f"{where}.parameters.{k}") for k, v in params.items()}
        )
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ConvexMixError(f"{_where(origin, 'parameters')} must be a mapping.")
    for key in params:
        if key not in TOP_PARAMS[method]:
            raise ConvexMixError(
                f"{origin}: parameters: unsupported key {key!r} for {method} (supported: "
                f"{list(TOP_PARAMS[method])})."
            )
    top = {
        k: _check_setting(v, f"{origin}: parameters.{k}", flag=(k == "normalize"))
        for k, v in params.items()
    }
    base = data.get("base_model")
    base_ref = None if base is None else _model_ref(base, f"{origin}: base_model")
    spec = Spec(
        method=str(method),
        models=refs,
        model_params=model_params,
        base=base_ref,
        params=top,
        dtype=_dtype(data.get("dtype"), f"{origin}: dtype"),
        out_dtype=_dtype(data.get("out_dtype"), f"{origin}: out_dtype"),
        origin=origin,
    )
    if base_ref is not None:
        same = [i for i, r in enumerate(refs) if _same_path(r, base_ref)]
        spec.base_index = same[0] if same else None
    if method == "task_arithmetic" and base_ref is None:
        raise ConvexMixError(f"{origin}: task_arithmetic needs base_model.")
    if method == "linear" and base_ref is not None and spec.base_index is None:
        raise ConvexMixError(
            f"{origin}: linear does not use base_model {base_ref!r} unless it is one of the "
            "models (with a weight); list it under models or remove base_model."
        )
    return spec


def _same_path(a: str, b: str) -> bool:
    return a == b or os.path.abspath(a) == os.path.abspath(b)


def evaluate(setting: Setting, name: str, t: float) -> Any:
    """The value of a setting for tensor ``name`` at depth ``t`` (None: no rule matched)."""
    if isinstance(setting, (bool, float)):
        return setting
    if setting and isinstance(setting[0], dict):
        for rule in setting:
            f = rule.get("filter")
            if f is None or f == "*" or f in name:
                return evaluate(rule["value"], name, t)
        return None
    position = t * (len(setting) - 1)
    lo = int(position)
    hi = min(len(setting) - 1, lo + 1)
    frac = position - lo
    return (1 - frac) * setting[lo] + frac * setting[hi]


_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def depths(names: Sequence[str]) -> dict[str, float]:
    """``t`` of every tensor: ``i / (n - 1)`` in its layer stack, 0 outside the layers."""
    found: dict[str, tuple[str, int]] = {}
    size: dict[str, int] = {}
    for name in names:
        m = _LAYER.search(name)
        if m is None:
            continue
        stack, index = name[: m.start()], int(m.group(1))
        found[name] = (stack, index)
        size[stack] = max(size.get(stack, 0), index + 1)
    out = {}
    for name in names:
        if name not in found:
            out[name] = 0.0
            continue
        stack, index = found[name]
        n = size[stack]
        out[name] = index / (n - 1) if n > 1 else 1.0
    return out


def _lookup(spec: Spec, key: str, model: int | None, name: str, t: float) -> Any:
    """A setting for a tensor: the model's own, then the top level, then the default."""
    if model is not None and key in spec.model_params[model]:
        value = evaluate(spec.model_params[model][key], name, t)
        if value is not None:
            return value
    if key in spec.params:
        value = evaluate(spec.params[key], name, t)
        if value is not None:
            return value
    return DEFAULTS[spec.method].get(key)


def coefficients(spec: Spec, name: str, t: float) -> list[float]:
    """The coefficients of one tensor's combination, in float64: one per model of
    ``spec.models`` (linear), or one per model and then the base (task arithmetic; a
    base listed among the models gets 0 there)."""
    weights = []
    for k in range(len(spec.models)):
        if spec.method == "task_arithmetic" and k == spec.base_index:
            weights.append(0.0)
            continue
        w = _lookup(spec, "weight", k, name, t)
        if w is None:
            raise ConvexMixError(
                f"{spec.origin}: no weight for models[{k}] ({spec.models[k]}) and tensor "
                f"{name!r}: no rule matches it and there is no default weight."
            )
        weights.append(float(w))
    normalize = _lookup(spec, "normalize", None, name, t)
    total = math.fsum(weights)
    if spec.method == "linear":
        if not normalize:
            return weights
        if total == 0:
            raise ConvexMixError(
                f"{spec.origin}: the weights of tensor {name!r} sum to 0, so normalize "
                "(the default of linear) would divide by 0; set normalize: false or "
                "change the weights."
            )
        return [w / total for w in weights]
    scale = float(_lookup(spec, "lambda", None, name, t))
    if normalize and abs(total) >= 1e-8:
        scale /= total
    coefs = [scale * w for w in weights]
    return [*coefs, 1.0 - math.fsum(coefs)]
