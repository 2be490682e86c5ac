r"""Bounds for the capped maps: coercion, checks and special values (private).

The capped maps (the Euclidean projection onto :math:`\{l \le p \le u, \sum p = t\}`
and the constrained softmax) share these steps, all on 2-D rows (the mapped dim last):

* :func:`as_bound`: a float or tensor bound as a tensor of the input's dtype and number
  of dims; a float beyond the dtype's range is the infinity of its sign;
* :func:`check_order` and :func:`check_sums`: ``lower <= upper``, ``lower < inf``,
  ``upper > -inf``, and the sums of the bounds over the present entries against the
  total (an infeasible slice is a :class:`~convexmix.ConvexMixError`);
* :func:`special_rows`: the special-value contract of every map. A slice with a NaN (in
  the input, or in a bound of a present entry) is all NaN; ``+inf`` entries take the
  mass up to their caps. As :math:`x_I \to \infty` the solution tends to one of two
  points: when the caps of the ``+inf`` entries ``I`` leave mass for the others
  (:math:`\sum_I u < t - \sum_J l`), the ``+inf`` entries sit at their caps and the
  others share the rest; otherwise the others sit at their lower bounds and the ``+inf``
  entries share the rest equally (up to their caps). Both are expressed by fixing
  entries (a bound set to the other) and giving the ``+inf`` entries a finite logit.

The checks run inside the maps' custom ops, on real values, so that ``torch.compile`` and
``torch.func.vmap`` raise the same errors as eager calls.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from convexmix._validation import broadcasts_to, is_number
from convexmix.errors import ConvexMixError, ConvexMixTypeError, ShapeError
from convexmix.functional._ops import vmap_batch

__all__ = ["as_bound", "check_order", "check_sums", "rows_of", "special_rows"]


def as_bound(value: float | Tensor | None, z: Tensor, name: str, default: float) -> Tensor:
    """A bound as a tensor of ``z``'s dtype and number of dims that broadcasts to ``z``."""
    if value is None:
        return torch.full((1,) * z.dim(), default, dtype=z.dtype, device=z.device)
    if isinstance(value, Tensor):
        if value.is_complex() or value.layout != torch.strided:
            raise ConvexMixTypeError(
                f"{name} must be a real dense tensor; got dtype {value.dtype}, "
                f"layout {value.layout}."
            )
        b = value.to(device=z.device, dtype=z.dtype)  # beyond the dtype's range: +-inf
        if b.dim() > z.dim() or not broadcasts_to(b.shape, z.shape):
            raise ShapeError(
                f"{name} of shape {tuple(value.shape)} does not broadcast to x of shape "
                f"{tuple(z.shape)}."
            )
        return b.reshape((1,) * (z.dim() - b.dim()) + tuple(b.shape))
    if not is_number(value):
        raise ConvexMixTypeError(
            f"{name} must be None, a number or a tensor; got {type(value).__name__}."
        )
    v = float(value)
    if math.isnan(v):
        raise ConvexMixError(f"{name} must not be NaN.")
    if abs(v) > torch.finfo(z.dtype).max:  # beyond the dtype's range: its infinity
        v = math.copysign(math.inf, v)
    return torch.full((1,) * z.dim(), v, dtype=z.dtype, device=z.device)


def rows_of(b: Tensor, shape: torch.Size, d: int) -> Tensor:
    """A bound (same ndim as x) as 2-D rows matching ``x.movedim(d, -1).reshape(-1, K)``:
    ``(1, 1)`` or ``(1, K)`` when it does not vary across rows, else ``(R, K|1)``."""
    bm = b.movedim(d, -1)
    kb = bm.shape[-1]
    if all(s == 1 for s in bm.shape[:-1]):
        return bm.reshape(1, kb)
    full = list(shape)
    full.pop(d)
    return bm.expand(*full, kb).reshape(-1, kb)


def check_order(z: Tensor, lo: Tensor, up: Tensor) -> None:
    """``lower <= upper``, ``lower < inf`` and ``upper > -inf`` at the present entries of
    the rows ``z`` (NaN aside; absent entries take no part)."""
    if not (bool((lo > up).any()) or bool((lo == math.inf).any()) or bool((up == -math.inf).any())):
        return  # the bounds alone (usually one value each) settle it
    present = z > -math.inf
    if bool(((lo > up) & present).any()):
        raise ConvexMixError("lower must be <= upper everywhere; got an entry with lower > upper.")
    if bool((((lo == math.inf) | (up == -math.inf)) & present).any()):
        raise ConvexMixError("lower must be < inf and upper > -inf.")


def check_sums(z: Tensor, lo: Tensor, up: Tensor, total: float, d: int) -> None:
    """Raise where a row of ``z`` (2-D, absent entries -inf) with present entries cannot
    meet its bounds: the sum of ``lower`` above ``total`` or of ``upper`` below it."""
    rows, k = z.shape
    if rows == 0 or k == 0:
        return
    present = z > -math.inf
    f64 = torch.float64
    lsum = torch.where(present, lo, 0.0).to(f64).sum(-1)
    usum = torch.where(present, up, 0.0).to(f64).sum(-1)
    any_present = present.any(-1)
    tol = 1e-12 * max(abs(total), 1.0) * k
    low_bad = any_present & (lsum > total + tol)
    up_bad = any_present & (usum < total - tol)
    if bool(low_bad.any()):
        idx = int(low_bad.nonzero()[0])
        raise ConvexMixError(
            f"infeasible bounds: the sum of lower ({float(lsum[idx]):.6g}) "
            f"exceeds total ({total:.6g}) in {_where(idx, rows, d)}."
        )
    if bool(up_bad.any()):
        idx = int(up_bad.nonzero()[0])
        raise ConvexMixError(
            f"infeasible bounds: the sum of upper ({float(usum[idx]):.6g}) "
            f"over the present entries is below total ({total:.6g}) in "
            f"{_where(idx, rows, d)}."
        )


def _where(idx: int, rows: int, d: int) -> str:
    """ "slice i along dim=d" as the caller wrote the call: under ``vmap`` the rows hold
    every example's slices (batch dims first) and ``d`` counts the batch dims."""
    levels, size = vmap_batch()
    if levels == 0:
        return f"slice {idx} along dim={d}"
    per = max(rows // max(size, 1), 1)
    return f"slice {idx % per} along dim={d - levels} (vmap example {idx // per})"


def special_rows(
    z: Tensor, lo: Tensor, up: Tensor, total: float
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(z, lower, upper, nan_rows)`` with the special values of the 2-D rows ``z``
    (absent entries -inf; bounds ``(1|R, 1|K)``) resolved as the module docstring says:
    rows with a NaN become a plain simplex problem whose output the caller fills with
    NaN (``nan_rows``, ``(R, 1)``), and ``+inf`` entries become finite with bounds that
    fix the limit's entries. ``nan_rows`` is None (and nothing changes) where there are
    no special values."""
    total_z = float(z.sum())  # one pass: NaN or +inf only with a NaN or a +inf (or overflow)
    if (total_z == total_z and total_z != math.inf) and not (
        bool(torch.isnan(lo).any()) or bool(torch.isnan(up).any())
    ):
        return z, lo, up, None
    present = z > -math.inf
    nan_in = torch.isnan(z) | ((torch.isnan(lo) | torch.isnan(up)) & present)
    pinf = z == math.inf
    if not bool((nan_in | pinf).any()):
        return z, lo, up, None
    shape = z.shape
    lo, up = lo.expand(shape), up.expand(shape)
    nan_rows = nan_in.any(-1, keepdim=True)
    z = torch.where(nan_rows, 0.0, z)
    lo = torch.where(nan_rows, 0.0, lo)
    up = torch.where(nan_rows, math.inf, up)
    pinf = z == math.inf
    present = z > -math.inf
    others = present & ~pinf
    cap_inf = torch.where(pinf, up, 0.0).to(torch.float64).sum(-1, keepdim=True)
    low_others = torch.where(others, lo, 0.0).to(torch.float64).sum(-1, keepdim=True)
    at_caps = pinf.any(-1, keepdim=True) & (cap_inf < total - low_others)
    lo = torch.where(at_caps & pinf, up, lo)  # the +inf entries at their caps
    up = torch.where(~at_caps & pinf.any(-1, keepdim=True) & others, lo, up)  # others at lower
    z = torch.where(pinf, 0.0, z)
    return z, lo, up, nan_rows
