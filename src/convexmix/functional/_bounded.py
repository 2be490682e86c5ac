r"""The k-sparse simplex and the l1 ball (private module).

* The k-sparse simplex (Kyrillidis et al. 2013): the projection of the k largest entries
  onto the simplex, the others 0.
* The l1 ball: :math:`\mathrm{sign}(x)\,\Pi_{\Delta_r}(|x|)` outside it, ``x`` inside.

The capped simplex lives in :mod:`._capped` (the Euclidean projection) and
:mod:`._csoftmax` (the constrained softmax).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from convexmix._validation import check_int, prepare
from convexmix.errors import ConvexMixError
from convexmix.functional._ops import register_map
from convexmix.functional._project import project_simplex
from convexmix.functional._projection import SPARSEMAX, sparsemax_vjp

__all__ = ["project_l1_ball", "project_sparse_simplex"]


# ------------------------------------------------------------------ k-sparse simplex


def _ksparse_fwd(x: Tensor, dim: int, k: int, total: float) -> Tensor:
    z = x.movedim(dim, -1)
    vals, idx = torch.topk(z, k, dim=-1)
    proj = SPARSEMAX.op(vals, vals.dim() - 1, total)
    out = torch.zeros_like(z).scatter_(-1, idx, proj)
    # a NaN anywhere in a slice fills it (topk may leave it out of the support)
    out = out.masked_fill(torch.isnan(z).any(-1, keepdim=True), math.nan)
    return out.movedim(-1, dim).contiguous()


# The k-sparse projection's Jacobian is sparsemax's on the support.
_KSPARSE = register_map("project_sparse_simplex", _ksparse_fwd, sparsemax_vjp)


def project_sparse_simplex(x: Tensor, k: int, dim: int = -1, *, total: float = 1.0) -> Tensor:
    r"""Euclidean projection onto the k-sparse simplex {p >= 0, sum p = t, ||p||_0 <= k}.

    The projection keeps the ``k`` largest entries and projects them onto the simplex
    (Kyrillidis et al., 2013); the others are 0. Ties among the k-th largest are broken
    by ``torch.topk``. Differentiable: the sparsemax Jacobian on the support, O(K).

    Args:
        x: any shape; ``dim`` indexes the K entries.
        k: the most non-zeros per slice, an int >= 1 (``k >= K`` is :func:`project_simplex`).
        dim: the dimension that sums to ``total``.
        total: the sum, > 0.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Example:
        >>> import torch, convexmix as cx
        >>> cx.functional.project_sparse_simplex(torch.tensor([0.5, 0.4, 0.3, -1.0]), k=2)
        tensor([0.5500, 0.4500, 0.0000, 0.0000])
    """
    check_int(k, "k", note=" (the most non-zeros)")
    z, d, total = prepare(x, dim, None, total)
    kk = min(k, z.shape[d])
    if kk == 0:
        return x.clone()
    out = _KSPARSE(z, d, kk, total)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- l1 ball


def project_l1_ball(x: Tensor, dim: int = -1, *, radius: float = 1.0) -> Tensor:
    r"""Euclidean projection onto the l1 ball :math:`\{p : \|p\|_1 \le r\}` along ``dim``.

    Slices inside the ball are unchanged; the others are
    :math:`\mathrm{sign}(x)\,\Pi_{\Delta_r}(|x|)` (Duchi et al., 2008), with
    :math:`\Pi_{\Delta_r}` the projection onto the simplex of sum ``r``. Differentiable:
    the identity inside, the signed sparsemax Jacobian outside.

    Args:
        x: any shape; ``dim`` indexes the K entries.
        dim: the dimension of the l1 norm.
        radius: ``r > 0``.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Example:
        >>> import torch, convexmix as cx
        >>> cx.functional.project_l1_ball(torch.tensor([0.8, -0.6, 0.1]))
        tensor([ 0.6000, -0.4000,  0.0000])
        >>> cx.functional.project_l1_ball(torch.tensor([0.2, -0.3]))  # inside: unchanged
        tensor([ 0.2000, -0.3000])
    """
    try:
        z, d, r = prepare(x, dim, None, radius)
    except ConvexMixError as err:
        raise ConvexMixError(str(err).replace("total", "radius")) from None
    a = z.abs()
    inside = a.sum(d, keepdim=True) <= r
    proj = torch.sign(z) * project_simplex(a, d, total=r)
    return torch.where(inside, z, proj).to(x.dtype)
