r"""Sparse simplex maps: sparsemax, 1.5-entmax and alpha-entmax (private module).

All three are the regularised prediction

.. math:: p = \arg\max_{q \ge 0,\ \sum q = t} \langle q, x\rangle + H_\alpha(q),
          \qquad p = [(\alpha - 1)x - \tau]_+^{1/(\alpha-1)},

with :math:`H_\alpha` the Tsallis entropy and the threshold :math:`\tau` chosen so
that the output sums to ``total`` ``t``. For alpha = 2 this is the Euclidean
projection of x onto the simplex (sparsemax); alpha -> 1 recovers the softmax.

Each map's forward is a ``torch.library`` custom op registered by
:func:`~convexmix.functional._ops.register_map` (fake, vmap rule, autograd); its backward is
O(K) from the saved output, with no Jacobian; torch.func transforms work.
Thresholds are computed in float64 so that the sums stay exact to the output dtype even
at K = 1e5+.

sparsemax and 1.5-entmax run in two ways, with the same values up to the rounding of the
threshold's float64 sums: the native row kernel (``_kernels/rows.c``: no sort, the
threshold in closed form on the support with compensated sums; forward and eager
backward) for contiguous float32/float64 CPU inputs when the native kernels are built,
and the sort-based ATen code below for everything else (other devices, strided inputs,
no compiler, ``CONVEXMIX_NATIVE=0``) and for the backward under torch.compile and
torch.func.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from convexmix._kernels import rows as native
from convexmix._validation import (
    any_true,
    broadcasts_to,
    check_int,
    compute_dtype,
    is_number,
    prepare,
)
from convexmix.errors import ConvexMixError, ConvexMixTypeError, ShapeError
from convexmix.functional._capped import capped_projection
from convexmix.functional._ops import register_map
from convexmix.functional._projection import (
    SPARSEMAX,
    clamp_inf,
    finish,
    native_vjp,
    sorted_shifted,
    support_backward,
)
from convexmix.functional._softmax import softmax

__all__ = ["entmax", "entmax15", "entmax_inverse", "sparsemax"]


# ------------------------------------------------------------------------- sparsemax


def sparsemax(
    x: Tensor,
    dim: int = -1,
    *,
    mask: Tensor | None = None,
    total: float = 1.0,
    lower: float | Tensor | None = None,
    upper: float | Tensor | None = None,
) -> Tensor:
    r"""Sparsemax: the Euclidean projection of ``x`` onto the simplex that sums to ``total``.

    :math:`p = [x - \tau]_+` with :math:`\tau` such that :math:`\sum p = t` (Martins &
    Astudillo, 2016). Exact (sort-based), with exact zeros; the backward is O(K) from the
    output. Absent entries (``mask`` False or ``-inf``) are 0; an all-absent slice is zeros.
    With ``lower``/``upper`` it is the constrained sparsemax (Malaviya et al., 2018), the
    projection onto :math:`\{l \le p \le u, \sum p = t\}` of
    :func:`~convexmix.functional.project_simplex`.

    Args:
        x: scores, any shape; ``dim`` indexes the K entries.
        dim: the dimension that sums to ``total``.
        mask: bool, True = present, broadcastable to ``x``.
        total: the sum of each output slice, ``> 0``.
        lower: ``None`` (0), a float or a tensor broadcastable to ``x``.
        upper: ``None`` (no cap), a float or a tensor broadcastable to ``x``.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Example:
        >>> import torch, convexmix as cx
        >>> cx.functional.sparsemax(torch.tensor([1.0, 0.8, -1.0]))
        tensor([0.6000, 0.4000, 0.0000])
        >>> cx.functional.sparsemax(torch.tensor([0.2, 0.3, 0.5]))  # identity on the simplex
        tensor([0.2000, 0.3000, 0.5000])
        >>> cx.functional.sparsemax(torch.tensor([1.0, 0.8, -1.0]), upper=0.5)
        tensor([0.5000, 0.5000, 0.0000])
    """
    z, d, total = prepare(x, dim, mask, total)
    if lower is not None or upper is not None:
        out = capped_projection(z, d, total, lower, upper)
        return out if out.dtype == x.dtype else out.to(x.dtype)
    out = SPARSEMAX(z, d, total)
    return out if out.dtype == x.dtype else out.to(x.dtype)


# --------------------------------------------------------------------------- entmax15


def _entmax15_fwd(x: Tensor, dim: int, total: float) -> Tensor:
    out = native.rows_forward(x, dim, total, native.ENTMAX15)
    if out is not None:
        return out
    z = clamp_inf(x.movedim(dim, -1))
    k = z.shape[-1]
    if k == 0:
        return x.new_empty(x.shape)
    zs, shift, present = sorted_shifted(z)
    zs *= 0.5  # entmax15 works on x / 2; exact
    valid = zs > -math.inf
    zs.masked_fill_(~valid, 0.0)
    ks = torch.arange(1, k + 1, device=z.device, dtype=torch.float64)
    # For support size k: tau_k solves sum_{j<=k} (z_(j) - tau)^2 = t, i.e.
    # tau_k = mean_k - sqrt((t - ss_k) / k) with ss_k the squared deviations from mean_k.
    mean = zs.cumsum(-1).div_(ks)
    ss = (zs * zs).cumsum_(-1).sub_(ks * mean * mean)
    tau = mean.sub_(ss.neg_().add_(total).div_(ks).clamp_min_(0.0).sqrt_())
    kstar = ((tau <= zs) & valid).sum(-1, keepdim=True).clamp_(min=1)
    # Retake the support statistics pairwise (torch.sum) for an exact threshold.
    outside = ks > kstar
    m = zs.masked_fill(outside, 0.0).sum(-1, keepdim=True) / kstar
    dev = zs.sub_(m).masked_fill_(outside, 0.0)
    tau_star = m - ((total - (dev * dev).sum(-1, keepdim=True)) / kstar).clamp_min(0.0).sqrt()
    return finish(z, shift, 2 * tau_star, present, dim, square=True)


def _entmax15_vjp(ctx: Any, grad: Tensor) -> tuple[Tensor | None]:
    """The alpha-entmax VJP with ``g = sqrt(y)``."""
    (y,) = ctx.saved_tensors
    return (support_backward(y, grad, ctx.dim, 0.5) if ctx.needs_input_grad[0] else None,)


_entmax15_eager_vjp = native_vjp(native.ENTMAX15, _entmax15_vjp)


_ENTMAX15 = register_map("entmax15", _entmax15_fwd, _entmax15_vjp, eager_vjp=_entmax15_eager_vjp)


def entmax15(x: Tensor, dim: int = -1, *, mask: Tensor | None = None, total: float = 1.0) -> Tensor:
    r"""Exact 1.5-entmax: :math:`p = [x/2 - \tau]_+^2` with :math:`\sum p = t`.

    Sparse like sparsemax, smoother like softmax (Peters et al., 2019). Sort-based, exact;
    backward O(K) from the output. Absent entries (``mask`` False or ``-inf``) are 0.

    Args:
        x: scores, any shape; ``dim`` indexes the K entries.
        dim: the dimension that sums to ``total``.
        mask: bool, True = present, broadcastable to ``x``.
        total: the sum of each output slice, ``> 0``.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Example:
        >>> import torch, convexmix as cx
        >>> cx.functional.entmax15(torch.tensor([2.0, 1.0, -2.0]))
        tensor([0.8307, 0.1693, 0.0000])
    """
    z, d, total = prepare(x, dim, mask, total)
    out = _ENTMAX15(z, d, total)
    return out if out.dtype == x.dtype else out.to(x.dtype)


# ---------------------------------------------------------------- alpha-entmax (bisection)


def _entmax_fwd(x: Tensor, alpha: Tensor, dim: int, n_iter: int, total: float) -> Tensor:
    k = x.shape[dim]
    if k == 0:
        return x.new_empty(x.shape)
    z = clamp_inf(x.movedim(dim, -1).to(torch.float64))
    am1 = alpha.movedim(dim, -1).to(torch.float64) - 1.0
    inv = 1.0 / am1
    # Work relative to the row maximum, like the sort-based maps: x - max is exact near
    # the maximum (Sterbenz), so the result does not depend on a common shift of x.
    # NaN propagates through the max into the whole row.
    zmax = z.amax(-1, keepdim=True)
    present = zmax != -math.inf
    # In units of t^(alpha-1), so that the bracket is [-1, -K^(1-alpha)] whatever the total:
    # p(x, t) = t * p(x / t^(alpha-1), 1). t^(alpha-1) can overflow (t = 1e300, alpha = 3);
    # its inverse then rounds to the smallest positive float, which keeps -inf entries absent.
    f64 = torch.finfo(torch.float64)
    scale = (total ** (-am1)).clamp(f64.tiny, f64.max) if total != 1.0 else 1.0
    z = (z - torch.where(present, zmax, 0.0)) * (am1 * scale)
    # At tau = lo the largest entry alone gives 1; at tau = hi every entry is <= 1/K.
    lo = -torch.ones_like(am1)
    hi = -((1.0 / k) ** am1)
    for _ in range(n_iter):
        mid = lo + (hi - lo) * 0.5
        above = ((z - mid).clamp_min(0.0) ** inv).sum(-1, keepdim=True) >= 1.0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    p = (z - lo).clamp_min(0.0) ** inv
    p = p * (total / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny))
    p = p.masked_fill(~present, 0.0)
    return p.to(x.dtype).movedim(-1, dim).contiguous()


def _entmax_vjp(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Bisection alpha-entmax: the support VJP in x, the closed-form gradient in alpha."""
    y, alpha = ctx.saved_tensors
    dim = ctx.dim
    a = alpha.to(y.dtype)
    dx = support_backward(y, grad, dim, 2.0 - a) if ctx.needs_input_grad[0] else None
    dalpha = None
    if ctx.needs_input_grad[1]:
        # d p_j / d alpha = (p_j - t g^_j)/(a-1)^2 - (p_j log p_j - g^_j sum p log p)/(a-1),
        # g^ = p^(2-a) / sum p^(2-a), t = sum p; derived from p = [(a-1)x - tau]^(1/(a-1)).
        pos = y > 0
        g = torch.where(pos, y.clamp_min(0) ** (2.0 - a), 0.0)
        ghat = g / g.sum(dim, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
        s = torch.where(pos, y * torch.log(torch.where(pos, y, 1.0)), 0.0)
        ent = s.sum(dim, keepdim=True)
        tot = y.sum(dim, keepdim=True)
        dp = (y - tot * ghat) / (a - 1) ** 2 - (s - ghat * ent) / (a - 1)
        dalpha = (grad * dp).sum(dim, keepdim=True).sum_to_size(alpha.shape).to(alpha.dtype)
    return dx, dalpha


_ENTMAX = register_map(
    "entmax_bisect", _entmax_fwd, _entmax_vjp, n_diff=2, dim_arg=2, saved=(1,), n_tensors=2
)


def entmax(
    x: Tensor,
    alpha: float | Tensor,
    dim: int = -1,
    *,
    n_iter: int = 50,
    mask: Tensor | None = None,
    total: float = 1.0,
) -> Tensor:
    r"""alpha-entmax by bisection: :math:`p = [(\alpha-1)x - \tau]_+^{1/(\alpha-1)}`, sum ``total``.

    ``alpha = 2`` is sparsemax, ``alpha = 1.5`` is :func:`entmax15`, and ``alpha -> 1``
    approaches the softmax (``alpha == 1`` as a float calls :func:`softmax`). ``alpha``
    may be a learnable tensor: the gradient with respect to it is closed-form. The
    threshold is found by ``n_iter`` halvings of a bracket in float64 (50 halvings
    shrink it by 2^-50), then the output is renormalised to sum exactly to ``total``.

    Args:
        x: scores, any shape; ``dim`` indexes the K entries.
        alpha: a float >= 1 or a tensor > 1 that broadcasts to ``x`` with size 1 along
            ``dim`` (e.g. one alpha per row, shape ``(B, 1)``).
        dim: the dimension that sums to ``total``.
        n_iter: bisection steps, >= 1.
        mask: bool, True = present, broadcastable to ``x``.
        total: the sum of each output slice, ``> 0``.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Example:
        >>> import torch, convexmix as cx
        >>> x = torch.tensor([1.0, 0.8, -1.0])
        >>> cx.functional.entmax(x, alpha=2.0)  # sparsemax
        tensor([0.6000, 0.4000, 0.0000])
        >>> alpha = torch.tensor(1.3, requires_grad=True)
        >>> cx.functional.entmax(x, alpha)[0].backward()
        >>> bool(alpha.grad.isfinite())
        True
    """
    z, d, total = prepare(x, dim, mask, total)
    check_int(n_iter, "n_iter")

    if isinstance(alpha, Tensor):
        a = alpha
        if not a.is_floating_point():
            a = a.to(z.dtype)
        if any_true(a.detach() <= 1):
            raise ConvexMixError(
                "alpha must be > 1 (alpha = 1 is the softmax); got a tensor with entries <= 1."
            )
        target = list(x.shape)
        target[d] = 1
        if a.dim() > x.dim() or not broadcasts_to(a.shape, target):
            raise ShapeError(
                f"alpha of shape {tuple(a.shape)} must broadcast to {tuple(target)} "
                f"(the shape of x={tuple(x.shape)} with size 1 along dim={d})."
            )
        a = a.reshape((1,) * (x.dim() - a.dim()) + tuple(a.shape))
    else:
        if not is_number(alpha):
            raise ConvexMixTypeError(
                f"alpha must be a number or a tensor; got {type(alpha).__name__}."
            )
        if not (math.isfinite(alpha) and alpha >= 1):
            raise ConvexMixError(f"alpha must be finite and >= 1; got {alpha}.")
        if alpha == 1:
            return softmax(x, d, mask=mask, total=total)
        a = torch.full((1,) * x.dim(), float(alpha), dtype=z.dtype, device=x.device)
    out = _ENTMAX(z, a, d, n_iter, total)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def entmax_inverse(p: Tensor, alpha: float, *, total: float = 1.0) -> Tensor:
    r"""Exact right inverse of alpha-entmax: :math:`x = p^{\alpha-1}/(\alpha-1)` (tau = 0).

    ``entmax(entmax_inverse(p, a), a) == p`` for any ``p`` on the simplex that sums to
    ``total`` (zeros stay exact zeros); for alpha = 2 this is the identity.
    """
    del total  # the threshold is 0 whatever the total
    z = p.to(compute_dtype(p.dtype)).clamp_min(0)
    return (z ** (alpha - 1) / (alpha - 1)).to(p.dtype)
