"""Softmax onto the simplex, safe when every entry is masked (private module)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from convexmix._kernels import checks as native
from convexmix._validation import PLAIN, check_temperature, compute_dtype, prepare, traced
from convexmix.functional._csoftmax import constrained_softmax

__all__ = ["softmax", "softmax_inverse"]

#: Probability (relative to ``total``) that :func:`softmax_inverse` gives to zeros.
#: ``softmax`` can never output an exact zero; ``log(1e-12) ~ -27.6`` reproduces a
#: zero to 1e-12 and stays finite in every dtype.
SOFTMAX_ZERO_EPS = 1e-12


#: ``torch._safe_softmax`` (torch >= 2.5): one ATen op that gives zeros, with zero
#: gradients, for all--inf slices, at the cost of three more kernels than the softmax.
#: Dynamo cannot trace it, so compiled graphs use the composite form below (which
#: Inductor fuses anyway).
_SAFE_SOFTMAX = getattr(torch, "_safe_softmax", None)


def safe_softmax(z: Tensor, dim: int) -> Tensor:
    """``torch.softmax`` that returns zeros (and zero gradients) for all--inf slices, and
    shares the mass among the ``+inf`` entries of a slice that has any.

    ``z`` is already masked (-inf = absent) and in its compute dtype. In plain eager calls
    on the CPU this is ``torch.softmax`` and one look at its output: only a NaN there (an
    all--inf slice, or a NaN or +inf input) sends the call to the safe form, so the usual
    call costs a read of one entry per slice more than ``torch.softmax``, and its backward
    is the same.
    """
    if z.is_cpu and not traced():
        p = torch.softmax(z, dim)
        if not _any_nan(p, dim):
            return p
    # +inf -> the largest finite value: the +inf entries then share all the mass (ties
    # equally) instead of giving NaN. NaN stays NaN and fills its slice, as in torch.softmax.
    big = torch.finfo(z.dtype).max
    if _SAFE_SOFTMAX is not None and not torch.compiler.is_compiling():
        out: Tensor = _SAFE_SOFTMAX(z.clamp_max(big), dim)
        return out
    present = (z != -math.inf).any(dim, keepdim=True)  # NaN counts as present
    # -inf -> the lowest finite value *before* the softmax: an all--inf slice then gives a
    # finite softmax (and finite gradients) that the masked_fill zeroes.
    p = torch.softmax(torch.nan_to_num(z, nan=math.nan, posinf=big, neginf=-big), dim)
    return p.masked_fill(~present, 0.0)


#: The native scan of :func:`_any_nan`, per dtype (None: not available), found once.
_SCANS: dict[torch.dtype, Any] = {}


def _any_nan(p: Tensor, dim: int) -> bool:
    """Whether the softmax output ``p`` holds a NaN. A softmax slice is NaN everywhere or
    nowhere (each entry is divided by the slice's sum, which a NaN entry, a +inf entry or
    an all--inf slice makes NaN), so the native scan reads the first entry of each slice:
    one ctypes call, no reduction kernel, no read-back. Elsewhere, one sum."""
    dtype = p.dtype
    scan = _SCANS.get(dtype, False)
    if scan is False:
        scan = _SCANS[dtype] = native.first_nan(dtype)
    n = p.numel()
    if scan is None or n == 0 or p.__class__ not in PLAIN or not p.is_contiguous():
        return n > 0 and math.isnan(p.sum().item())
    shape = p.shape
    inner = 1 if dim == len(shape) - 1 else math.prod(shape[dim + 1 :])
    block = shape[dim] * inner
    return bool(scan(p.data_ptr(), n // block, block, inner))


def softmax(
    x: Tensor,
    dim: int = -1,
    *,
    temperature: float | Tensor = 1.0,
    mask: Tensor | None = None,
    total: float = 1.0,
    upper: float | Tensor | None = None,
) -> Tensor:
    r"""Softmax onto the simplex: :math:`p = \text{total}\cdot\exp(x/T) / \sum \exp(x/T)`.

    Entries with ``mask == False`` or ``x == -inf`` are absent: their output is exactly
    0 and the others are renormalised over the present ones. A slice with nothing
    present is all zeros, with zero (finite) gradients, where ``torch.softmax`` gives NaN.

    With ``upper``, the constrained softmax (Martins & Kreutzer, 2017):
    :math:`p_i = \min(u_i, c\,e^{x_i/T})` with :math:`c` such that the sum is ``total``,
    the KL projection of the softmax onto :math:`\{p \le u\}`. Exact (a sort by
    :math:`e^{x_i/T} / u_i` finds the capped set); the backward is the softmax Jacobian
    on the free entries and zero on the capped ones. ``sum(upper) < total`` over the
    present entries is a :class:`~convexmix.ConvexMixError`.

    Args:
        x: logits, any shape ``(..., K, ...)``.
        dim: the dimension that sums to ``total``.
        temperature: ``T > 0``, a float or a tensor broadcastable to ``x``.
        mask: bool, True = present, broadcastable to ``x``.
        total: the sum of each output slice, ``> 0``.
        upper: ``None`` (no cap), a float or a tensor ``>= 0`` broadcastable to ``x``.

    Returns:
        Tensor of the shape and dtype of ``x``; float16/bfloat16 are computed in float32.

    Example:
        >>> import torch, convexmix as cx
        >>> cx.functional.softmax(torch.tensor([0.0, 0.0, 0.0, 0.0]))
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
        >>> cx.functional.softmax(torch.zeros(3), mask=torch.tensor([True, False, True]), total=2.0)
        tensor([1., 0., 1.])
        >>> cx.functional.softmax(torch.zeros(2), mask=torch.tensor([False, False]))
        tensor([0., 0.])
        >>> cx.functional.softmax(torch.tensor([3.0, 1.0, 0.0]), upper=0.5)
        tensor([0.5000, 0.3655, 0.1345])
    """
    if temperature.__class__ is not float or temperature != 1.0:
        temperature = check_temperature(temperature)
    z, d, total = prepare(x, dim, mask, total)
    if temperature.__class__ is not float or temperature != 1.0:
        z = z / temperature  # -inf (absent) stays -inf
    if upper is not None:
        return constrained_softmax(z, d, total, upper).to(x.dtype)
    p = safe_softmax(z, d)
    if total != 1.0:
        p = p * total
    return p if p.dtype == x.dtype else p.to(x.dtype)


def softmax_inverse(
    p: Tensor, dim: int = -1, *, temperature: float | Tensor = 1.0, total: float = 1.0
) -> Tensor:
    """Right inverse of :func:`softmax`: ``T * log(p / total)``, zeros smoothed.

    Zeros become ``T * log(SOFTMAX_ZERO_EPS)`` so the result is finite;
    ``softmax(softmax_inverse(p)) == p`` to about 1e-12 per zero entry.
    """
    z = p.to(compute_dtype(p.dtype)) / total
    logits = torch.log(z.clamp_min(SOFTMAX_ZERO_EPS))
    return (logits * temperature).to(p.dtype)
