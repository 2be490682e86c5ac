"""Reading what a data-mixing step is given (private): domain names, per-domain values
from a mapping or a vector, counts, and the options' numbers; each failure a
:class:`~convexmix.ConvexMixError` that says what was expected."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import cast

import torch
from torch import Tensor

from convexmix.errors import ConvexMixError, ConvexMixTypeError, ShapeError

__all__ = [
    "MAPPINGS",
    "domain_names",
    "positive_float",
    "read_values",
    "scalar",
    "unit_float",
    "valid_counts",
]

_F64 = torch.float64
# tensor dtypes whose values are float64 values: ``tolist`` gives them without a conversion
_EXACT = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
MAPPINGS = (dict, Mapping)  # dict first: the common case, and a fast check


def read_values(
    values: object, what: str, domains: list[Hashable], index: dict[Hashable, int]
) -> list[float | None]:
    """K floats in ``domains`` order from a mapping (None for a domain it omits) or a
    (K,) vector (every domain given)."""
    k = len(domains)
    if isinstance(values, MAPPINGS):
        out: list[float | None] = [None] * k
        for name, v in values.items():
            i = index.get(name)
            if i is None:
                raise ConvexMixError(
                    f"{what} names an unknown domain {name!r}; the domains are {domains}."
                )
            out[i] = (
                v if type(v) is float else float(v) if type(v) is int else scalar(v, what, name)
            )
        return out
    if isinstance(values, Tensor):
        if values.shape != (k,):
            raise ShapeError(
                f"{what} must have shape ({k},) (one per domain); got {tuple(values.shape)}."
            )
        if values.dtype in _EXACT:  # floats that float64 holds exactly: no conversion
            return values.tolist()
        return values.detach().to("cpu", _F64).tolist()
    if isinstance(values, Sequence) and not isinstance(values, str):
        vals: list[float | None] = [scalar(v, what, i) for i, v in enumerate(values)]
        if len(vals) != k:
            raise ShapeError(f"{what} must have {k} values (one per domain); got {len(vals)}.")
        return vals
    raise ConvexMixTypeError(
        f"{what} must be a mapping {{domain: value}} or a ({k},) tensor; "
        f"got {type(values).__name__}."
    )


def valid_counts(cnt: list[float | None]) -> bool:
    """Whether every count given is in [0, inf) (a None is a domain without one)."""
    if None in cnt:
        return all(v is None or 0.0 <= v < math.inf for v in cnt)
    # in C: the smallest and the largest; the sum is NaN exactly when a count is NaN
    vals = cast("list[float]", cnt)
    total = sum(vals)
    return min(vals) >= 0.0 and max(vals) < math.inf and total == total


def domain_names(domains: Sequence[Hashable] | int) -> list[Hashable]:
    if isinstance(domains, bool):
        raise ConvexMixTypeError(f"domains must be names or a count; got {domains!r}.")
    if isinstance(domains, int):
        if domains < 1:
            raise ConvexMixError(f"the number of domains must be >= 1; got {domains}.")
        return list(range(domains))
    if isinstance(domains, str) or not isinstance(domains, Sequence | Mapping):
        raise ConvexMixTypeError(
            f"domains must be a sequence of names or a count; got {type(domains).__name__}."
        )
    names = list(domains)
    if not names:
        raise ConvexMixError("domains must name at least one domain; got none.")
    try:
        unique = len(set(names)) == len(names)
    except TypeError as err:
        raise ConvexMixTypeError(f"domain names must be hashable; got {names!r}.") from err
    if not unique:
        raise ConvexMixError(f"domain names must be unique; got {names}.")
    return names


def scalar(v: object, what: str, name: object) -> float:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ShapeError(f"{what}[{name!r}] must be a scalar; got shape {tuple(v.shape)}.")
        return float(v.detach().reshape(()).item())
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ConvexMixTypeError(f"{what}[{name!r}] must be a number; got {v!r}.") from err


def positive_float(x: object, name: str) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ConvexMixTypeError(f"{name} must be a number; got {x!r}.") from err
    if not (math.isfinite(v) and v > 0):
        raise ConvexMixError(f"{name} must be finite and > 0; got {x!r}.")
    return v


def unit_float(x: object, name: str) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ConvexMixTypeError(f"{name} must be a number; got {x!r}.") from err
    if not 0.0 <= v <= 1.0:
        raise ConvexMixError(f"{name} must be in [0, 1]; got {x!r}.")
    return v
