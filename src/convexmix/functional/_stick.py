"""Stick-breaking: K-1 free values to K weights, and its exact inverse (private module)."""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from convexmix._validation import (
    apply_mask,
    check_tensor,
    check_total,
    compute_dtype,
    normalize_dim,
    traced,
)
from convexmix.errors import ShapeError
from convexmix.functional._softmax import safe_softmax

__all__ = ["stick_breaking", "stick_breaking_inverse"]


@functools.lru_cache(maxsize=64)
def _offsets_cached(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.arange(n, 0, -1, device=device, dtype=dtype).log()


def _offsets(n: int, like: Tensor) -> Tensor:
    """log(K-1), log(K-2), ..., log(1) for K-1 = n: the shift that makes zeros uniform.
    Cached (read only) outside traced code, where it would be a constant tensor."""
    if traced():
        return torch.arange(n, 0, -1, device=like.device, dtype=like.dtype).log()
    return _offsets_cached(n, like.dtype, like.device)


def _log_weights(u: Tensor) -> Tensor:
    """``(..., K-1)`` shifted free values to ``(..., K)`` log-weights:
    ``log p_i = log s_i + sum_{j<i} log(1 - s_j)``; the last is the rest of the stick.
    Both logs are ``logsigmoid`` (of ``u`` and of ``-u``): exact in the tails, where
    ``log(1 - s)`` from ``log s`` would cancel."""
    log_rest = F.logsigmoid(-u).cumsum(-1)
    # out of place, so that every transform differentiates it: [0, rest] + [log s, 0]
    return F.pad(log_rest, (1, 0)) + F.pad(F.logsigmoid(u), (0, 1))


class _StickBreaking(torch.autograd.Function):
    """Eager stick-breaking as one autograd node, with the closed-form backward.

    With ``a = p * (g - <g, p>)`` (the softmax that renormalises), the gradient of the
    free value ``u_j`` is ``a_j - s_j * sum_{i >= j} a_i``: a cumsum and a few
    elementwise kernels, where autograd through the composite form records and replays
    about a dozen. Plain eager calls only: traced code (compile, torch.func) runs the
    composite form."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, d: int, mask: Tensor | None, total: float) -> Tensor:
        out, p, u = _forward(z, d, mask, total)
        ctx.d, ctx.total = d, total
        ctx.save_for_backward(p, u)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        p, u = ctx.saved_tensors
        d, total = ctx.d, ctx.total
        g = grad.to(p.dtype)
        if total != 1.0:
            g = g * total
        a = (g - (g * p).sum(d, keepdim=True)).mul_(p).movedim(d, -1)
        tail = a.cumsum(-1)  # then sum_{i >= j} a_i = tail[-1] - tail[j] + a_j
        tail = torch.sub(tail[..., -1:], tail).add_(a)[..., :-1]
        du = a[..., :-1] - torch.sigmoid(u).mul_(tail)
        return du.movedim(-1, d).to(grad.dtype), None, None, None


def _forward(z: Tensor, d: int, mask: Tensor | None, total: float) -> tuple[Tensor, Tensor, Tensor]:
    """The output; the weights in the compute dtype, summing to one; the shifted free
    values. Differentiable ATen code: traced calls differentiate through it."""
    u = z.to(compute_dtype(z.dtype)).movedim(d, -1)
    u = u - _offsets(u.shape[-1], u)
    log_p = _log_weights(u).movedim(-1, d)
    if mask is None:
        # Renormalise the exact log-weights so that sums are exact to rounding. They are
        # <= 0 and the largest of a slice is >= log(1/K), so exp neither overflows nor
        # underflows a whole slice: one division, no max to subtract (torch.softmax on
        # short rows costs several times these three kernels: (4096, 10) 325 us).
        e = log_p.exp()
        p = e / e.sum(d, keepdim=True)
    else:
        # absent entries are -inf, a slice may have none left: the safe softmax
        p = safe_softmax(apply_mask(log_p, mask, "the stick-breaking output"), d)
    out = p * total if total != 1.0 else p
    return (out if out.dtype == z.dtype else out.to(z.dtype)), p, u


def stick_breaking(
    z: Tensor, dim: int = -1, *, mask: Tensor | None = None, total: float = 1.0
) -> Tensor:
    r"""Stick-breaking: K-1 unconstrained values to K weights that sum to ``total``.

    The convention of ``torch.distributions.transforms.StickBreakingTransform``: with
    :math:`s_i = \sigma(z_i - \log(K-1-i))` (0-based i), :math:`p_i = s_i\prod_{j<i}(1-s_j)`
    and :math:`p_{K-1} = \prod_j (1-s_j)`, so all-zero ``z`` gives uniform weights. Computed
    in log space (``logsigmoid``), so it stays finite and exact-summing for inputs of
    +-1e4 where the product form underflows.

    ``mask`` refers to the K *outputs*: absent weights are 0 and the others are renormalised
    (the stick-breaking distribution conditioned on the present entries).

    Args:
        z: ``(..., K-1, ...)`` free values; ``dim`` indexes them.
        dim: the dimension of length K-1 (K in the output).
        mask: bool, True = present, broadcastable to the ``(..., K, ...)`` output.
        total: the sum of each output slice, ``> 0``.

    Returns:
        Tensor like ``z`` with size K along ``dim``.

    Example:
        >>> import torch, convexmix as cx
        >>> cx.functional.stick_breaking(torch.zeros(3))
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
        >>> p = torch.tensor([0.1, 0.2, 0.3, 0.4])
        >>> cx.functional.stick_breaking(cx.functional.stick_breaking_inverse(p))
        tensor([0.1000, 0.2000, 0.3000, 0.4000])
    """
    check_tensor(z, "z")
    d = normalize_dim(z, dim, "z")
    total = check_total(total, z.dtype)
    if torch.is_grad_enabled() and z.requires_grad and not traced():
        return cast(Tensor, _StickBreaking.apply(z, d, mask, total))  # type: ignore[no-untyped-call]
    # no gradient wanted, or traced (compile, torch.func): autograd through the ATen code
    return _forward(z, d, mask, total)[0]


def stick_breaking_inverse(p: Tensor, dim: int = -1, *, total: float = 1.0) -> Tensor:
    r"""Exact inverse of :func:`stick_breaking`: K weights to K-1 free values.

    :math:`z_i = \log p_i - \log\sum_{j>i} p_j + \log(K-1-i)`, with the tail sums taken
    from the end (accurate where ``1 - cumsum`` cancels). Zeros give infinities, as they
    must; :class:`convexmix.Simplex` smooths them first.

    Args:
        p: ``(..., K, ...)`` weights summing to ``total`` along ``dim``.
        dim: the dimension of length K.
        total: the sum of the weights.

    Returns:
        Tensor like ``p`` with size K-1 along ``dim``.
    """
    check_tensor(p, "p")
    d = normalize_dim(p, dim, "p")
    total = check_total(total)
    q = p.to(compute_dtype(p.dtype)).movedim(d, -1) / total
    if q.shape[-1] < 1:
        raise ShapeError(
            f"p must have at least one entry along dim={dim}; got shape {tuple(p.shape)}."
        )
    tail = q.flip(-1).cumsum(-1).flip(-1)[..., 1:]  # sum_{j>i} p_j
    z = q[..., :-1].log() - tail.log() + _offsets(tail.shape[-1], q)
    return z.movedim(-1, d).to(p.dtype)
