"""AdaMerging's label-free objective (private module; ``convexmix.merge`` exports it)."""

from __future__ import annotations

import torch
from torch import Tensor

from convexmix.errors import ConvexMixError, ShapeError

__all__ = ["entropy_loss"]


def entropy_loss(logits: Tensor) -> Tensor:
    r"""AdaMerging's label-free objective: the mean Shannon entropy of the predictions.

    .. math::

        \frac{1}{N} \sum_n H(\mathrm{softmax}(z_n)), \qquad
        H(p) = -\sum_c p_c \log p_c

    over the last dimension (the classes) of ``logits``, averaged over every other
    entry (N = ``logits.numel() / C``). Computed from ``log_softmax``: stable for any
    finite logits, and ``-inf`` logits (impossible classes) count as ``0 log 0 = 0`` with
    zero gradient, never NaN. Float16/bfloat16 logits are computed in float32.

    Args:
        logits: (..., C) unnormalised scores, floating point, C >= 1, at least one entry.

    Returns:
        A 0-d tensor of the logits' dtype (float32 for half precisions), differentiable.

    Example:
        >>> import torch, convexmix as cx
        >>> cx.merge.entropy_loss(torch.zeros(4, 2))  # uniform over 2 classes: log 2
        tensor(0.6931)
        >>> cx.merge.entropy_loss(torch.tensor([[30.0, 0.0]]))  # confident: about 0
        tensor(...e-12)
    """
    if not isinstance(logits, Tensor):
        raise ConvexMixError(f"logits must be a tensor; got {type(logits).__name__}.")
    if not logits.is_floating_point():
        raise ConvexMixError(f"logits must be floating point; got dtype {logits.dtype}.")
    if logits.dim() == 0 or logits.numel() == 0:
        raise ShapeError(
            f"logits must be (..., C) with C >= 1 and at least one row; got shape "
            f"{tuple(logits.shape)}."
        )
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    # 0 log 0 = 0: where p == 0 (a -inf logit), use log p = 0 so neither term is NaN.
    safe = torch.where(p > 0, log_p, torch.zeros((), dtype=z.dtype, device=z.device))
    return -(p * safe).sum(-1).mean()
