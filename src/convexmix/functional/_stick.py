"""Stick-breaking: K-1 free values to K weights, and its exact inverse (private module)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convexmix.errors import ShapeError
from convexmix.functional._checks import (
    apply_mask,
    check_tensor,
    check_total,
    compute_dtype,
    normalize_dim,
)
from convexmix.functional._softmax import safe_softmax

__all__ = ["stick_breaking", "stick_breaking_inverse"]


def _offsets(n: int, like: Tensor) -> Tensor:
    """log(K-1), log(K-2), ..., log(1) for K-1 = n: the shift that makes zeros uniform."""
    return torch.arange(n, 0, -1, device=like.device, dtype=like.dtype).log()


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
    u = z.to(compute_dtype(z.dtype)).movedim(d, -1)
    u = u - _offsets(u.shape[-1], u)
    # log p_i = log s_i + sum_{j<i} log(1 - s_j); the last weight is the rest of the stick.
    log_rest = F.logsigmoid(-u).cumsum(-1)
    log_p = torch.cat(
        [
            F.logsigmoid(u[..., :1]),
            F.logsigmoid(u[..., 1:]) + log_rest[..., :-1],
            log_rest[..., -1:],
        ],
        dim=-1,
    )
    if u.shape[-1] == 0:  # K = 1: the single weight is the whole stick
        log_p = u.new_zeros((*u.shape[:-1], 1))
    log_p = apply_mask(log_p.movedim(-1, d), mask, "the stick-breaking output")
    # A softmax over exact log-weights renormalises them: sums are exact to rounding.
    p = safe_softmax(log_p, d)
    if total != 1.0:
        p = p * total
    return p.to(z.dtype)


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
