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

from convexmix._validation import is_number
from convexmix.errors import ConvexMixError, ConvexMixTypeError

__all__ = ["WeightsFile", "read_weights_file"]

#: The weights in the file must sum to 1 within this (they are written with 17 digits).
SUM_ATOL = 1e-6


@dataclass
class WeightsFile:
    weights: Tensor
    models: list[str]
    loss: float
    n_iter: int
    gap: float
    converged: bool
    map: str
    regularization: float
    method: str
    #: The trailing shape of one model's predictions, () or (C,), when recorded.
    sample_shape: tuple[int, ...] | None


def _number(value: Any, what: str, path: Path) -> float:
    if not is_number(value):
        raise ConvexMixTypeError(f"{path}: {what} must be a number; got {value!r}.")
    return float(value)


def read_weights_file(path: str | os.PathLike[str]) -> WeightsFile:
    """Parse and check the JSON; every failure names the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConvexMixError(f"{p}: no such file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConvexMixError(f"{p}: cannot read the weights file ({err}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConvexMixError(f"{p}: not a JSON file ({err}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("weights"), list):
        raise ConvexMixError(
            f"{p}: expected a JSON object with a 'weights' list (what `convexmix "
            "ensemble --out` writes)."
        )
    raw = data["weights"]
    if not raw:
        raise ConvexMixError(f"{p}: 'weights' is empty.")
    w = [_number(v, "every weight", p) for v in raw]
    if not all(math.isfinite(v) and v >= 0 for v in w) or abs(sum(w) - 1) > SUM_ATOL:
        raise ConvexMixError(
            f"{p}: the weights must be numbers >= 0 that sum to 1; got sum {sum(w):.9g}."
        )
    K = len(w)
    models = data.get("models", [f"model {k}" for k in range(K)])
    if not (
        isinstance(models, list) and len(models) == K and all(isinstance(m, str) for m in models)
    ):
        raise ConvexMixError(f"{p}: 'models' must be {K} names, one per weight.")
    losses = data.get("losses")
    loss = losses.get("convexmix", math.nan) if isinstance(losses, dict) else math.nan
    shape = data.get("sample_shape")
    if shape is not None and not (
        isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise ConvexMixError(f"{p}: 'sample_shape' must be a list of positive ints.")
    return WeightsFile(
        weights=torch.tensor(w, dtype=torch.float64),
        models=list(models),
        loss=_number(loss, "losses.convexmix", p),
        n_iter=int(data.get("n_iter", 0)),
        gap=_number(data.get("gap", math.nan), "gap", p),
        converged=bool(data.get("converged", True)),
        map=str(data.get("map", "softmax")),
        regularization=_number(data.get("regularization", 0.0), "regularization", p),
        method=str(data.get("method", "newton")),
        sample_shape=None if shape is None else tuple(shape),
    )
