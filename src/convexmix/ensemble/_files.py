"""The blend-weights JSON that ``convexmix ensemble --out`` writes and :func:`load_weights`
reads (private): one format, written and read here."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from convexmix._validation import is_int, is_number
from convexmix.errors import ConvexMixError, ConvexMixTypeError
from convexmix.functional._registry import MAPS

__all__ = ["WeightsFile", "read_weights_file"]

#: The weights in the file must sum to 1 within this (they are written with 17 digits).
SUM_ATOL = 1e-6


@dataclass
class WeightsFile:
    weights: Tensor
    models: list[str]
    #: Whether ``models`` are the models' real names (file names, ``.npz`` keys,
    #: ``--names``) rather than placeholders ("model k") that only give an order.
    named: bool
    loss: float
    #: The loss the weights were fitted for ("log_loss", "mse"), when recorded.
    loss_name: str | None
    n_iter: int
    gap: float
    converged: bool
    map: str
    regularization: float
    method: str
    #: The trailing shape of one model's predictions, () or (C,), when recorded.
    sample_shape: tuple[int, ...] | None


def _placeholders(K: int) -> list[str]:
    return [f"model {k}" for k in range(K)]


class _Reader:
    """Typed access to the keys of the parsed JSON; each failure names the file and key."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.data, self.path = data, path

    def fail(self, key: str, expected: str, value: Any) -> ConvexMixError:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return ConvexMixTypeError(f"{self.path}: '{key}' must be {expected}; got {shown}.")

    def number(self, key: str, default: float, *, finite: bool = False) -> float:
        value = self.data.get(key, default)
        if value is None:
            return default
        if not is_number(value):
            raise self.fail(key, "a number", value)
        try:
            out = float(value)
        except OverflowError:
            raise self.fail(key, "a number in float range", value) from None
        if finite and not math.isfinite(out):
            raise self.fail(key, "a finite number", value)
        return out

    def count(self, key: str, default: int) -> int:
        value = self.data.get(key, default)
        if not (is_int(value) and 0 <= value < 2**63):
            raise self.fail(key, "an int >= 0", value)
        return int(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def text(self, key: str, default: str | None, choices: tuple[str, ...] = ()) -> str | None:
        value = self.data.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str) or (choices and value not in choices):
            expected = "a string" if not choices else "one of " + ", ".join(choices)
            raise self.fail(key, expected, value)
        return value


def _check_constraints(read: _Reader, w: list[float]) -> None:
    """The constraints the file records (``max_weight``, ``max_models``; null or absent:
    none) are valid, and its weights honour them: a file edited by hand must not carry a
    blend that its own fit would never give."""
    cap = read.data.get("max_weight")
    if cap is not None:
        if not (is_number(cap) and 0 < cap <= 1):  # NaN fails too
            raise read.fail("max_weight", "null or a number in (0, 1]", cap)
        if max(w) > cap + SUM_ATOL:
            raise ConvexMixError(
                f"{read.path}: the weights break the file's max_weight={cap:g} "
                f"(the largest is {max(w):.9g})."
            )
    k = read.data.get("max_models")
    if k is not None:
        if not (is_int(k) and k >= 1):
            raise read.fail("max_models", "null or an int >= 1", k)
        used = sum(v != 0 for v in w)
        if used > k:
            raise ConvexMixError(
                f"{read.path}: the weights break the file's max_models={k} ({used} non-zero)."
            )


def read_weights_file(path: str | os.PathLike[str]) -> WeightsFile:
    """Parse and check the JSON; every failure is a :class:`ConvexMixError` naming the
    file (and the key), whatever the file holds.

    Only ``weights`` is required. A file without ``models`` (or from an older convexmix
    whose names were all placeholders) records no names: ``named`` is False and the
    models are matched by position.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConvexMixError(f"{p}: no such file.") from None
    except IsADirectoryError:
        raise ConvexMixError(f"{p}: is a directory; expected a weights JSON file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConvexMixError(f"{p}: cannot read the weights file ({err}).") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        raise ConvexMixError(f"{p}: not a JSON file ({str(err)[:80]}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("weights"), list):
        raise ConvexMixError(
            f"{p}: expected a JSON object with a 'weights' list (what `convexmix "
            "ensemble --out` writes)."
        )
    raw = data["weights"]
    if not raw:
        raise ConvexMixError(f"{p}: 'weights' is empty.")
    read = _Reader(data, p)
    w = []
    for v in raw:
        if not is_number(v):
            raise read.fail("weights", "a list of numbers", v)
        try:
            w.append(float(v))
        except OverflowError:
            w.append(math.inf)
    if not all(math.isfinite(v) and v >= 0 for v in w) or abs(math.fsum(w) - 1) > SUM_ATOL:
        raise ConvexMixError(
            f"{p}: the weights must be numbers >= 0 that sum to 1; got sum {math.fsum(w):.9g}."
        )
    K = len(w)
    models = data.get("models")
    if models is None:
        names, named = _placeholders(K), False
    else:
        if not (
            isinstance(models, list)
            and len(models) == K
            and all(isinstance(m, str) and m.strip() for m in models)
        ):
            raise ConvexMixError(f"{p}: 'models' must be {K} names, one per weight.")
        if len(set(models)) != K:
            raise ConvexMixError(f"{p}: 'models' names a model twice.")
        names = list(models)
        named = read.flag("models_named", names != _placeholders(K))
    losses = data.get("losses", {})
    if not isinstance(losses, dict):
        raise read.fail("losses", "an object of numbers", losses)
    loss = _Reader(losses, p).number("convexmix", math.nan)
    shape = data.get("sample_shape")
    if shape is not None and not (
        isinstance(shape, list)
        and len(shape) <= 1
        and all(is_int(d) and 0 < d < 2**31 for d in shape)
    ):
        raise ConvexMixError(f"{p}: 'sample_shape' must be [] or [C] with C > 0.")
    regularization = read.number("regularization", 0.0, finite=True)
    if regularization < 0:
        raise read.fail("regularization", "a number >= 0", regularization)
    _check_constraints(read, w)
    return WeightsFile(
        weights=torch.tensor(w, dtype=torch.float64),
        models=names,
        named=named,
        loss=loss,
        loss_name=read.text("loss", None, ("log_loss", "mse")),
        n_iter=read.count("n_iter", 0),
        gap=read.number("gap", math.nan),
        converged=read.flag("converged", True),
        map=str(read.text("map", "softmax", tuple(sorted(MAPS)))),
        regularization=regularization,
        method=str(read.text("method", "newton")),
        sample_shape=None if shape is None else tuple(shape),
    )
