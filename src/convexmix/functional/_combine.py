"""``convex_combination``: sum_k weights[k] * inputs[k] (private module).

This is the reference implementation: one accumulator and ``addcmul`` steps, so no K
temporaries and no ``torch.stack``; autograd differentiates it. Issue 4 replaces the
body with fused CPU/Triton kernels behind the same signature.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from convexmix.errors import ConvexMixError, ShapeError
from convexmix.functional._checks import broadcasts_to, compute_dtype, normalize_dim

__all__ = ["convex_combination"]


def _as_list(inputs: Tensor | Sequence[Tensor], dim: int) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        d = normalize_dim(inputs, dim, "inputs")
        return list(inputs.unbind(d))  # views, no copies
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ConvexMixError(
            "inputs must be a non-empty list/tuple of tensors or one tensor with K along dim; "
            f"got {type(inputs).__name__}{' (empty)' if isinstance(inputs, (list, tuple)) else ''}."
        )
    xs = list(inputs)
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise ConvexMixError(f"inputs[{i}] must be a tensor; got {type(x).__name__}.")
    shapes = [tuple(x.shape) for x in xs]
    if len(set(shapes)) > 1:
        raise ShapeError(f"all inputs must have the same shape; got {shapes}.")
    dtypes = {x.dtype for x in xs}
    if len(dtypes) > 1:
        raise ConvexMixError(
            f"all inputs must have the same dtype; got {sorted(map(str, dtypes))}."
        )
    return xs


def convex_combination(
    weights: Tensor, inputs: Tensor | Sequence[Tensor], *, dim: int = 0
) -> Tensor:
    r"""Weighted sum :math:`\sum_k w_k \, x_k` of K same-shape inputs.

    The weights are usually on the simplex (the output of a map), but any weights work
    (e.g. a ScalarMix gamma folded in); they are not checked, so no synchronisation.

    Args:
        weights: ``(K,)``, or ``(K, *S)`` with ``S`` broadcasting to an input's shape
            (per-channel weights ``(K, C)``, per-sample weights ``(K, B, 1, ..., 1)``).
        inputs: a list/tuple of K tensors of one shape and dtype, or one tensor with K
            along ``dim``.
        dim: the dimension of K when ``inputs`` is one tensor.

    Returns:
        Tensor of the inputs' shape and dtype; float16/bfloat16 accumulate in float32.

    Example:
        >>> import torch, convexmix as cx
        >>> xs = [torch.ones(2, 3), torch.zeros(2, 3)]
        >>> cx.functional.convex_combination(torch.tensor([0.25, 0.75]), xs)
        tensor([[0.2500, 0.2500, 0.2500],
                [0.2500, 0.2500, 0.2500]])
        >>> per_channel = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])  # (K, C)
        >>> cx.functional.convex_combination(per_channel, xs)
        tensor([[1.0000, 0.0000, 0.5000],
                [1.0000, 0.0000, 0.5000]])
    """
    xs = _as_list(inputs, dim)
    if not isinstance(weights, Tensor):
        raise ConvexMixError(f"weights must be a tensor; got {type(weights).__name__}.")
    k, shape = len(xs), xs[0].shape
    if weights.dim() == 0 or weights.shape[0] != k:
        raise ShapeError(
            f"weights must have shape (K, ...) with K={k} inputs; got {tuple(weights.shape)}."
        )
    if not broadcasts_to(weights.shape[1:], shape):
        raise ShapeError(
            f"weights of shape {tuple(weights.shape)} do not broadcast against inputs of shape "
            f"{tuple(shape)}: the trailing shape {tuple(weights.shape[1:])} must broadcast to it."
        )
    if not xs[0].is_floating_point():
        raise ConvexMixError(f"inputs must be floating point; got dtype {xs[0].dtype}.")
    acc = torch.promote_types(compute_dtype(xs[0].dtype), weights.dtype)
    w = weights.to(acc)
    out = w[0] * xs[0].to(acc)
    for i in range(1, k):
        out = torch.addcmul(out, w[i], xs[i])
    return out.to(xs[0].dtype)
