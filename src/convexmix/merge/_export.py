"""What a :class:`~convexmix.merge.LearnedMerge` learned, as a mergekit configuration
(private): per-model weights, per-module filter rules, task arithmetic with the scale
folded into the weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from convexmix.errors import ConvexMixError
from convexmix.merge._config import evaluate

__all__: list[str] = []

Rules = float | list[dict[str, object]]


def _verify(setting: Rules, values: dict[str, float]) -> bool:
    """Whether ``setting`` gives every tensor its value (mergekit's first-match rule)."""
    return all(evaluate(setting, name, 0.0) == v for name, v in values.items())


def _full_rules(values: dict[str, float]) -> list[dict[str, object]]:
    """One rule per tensor, by its full name, longest first: a name can only occur in a
    name at least as long, so the first rule that matches a tensor is its own."""
    names = sorted(values, key=lambda n: (-len(n), n))
    return [{"filter": n, "value": values[n]} for n in names]


def weight_setting(values: dict[str, float], compact: Sequence[tuple[str | None, float]]) -> Rules:
    """The ``weight`` setting of one model: a number when every tensor has the same
    value; else ``compact`` rules (``(filter, value)``, None for a catch-all) sorted so
    that longer filters come first, when they give every tensor its value; else one rule
    per tensor."""
    distinct = set(values.values())
    if len(distinct) == 1:
        return next(iter(distinct))
    ordered = sorted(
        (r for r in compact if r[0] is not None), key=lambda r: (-len(r[0] or ""), r[0])
    )
    rules: list[dict[str, object]] = [{"filter": f, "value": v} for f, v in ordered]
    rules += [{"value": v} for f, v in compact if f is None]
    if rules and _verify(rules, values):
        return rules
    return _full_rules(values)


def tensor_values(
    coef: list[list[float]],
    param_names: Sequence[str],
    group_of: Sequence[int],
    modules: Sequence[str] | None,
    aliases: Mapping[str, str],
    buffers: Sequence[tuple[str, bool]],
    policy: str,
) -> tuple[list[dict[str, float]], list[list[tuple[str | None, float]]]]:
    """Every tensor's coefficient per model, and the compact rules that should give them.

    Args:
        coef: (G, K) coefficients (G = 1 for one global row).
        param_names: the merged tensors; ``group_of[i]`` is tensor i's row.
        modules: the group names of a per-module merge (its rules are ``"module."``
            filters), None otherwise (global: one catch-all; per tensor: full names).
        aliases: tied second names -> first names.
        buffers: (name, is floating) of the merge's buffers.
        policy: "first" (model 0's) or "mean" (the models' mean of floating buffers).
    """
    K = len(coef[0])
    values: list[dict[str, float]] = [{} for _ in range(K)]
    for i, name in enumerate(param_names):
        row = coef[group_of[i] if len(coef) > 1 else 0]
        for k in range(K):
            values[k][name] = float(row[k])
    for alias, name in aliases.items():
        for k in range(K):
            values[k][alias] = values[k][name]
    for name, floating in buffers:
        mean = policy == "mean" and floating
        for k in range(K):
            values[k][name] = 1.0 / K if mean else float(k == 0)
    others = [n for n in values[0] if n not in set(param_names)]
    compact: list[list[tuple[str | None, float]]] = [[] for _ in range(K)]
    for k in range(K):
        if len(coef) == 1:
            compact[k] = [(n, values[k][n]) for n in others] + [(None, float(coef[0][k]))]
        elif modules is not None:
            rules: list[tuple[str | None, float]] = [
                (g + ".", float(coef[j][k])) for j, g in enumerate(modules) if g
            ]
            loose = others + [n for n in param_names if "." not in n]
            compact[k] = rules + [(n, values[k][n]) for n in loose]
    return values, compact


def learned_config(
    *,
    models: Sequence[str],
    base: str | None,
    values: list[dict[str, float]],
    compact: list[list[tuple[str | None, float]]],
    dtype: str | None,
) -> dict[str, object]:
    """The configuration: ``values[k]`` maps every tensor name to model k's coefficient;
    with ``base`` it is task arithmetic (``lambda: 1``, the scale already folded in)."""
    if len(models) != len(values):
        raise ConvexMixError(
            f"models must name the {len(values)} checkpoints of the ingredients, in order; "
            f"got {len(models)} path(s)."
        )
    entries = [
        {"model": str(m), "parameters": {"weight": weight_setting(v, c)}}
        for m, v, c in zip(models, values, compact, strict=True)
    ]
    config: dict[str, object] = {
        "merge_method": "linear" if base is None else "task_arithmetic",
        "models": entries,
    }
    if base is not None:
        config["base_model"] = str(base)
        config["parameters"] = {"normalize": False, "lambda": 1.0}
    else:
        config["parameters"] = {"normalize": False}
    if dtype is not None:
        config["dtype"] = dtype
    return config
