r"""The constrained softmax: the KL projection of the softmax onto the capped simplex
(private).

:math:`p_i = \min(u_i, c\,e^{x_i})` with :math:`c` such that :math:`\sum p = t` (Martins &
Kreutzer, 2017), for ``softmax(..., upper=)``. The entries are capped in the order of
:math:`x_i - \log u_i`, so the capped set is a prefix of that order: with the first
``j`` capped, :math:`c_j = (t - U_j) / S_j` (``U_j`` their caps, ``S_j`` the exponentials
of the rest) and the solution has the smallest ``j`` whose next entry is not capped.
Everything runs in float64 and in log space (``log c_j + x_(j) <= log u_(j)``, the rest's
``logsumexp`` from a reversed ``logcumsumexp``), so that no exponential underflows: a cap
on an entry far above the others (logits of 1e3, or a temperature of 1e-3) leaves the
others their share of the mass.

Special values follow the maps' contract (:mod:`._bounds`): a NaN (in ``x``, or in the
cap of a present entry) fills its slice; ``+inf`` entries take the mass up to their
caps (at their caps, the others sharing the rest as a constrained softmax, when the caps
leave mass over; otherwise they share all of it equally, up to their caps, and the
others get 0). The checks run inside the custom op, so ``torch.compile`` and
``torch.func.vmap`` raise the errors of eager calls.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from convexmix.errors import ConvexMixError
from convexmix.functional._bounds import as_bound, check_sums
from convexmix.functional._ops import register_map

__all__ = ["constrained_softmax"]


def _special(z: Tensor, u: Tensor, total: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NaN rows (``(..., 1)``, then computed as zeros), the entries fixed at their caps
    (``+inf`` entries whose caps leave mass for the others), and ``z`` with the ``+inf``
    entries finite (0) and, where they take all the mass, the others absent (-inf)."""
    present = z > -math.inf
    nan_rows = (torch.isnan(z) | (torch.isnan(u) & present)).any(-1, keepdim=True)
    z = torch.where(nan_rows, 0.0, z)
    u = torch.where(nan_rows, math.inf, u)
    pinf = z == math.inf
    any_inf = pinf.any(-1, keepdim=True)
    at_caps = any_inf & (torch.where(pinf, u, 0.0).sum(-1, keepdim=True) < total)
    fixed = at_caps & pinf
    z = torch.where(~at_caps & any_inf & ~pinf, -math.inf, z)
    z = torch.where(pinf, 0.0, z)
    return z, u, nan_rows, fixed


def _csoftmax_fwd(x: Tensor, upper: Tensor, dim: int, total: float) -> Tensor:
    f64 = torch.float64
    z = x.movedim(dim, -1).to(f64)
    u = upper.movedim(dim, -1).to(f64).expand(z.shape)
    if bool((u < 0).any()):
        raise ConvexMixError("upper must be >= 0 for the softmax; got a negative entry.")
    if z.numel() == 0:
        return x.new_zeros(x.shape)
    z, u, nan_rows, fixed = _special(z, u, total)
    present = z > -math.inf
    u = torch.where(present, u, math.inf)  # absent: never capped, out of the sums
    k = z.shape[-1]
    check_sums(z.reshape(-1, k), torch.zeros((1, 1), dtype=f64), u.reshape(-1, k), total, dim)
    # the order of capping: e_i / u_i, the fixed entries first, absent entries last
    ratio = torch.where(present, (z - torch.log(u)).clamp_max(torch.finfo(f64).max), -math.inf)
    order = torch.sort(torch.where(fixed, math.inf, ratio), dim=-1, descending=True).indices
    lz = torch.where(fixed, -math.inf, z).gather(-1, order)  # the candidates of the free set
    us = u.gather(-1, order)
    cm = us.cumsum(-1)
    rem = total - torch.cat([cm.new_zeros((*cm.shape[:-1], 1)), cm[..., :-1]], -1)
    lse_rest = torch.logcumsumexp(lz.flip(-1), -1).flip(-1)  # log S_j
    nothing_left = (rem <= 0) | (lse_rest == -math.inf)
    log_c = torch.log(torch.where(nothing_left, 1.0, rem)) - torch.where(
        nothing_left, 0.0, lse_rest
    )
    ok = ((log_c + lz <= torch.log(us)) | nothing_left) & ~fixed.gather(-1, order)
    j = torch.where(ok.any(-1, keepdim=True), ok.to(torch.int8).argmax(-1, keepdim=True), k)
    pos = torch.arange(k, device=z.device).expand(z.shape)
    capped = torch.zeros_like(pos < j).scatter_(-1, order, pos < j)
    # exact finish: the capped mass by a plain sum, the free entries by their logsumexp
    free = present & ~capped
    rest = (total - torch.where(capped, u, 0.0).sum(-1, keepdim=True)).clamp_min(0.0)
    lse = torch.logsumexp(torch.where(free, z, -math.inf), -1, keepdim=True)
    scale = torch.where(lse > -math.inf, lse, 0.0)
    p = torch.where(capped, u, torch.where(free, torch.exp(z - scale) * rest, 0.0))
    p = p.masked_fill(nan_rows, math.nan)
    return p.to(x.dtype).movedim(-1, dim).contiguous()


def _csoftmax_vjp(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The constrained softmax: ``p (g - <p, g>_F / R)`` on the free entries (``R`` their
    mass), zero on the capped ones; upper gets ``g - <p, g>_F / R`` where capped."""
    y, upper = ctx.saved_tensors
    d = ctx.dim
    capped = y >= upper
    pf = torch.where(capped, 0.0, y).to(grad.dtype)
    mass = pf.sum(d, keepdim=True)
    q = (pf * grad).sum(d, keepdim=True) / torch.where(mass > 0, mass, 1.0)
    dx = pf * (grad - q) if ctx.needs_input_grad[0] else None
    gup = None
    if ctx.needs_input_grad[1]:
        gup = torch.where(capped, grad - q, 0.0).sum_to_size(upper.shape).to(upper.dtype)
    return dx, gup


_CSOFTMAX = register_map(
    "constrained_softmax",
    _csoftmax_fwd,
    _csoftmax_vjp,
    n_diff=2,
    dim_arg=2,
    saved=(1,),
    n_tensors=2,
)


def constrained_softmax(z: Tensor, d: int, total: float, upper: float | Tensor) -> Tensor:
    """The constrained softmax of the prepared, temperature-scaled ``z`` along ``d``."""
    up = as_bound(upper, z, "upper", math.inf)
    return _CSOFTMAX(z, up, d, total)
