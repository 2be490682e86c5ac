r"""The floor of the sparse maps and projections: the pieces they share (private).

sparsemax (the Euclidean projection onto the simplex, :math:`p = [x - \tau]_+`) as a
registered custom op, its sort-based ATen forward, the support's vector-Jacobian
product (also 1.5-entmax's and alpha-entmax's, with another power) and the helpers that
shift, clamp and finish a thresholded row. :mod:`._sparse`, :mod:`._project`,
:mod:`._capped` and :mod:`._bounded` build on it; it imports none of them.

The native kernels are resolved here, when the maps are imported: the loader takes a
lock the first time, which ``torch.compile(fullgraph=True)`` cannot trace, so resolving
it at import lets the first native call of a process happen inside a compiled function.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from convexmix._kernels import native, rows
from convexmix.functional._ops import Vjp, register_map

__all__ = [
    "SPARSEMAX",
    "clamp_inf",
    "finish",
    "native_vjp",
    "sorted_shifted",
    "sparsemax_eager_vjp",
    "sparsemax_sort",
    "sparsemax_vjp",
    "support_backward",
]

native.library()  # see the module docstring: never first inside a traced region


# --------------------------------------------------------------------------- helpers


def sorted_shifted(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows sorted in descending order, in float64, minus the row maximum; that maximum
    (0 for all--inf rows); and whether the row has any entry > -inf, all ``(..., 1)``
    but the first. Every support entry lies within ``total`` (sparsemax) or
    ``sqrt(total)`` (1.5-entmax) of the maximum, so shifted prefix sums over the support
    are O(1) and free of cancellation, even for logits of 1e4. The sort runs in the
    input dtype: only the order matters."""
    zs = torch.sort(z, dim=-1, descending=True).values.to(torch.float64)
    top = zs[..., :1]  # NaN sorts first: NaN for a row with a NaN
    # A NaN row counts as present: its shift is NaN, so its whole output is NaN.
    present = top != -math.inf
    shift = torch.where(present, top, 0.0)
    zs -= shift
    return zs, shift, present


def clamp_inf(z: Tensor) -> Tensor:
    """``+inf`` -> the largest finite value of the dtype: the ``+inf`` entries of a row then
    are its maximum and share all the mass (every other entry is at least ``total`` below
    them once shifted). NaN stays NaN."""
    return z.clamp_max(torch.finfo(z.dtype).max)


def finish(
    z: Tensor, shift: Tensor, tau: Tensor, present: Tensor, dim: int, square: bool
) -> Tensor:
    """``[z - shift - tau]_+`` (its square / 4 for 1.5-entmax, ``z`` unscaled) in float64,
    rounded once to ``z.dtype``; zeros for rows with nothing present. ``z - shift`` comes
    first: it is exact near the maximum (Sterbenz), where folding ``shift + tau`` into one
    offset would lose ulp(max) ~ 2e-12 at logits of 1e4."""
    out = z.new_empty(z.shape)  # of z's class too (a tensor subclass stays one)
    d = z - shift  # float64 (shift is float64)
    if square:
        d.sub_(tau).clamp_min_(0.0)
        torch.mul(d, d, out=out)
        out.mul_(0.25)  # exact: a power of two
    else:
        torch.sub(d, tau, out=out)  # rounded once to the output dtype
        out.clamp_min_(0.0)
    out.masked_fill_(~present, 0.0)
    return out.movedim(-1, dim).contiguous()


def support_backward(y: Tensor, grad: Tensor, dim: int, power: Tensor | float) -> Tensor:
    r"""Vector-Jacobian product of an alpha-entmax output ``y`` along ``dim``.

    With :math:`g = y^{2-\alpha}` on the support: :math:`dx = g \odot (dy - \langle g, dy\rangle
    / \sum g)`. ``power`` is ``2 - alpha`` (0 for sparsemax, where g is the support indicator).
    """
    tiny = torch.finfo(grad.dtype).tiny
    if isinstance(power, float) and power == 0.0:
        support = y > 0
        gd = torch.where(support, grad, 0.0)
        q = gd.sum(dim, keepdim=True) / support.sum(dim, keepdim=True).clamp_min(1)
        return gd.sub_(q).masked_fill_(~support, 0.0)
    if isinstance(power, float) and power == 0.5:
        g = y.to(grad.dtype).sqrt()
    else:
        g = torch.where(y > 0, y.clamp_min(0) ** power, 0.0).to(grad.dtype)
    gd = g * grad
    q = gd.sum(dim, keepdim=True) / g.sum(dim, keepdim=True).clamp_min(tiny)
    return gd.sub_(g * q)  # gd is fresh; g may be unbatched under vmap, so no g.mul_


# ------------------------------------------------------------------------- sparsemax


def _sparsemax_fwd(x: Tensor, dim: int, total: float) -> Tensor:
    out = rows.rows_forward(x, dim, total, rows.SPARSEMAX)
    return out if out is not None else sparsemax_sort(x, dim, total)


def sparsemax_sort(x: Tensor, dim: int, total: float) -> Tensor:
    """Sparsemax by sorting (ATen): the support from the sorted prefix sums, then the
    threshold from a pairwise sum over it."""
    z = clamp_inf(x.movedim(dim, -1))
    k = z.shape[-1]
    if k == 0:
        return x.new_empty(x.shape)
    zs, shift, present = sorted_shifted(z)
    cs = zs.cumsum(-1)
    ks = torch.arange(1, k + 1, device=z.device, dtype=torch.float64)
    # Entry k (1-based, sorted) is in the support iff t + k z_(k) > sum_{j<=k} z_(j).
    kstar = (torch.addcmul(cs.new_full((), total), ks, zs) > cs).sum(-1, keepdim=True)
    kstar.clamp_(min=1)
    # The prefix sums only locate the support; its sum is retaken pairwise (torch.sum),
    # which keeps the threshold exact to a few ulp at K = 1e5.
    tau = (zs.masked_fill_(ks > kstar, 0.0).sum(-1, keepdim=True) - total) / kstar
    return finish(z, shift, tau, present, dim, square=False)


def sparsemax_vjp(ctx: Any, grad: Tensor) -> tuple[Tensor | None]:
    """The sparsemax VJP (also the Euclidean projections'): the support's centred gradient."""
    (y,) = ctx.saved_tensors
    return (support_backward(y, grad, ctx.dim, 0.0) if ctx.needs_input_grad[0] else None,)


def native_vjp(kind: int, vjp: Vjp) -> Vjp:
    """``vjp`` run natively where the row kernel applies (not while a graph of the
    backward is recorded: ``create_graph=True`` needs differentiable ATen ops)."""

    def eager_vjp(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.needs_input_grad[0] and not torch.is_grad_enabled():
            (y,) = ctx.saved_tensors
            dx = rows.rows_backward(y, grad, ctx.dim, kind)
            if dx is not None:
                return (dx,)
        return vjp(ctx, grad)

    return eager_vjp


sparsemax_eager_vjp = native_vjp(rows.SPARSEMAX, sparsemax_vjp)


SPARSEMAX = register_map("sparsemax", _sparsemax_fwd, sparsemax_vjp, eager_vjp=sparsemax_eager_vjp)
