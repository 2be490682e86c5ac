"""The one validation layer: argument checks and dtype rules shared by the whole
package (private).

Maps, layers, parametrizations, optimizers and jobs check their arguments here: ints,
numbers, ``dim`` and ``total``; tensors and masks; whether a tensor lies on the simplex
(:func:`is_on_simplex`, with a tolerance that follows the dtype); and initial
probabilities (:func:`check_probabilities`). A wrong type raises
:class:`~convexmix.errors.ConvexMixTypeError`, a wrong value
:class:`~convexmix.errors.ConvexMixError` (both are ``ValueError``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeGuard

import torch
from torch import Tensor

from convexmix.errors import (
    ConvexMixError,
    ConvexMixTypeError,
    InvalidProbabilitiesError,
    ShapeError,
)

__all__: list[str] = []


# ----------------------------------------------------------------- ints and numbers


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an int (and not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is an int or a float (and not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(
    value: object, name: str, minimum: int | None = 1, *, optional: bool = False, note: str = ""
) -> int:
    """``value`` if it is an int ``>= minimum`` (any int when ``minimum`` is None); a
    :class:`ConvexMixTypeError` for another type, a :class:`ConvexMixError` when too small.
    ``optional`` says "None or" in the message (the caller handles None); ``note`` is
    added after the bound."""
    if is_int(value) and (minimum is None or value >= minimum):
        return value
    bound = "" if minimum is None else f" >= {minimum}"
    message = f"{name} must be {'None or ' if optional else ''}an int{bound}{note}; got {value!r}."
    if not is_int(value):
        raise ConvexMixTypeError(message)
    raise ConvexMixError(message)


def check_choice(value: object, choices: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ConvexMixError(f"{name} must be one of {list(choices)}; got {value!r}.")
    return value  # type: ignore[return-value]


#: The methods of :func:`~convexmix.functional.project_simplex`.
PROJECTION_METHODS = ("auto", "sort", "bisect", "condat")


def check_positive(value: object, name: str, *, optional: bool = False) -> float:
    """``value`` as a float if it is a finite number > 0; a :class:`ConvexMixTypeError` for
    another type, a :class:`ConvexMixError` for another value."""
    if not is_number(value):
        raise ConvexMixTypeError(
            f"{name} must be {'None or ' if optional else ''}a number > 0; "
            f"got {type(value).__name__}."
        )
    if not (math.isfinite(value) and value > 0):
        raise ConvexMixError(f"{name} must be finite and > 0; got {value}.")
    return float(value)


def check_bound(value: object, name: str) -> float | Tensor | None:
    """A bound as the maps take it: None, a number that is not NaN, or a real tensor;
    a :class:`ConvexMixTypeError` for another type (a string, a list)."""
    if value is None or (isinstance(value, Tensor) and not value.is_complex()):
        return value
    if not is_number(value):
        raise ConvexMixTypeError(
            f"{name} must be None, a number or a tensor; got {type(value).__name__}."
        )
    if math.isnan(value):
        raise ConvexMixError(f"{name} must not be NaN.")
    return value


def check_tensor(x: object, name: str = "x") -> Tensor:
    """Return ``x`` if it is a floating-point tensor, else raise a clear error."""
    if not isinstance(x, Tensor):
        raise ConvexMixTypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}.")
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


def check_dim(dim: object) -> int:
    """``dim`` if it is an int (its range is checked against a tensor by :func:`normalize_dim`)."""
    if not is_int(dim):
        raise ConvexMixTypeError(f"dim must be an int; got {type(dim).__name__}.")
    return dim


def normalize_dim(x: Tensor, dim: int, name: str = "x") -> int:
    """Return ``dim`` as a non-negative index into ``x.shape``."""
    if dim.__class__ is not int:  # the usual case costs one comparison
        check_dim(dim)
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
    if not is_number(total):
        raise ConvexMixTypeError(f"total must be a positive number; got {type(total).__name__}.")
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
    """Whether this call is traced by ``torch.compile``, runs under a torch.func transform
    (grad, vmap, jacrev, ...) or under a ``TorchDispatchMode`` (``make_fx``,
    ``FakeTensorMode``, ``FlopCounterMode``, ...): the cases that need convexmix's custom
    ops and setup_context Functions, where every op must be seen (no native kernel that
    reads memory behind the mode's back, no cached constant). Plain eager calls take
    leaner paths."""
    return (
        torch.compiler.is_compiling()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch._C._len_torch_dispatch_stack() > 0
    )


#: The tensor classes whose memory native kernels may read: a subclass (a wrapper such as
#: DTensor or FakeTensor has no memory of its own) runs ATen code, which it dispatches.
PLAIN = (Tensor, torch.nn.Parameter)


def plain(tensors: Sequence[Tensor]) -> bool:
    """Whether all of ``tensors`` are plain tensors (see :data:`PLAIN`)."""
    return all(t.__class__ in PLAIN for t in tensors)


def check_temperature(temperature: float | Tensor) -> float | Tensor:
    """A temperature is a positive float or a positive tensor (checked eagerly)."""
    if isinstance(temperature, Tensor):
        if any_true(temperature <= 0):
            raise ConvexMixError("temperature must be > 0; got a tensor with entries <= 0.")
        return temperature
    return check_positive(temperature, "temperature")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32; float32 and float64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target``: no more dims, and
    each trailing size 1 or equal. (``torch.broadcast_shapes`` would say the same, but its
    first call imports sympy through torch._refs: a second or more on a cold process.)"""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target), strict=False))


def apply_mask(z: Tensor, mask: Tensor | None, name: str = "x") -> Tensor:
    """Fill absent entries (mask False) with -inf; check that ``mask`` broadcasts to ``z``."""
    if mask is None:
        return z
    if not isinstance(mask, Tensor):
        raise ConvexMixTypeError(
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
    if z.numel() >= 1 << 20:
        return torch.where(mask, z, -math.inf)  # one op, a little faster when large
    # below, torch.where with a scalar runs 2x slower than masked_fill (CPU, fwd+bwd)
    return z.masked_fill(~mask, -math.inf)


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


# ------------------------------------------------------------------ the simplex


#: Initial probabilities typed by hand or rounded to a few digits may miss the total by
#: this much (relative, times sqrt(K)) whatever their dtype.
PROBABILITY_RTOL = 1e-6


def simplex_tolerance(dtype: torch.dtype, k: int, total: float) -> float:
    """How far from the simplex a tensor of ``dtype`` with ``k`` entries along the summed
    dim may be and still count as on it, relative to ``max(total, 1)``: ``64 sqrt(K)``
    ulps of the compute dtype (the rounding of a sum of K terms) plus ``4`` ulps of
    ``dtype`` itself (each entry rounded to it moves by at most half an ulp of itself, so
    the sum moves by at most half an ulp of the total: the term that matters for half
    precision)."""
    eps = 64 * math.sqrt(max(k, 1)) * torch.finfo(compute_dtype(dtype)).eps
    return (eps + 4 * torch.finfo(dtype).eps) * max(total, 1.0)


def is_on_simplex(p: Tensor, dim: int, total: float) -> bool:
    """Whether ``p`` has entries >= 0 summing to ``total`` along ``dim``, to the rounding
    of its dtype (:func:`simplex_tolerance`). NaN or inf entries are not on it."""
    d = normalize_dim(p, dim, "p")
    v = p.detach().to(compute_dtype(p.dtype))
    tol = simplex_tolerance(p.dtype, v.shape[d], total)
    return bool((v >= -tol).all()) and bool(((v.sum(d) - total).abs() <= tol).all())


def check_probabilities(
    p: Tensor, total: float = 1.0, name: str = "init", dtype: torch.dtype | None = None
) -> Tensor:
    """``p`` if it holds probabilities along its last dim: finite, >= 0 (not logits), each
    row summing to ``total`` within :func:`simplex_tolerance` of ``dtype`` (the values'
    dtype before any cast, default ``p``'s) or ``PROBABILITY_RTOL``, whichever is larger.
    Raises :class:`~convexmix.errors.InvalidProbabilitiesError`."""
    if not bool(p.isfinite().all()):
        raise InvalidProbabilitiesError(f"{name} must be finite probabilities; got {p.tolist()}.")
    if bool((p < 0).any()):
        raise InvalidProbabilitiesError(
            f"{name} takes probabilities (>= 0, summing to {total}), not logits; got {p.tolist()}."
        )
    k = p.shape[-1] if p.dim() else 1
    tol = max(
        simplex_tolerance(dtype or p.dtype, k, total),
        PROBABILITY_RTOL * math.sqrt(max(k, 1)) * max(total, 1.0),
    )
    sums = p.sum(-1)
    off = (sums - total).abs() > tol
    if bool(off.any()):
        raise InvalidProbabilitiesError(
            f"{name} probabilities must sum to {total}; "
            f"got sum {float(sums[off].flatten()[0]):.9g} for {p.tolist()}."
        )
    return p
