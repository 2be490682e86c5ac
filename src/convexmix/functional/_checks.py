"""Argument checks and dtype rules shared by every map (private)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from convexmix.errors import ConvexMixError, ShapeError

__all__: list[str] = []


def check_tensor(x: object, name: str = "x") -> Tensor:
    """Return ``x`` if it is a floating-point tensor, else raise a clear error."""
    if not isinstance(x, Tensor):
        raise ConvexMixError(f"{name} must be a torch.Tensor; got {type(x).__name__}.")
    if not x.is_floating_point():
        raise ConvexMixError(
            f"{name} must be a floating-point tensor; got dtype {x.dtype}. "
            f"Convert it first, e.g. {name}.float()."
        )
    if x.layout != torch.strided:
        raise ConvexMixError(
            f"{name} must be a dense (strided) tensor; got layout {x.layout}. "
            f"Convert it first, e.g. {name}.to_dense()."
        )
    return x


def normalize_dim(x: Tensor, dim: int, name: str = "x") -> int:
    """Return ``dim`` as a non-negative index into ``x.shape``."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ConvexMixError(f"dim must be an int; got {type(dim).__name__}.")
    ndim = x.dim()
    if ndim == 0:
        raise ShapeError(f"{name} must have at least one dimension; got a 0-d tensor.")
    if not -ndim <= dim < ndim:
        raise ShapeError(
            f"dim={dim} is out of range for {name} of shape {tuple(x.shape)} "
            f"(expected -{ndim} <= dim < {ndim})."
        )
    return dim % ndim


#: (smallest normal, largest finite) value of each floating dtype: the range of ``total``.
_RANGE = {
    dt: (torch.finfo(dt).tiny, torch.finfo(dt).max)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def check_total(total: float | Tensor, dtype: torch.dtype | None = None) -> float:
    """The sum of the output: a finite number > 0 that ``dtype`` (the output's) can hold,
    between its smallest normal and its largest finite value."""
    if total.__class__ is float and 0.0 < total < math.inf:  # the usual case, first
        if total == 1.0 or dtype is None:
            return total
        return _in_range(total, dtype)
    if isinstance(total, Tensor):
        if total.numel() != 1:
            raise ConvexMixError(
                f"total must be a positive number; got a tensor of {total.numel()}."
            )
        total = float(total.item())
    if isinstance(total, bool) or not isinstance(total, (int, float)):
        raise ConvexMixError(f"total must be a positive number; got {type(total).__name__}.")
    if not (math.isfinite(total) and total > 0):
        raise ConvexMixError(f"total must be finite and > 0; got {total}.")
    if dtype is not None and total != 1.0:
        return _in_range(float(total), dtype)
    return float(total)


def _in_range(total: float, dtype: torch.dtype) -> float:
    lo, hi = _RANGE.get(dtype, (0.0, math.inf))
    if not lo <= total <= hi:
        raise ConvexMixError(
            f"total={total:g} cannot be represented by the output dtype {dtype}: "
            f"expected {lo:.3g} <= total <= {hi:.3g}."
        )
    return total


def any_true(cond: Tensor) -> bool:
    """``bool(cond.any())`` in eager mode; False where values cannot be read (torch.compile
    tracing, torch.func transforms), so value checks never break those."""
    if torch.compiler.is_compiling():
        return False
    try:
        return bool(cond.any())
    except RuntimeError:  # vmap: data-dependent control flow is not allowed
        return False


def traced() -> bool:
    """Whether this call is traced by ``torch.compile`` or runs under a torch.func
    transform (grad, vmap, jacrev, ...): the cases that need convexmix's custom ops and
    setup_context Functions. Plain eager calls take leaner paths."""
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def check_temperature(temperature: float | Tensor) -> float | Tensor:
    """A temperature is a positive float or a positive tensor (checked eagerly)."""
    if isinstance(temperature, Tensor):
        if any_true(temperature <= 0):
            raise ConvexMixError("temperature must be > 0; got a tensor with entries <= 0.")
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ConvexMixError(f"temperature must be a number > 0; got {type(temperature).__name__}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConvexMixError(f"temperature must be finite and > 0; got {temperature}.")
    return float(temperature)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32; float32 and float64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target``."""
    try:
        out = torch.broadcast_shapes(tuple(shape), tuple(target))  # type: ignore[no-untyped-call]
    except RuntimeError:
        return False
    return bool(tuple(out) == tuple(target))


def apply_mask(z: Tensor, mask: Tensor | None, name: str = "x") -> Tensor:
    """Fill absent entries (mask False) with -inf; check that ``mask`` broadcasts to ``z``."""
    if mask is None:
        return z
    if not isinstance(mask, Tensor):
        raise ConvexMixError(
            f"mask must be a bool tensor (True = present); got {type(mask).__name__}."
        )
    if mask.dtype != torch.bool:
        raise ConvexMixError(
            f"mask must be a bool tensor (True = present); got dtype {mask.dtype}. "
            "Use mask.bool() or mask > 0."
        )
    if mask.shape != z.shape and not broadcasts_to(mask.shape, z.shape):
        raise ShapeError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to {name} of shape "
            f"{tuple(z.shape)}."
        )
    return torch.where(mask, z, -math.inf)  # one op (masked_fill(~mask) is two)


def prepare(x: Tensor, dim: int, mask: Tensor | None, total: float) -> tuple[Tensor, int, float]:
    """The common preamble of the maps: check ``x``, ``dim`` and ``total``; cast half
    precision to float32; fill absent entries with -inf. Returns ``(z, dim, total)``
    with ``dim`` non-negative."""
    check_tensor(x)
    d = normalize_dim(x, dim)
    dtype = x.dtype
    z = x if dtype == torch.float32 or dtype == torch.float64 else x.to(compute_dtype(dtype))
    if mask is not None:
        z = apply_mask(z, mask)
    return z, d, check_total(total, dtype)
