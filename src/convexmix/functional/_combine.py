"""``convex_combination``: sum_k weights[k] * inputs[k], fused (private module).

The forward and backward are ``torch.library`` custom ops (opaque to
``torch.compile(fullgraph=True)``), with the autograd formula registered on the forward op.
They run the kernels dispatched by ``convexmix._kernels.combine`` (native C on CPU, Triton on
CUDA, blocked ATen otherwise): about K reads and one write forward, one read of the
output gradient plus K reads (and K writes for the inputs' gradients) backward, and no K
temporaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from convexmix._kernels import combine
from convexmix.errors import ConvexMixError, ShapeError
from convexmix.functional._checks import broadcasts_to, compute_dtype, normalize_dim

__all__ = ["convex_combination"]


# ------------------------------------------------------------------------ custom ops


@torch.library.custom_op("convexmix::combine", mutates_args=())
def _combine_op(weights: Tensor, inputs: list[Tensor]) -> Tensor:
    out = combine.empty(inputs[0].shape, inputs[0].dtype, inputs[0].device)
    combine.forward(weights, inputs, out)
    return out


@_combine_op.register_fake
def _(weights: Tensor, inputs: list[Tensor]) -> Tensor:
    return inputs[0].new_empty(inputs[0].shape)


@torch.library.custom_op("convexmix::combine_out", mutates_args=("out",))
def _combine_out_op(weights: Tensor, inputs: list[Tensor], out: Tensor) -> None:
    combine.forward(weights, inputs, out)


@_combine_out_op.register_fake
def _(weights: Tensor, inputs: list[Tensor], out: Tensor) -> None:
    return None


# One backward op per need (weights, inputs, both), each with a fixed output structure and
# no flags. The inputs' gradients are computed for all inputs or none; when only some
# inputs need one, the others are dropped.


@torch.library.custom_op("convexmix::combine_grad_w", mutates_args=())
def _grad_w_op(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> Tensor:
    grad_w, _ = combine.backward(grad, weights, inputs, True, [False] * len(inputs))
    assert grad_w is not None
    return grad_w


@_grad_w_op.register_fake
def _(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> Tensor:
    return weights.new_empty(weights.shape)


@torch.library.custom_op("convexmix::combine_grad_x", mutates_args=())
def _grad_x_op(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    return combine.backward(grad, weights, inputs, False, [True] * len(inputs))[1]


@_grad_x_op.register_fake
def _(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    return [x.new_empty(x.shape) for x in inputs]


@torch.library.custom_op("convexmix::combine_grad_wx", mutates_args=())
def _grad_wx_op(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    grad_w, grad_xs = combine.backward(grad, weights, inputs, True, [True] * len(inputs))
    assert grad_w is not None
    return grad_w, grad_xs


@_grad_wx_op.register_fake
def _(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    return weights.new_empty(weights.shape), [x.new_empty(x.shape) for x in inputs]


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    weights, xs = inputs
    ctx.save_for_backward(weights, *xs)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
    """One pass over the output gradient for whatever is needed. Inputs that need no
    gradient get None (when only some do, the others' are computed and dropped)."""
    weights, *xs = ctx.saved_tensors
    need_w = bool(ctx.needs_input_grad[0])
    flags = ctx.needs_input_grad[1]  # one flag per input (eager), or one bool (AOTAutograd)
    need_x = (
        [bool(n) for n in flags] if isinstance(flags, (list, tuple)) else [bool(flags)] * len(xs)
    )
    grad = grad.contiguous()
    grad_w: Tensor | None = None
    grad_xs: list[Tensor] | None = None
    if need_w and any(need_x):
        grad_w, grad_xs = _grad_wx_op(grad, weights, xs)
    elif need_w:
        grad_w = _grad_w_op(grad, weights, xs)
    elif any(need_x):
        grad_xs = _grad_x_op(grad, weights, xs)
    gx: list[Tensor | None] = [None] * len(xs)
    if grad_xs is not None:
        gx = [g if n else None for g, n in zip(grad_xs, need_x, strict=True)]
    return grad_w, gx


# register_autograd (not an autograd.Function): Dynamo mis-binds a varargs Function that
# passes its tensors on as a list. torch.func transforms are not supported on this op.
_combine_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------- public


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
    x0 = xs[0]
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise ConvexMixError(f"inputs[{i}] must be a tensor; got {type(x).__name__}.")
        if x.shape != x0.shape:
            shapes = [tuple(t.shape) if isinstance(t, Tensor) else None for t in xs]
            raise ShapeError(f"all inputs must have the same shape; got {shapes}.")
        if x.dtype != x0.dtype:
            dtypes = sorted({str(t.dtype) for t in xs if isinstance(t, Tensor)})
            raise ConvexMixError(f"all inputs must have the same dtype; got {dtypes}.")
        if x.device != x0.device:
            devices = sorted({str(t.device) for t in xs if isinstance(t, Tensor)})
            raise ConvexMixError(f"all inputs must be on one device; got {devices}.")
    return xs


def convex_combination(
    weights: Tensor,
    inputs: Tensor | Sequence[Tensor],
    *,
    dim: int = 0,
    out: Tensor | None = None,
) -> Tensor:
    r"""Fused weighted sum :math:`\sum_k w_k \, x_k` of K same-shape inputs.

    One pass: no ``torch.stack``, no K temporaries, one output (or ``out``). The weights
    are usually on the simplex (the output of a map), but any weights work (a ScalarMix
    gamma is folded in this way); they are not checked, so nothing synchronises.

    Args:
        weights: ``(K,)``, or ``(K, *S)`` with ``S`` broadcasting to an input's shape
            (per-channel weights ``(K, C)``, per-sample weights ``(K, B, 1, ..., 1)``).
        inputs: a list/tuple of K tensors of one shape, dtype and device (any strides),
            or one tensor with K along ``dim``.
        dim: the dimension of K when ``inputs`` is one tensor.
        out: a preallocated output of the inputs' shape and dtype, to reuse a buffer
            (no autograd through ``out=``).

    Returns:
        Tensor of the inputs' shape and dtype; float16/bfloat16 accumulate in float32.
        Gradients flow to the weights and the inputs, only to those that need them.
        CPU outputs and input gradients of 4 MiB or more reuse memory that earlier ones
        freed (convexmix's output cache, ``CONVEXMIX_OUTPUT_CACHE_MB``; see the guide),
        so their storage cannot grow: ``resize_`` to more elements raises.

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
    if weights.dim() > 1 and not broadcasts_to(weights.shape[1:], shape):
        raise ShapeError(
            f"weights of shape {tuple(weights.shape)} do not broadcast against inputs of shape "
            f"{tuple(shape)}: the trailing shape {tuple(weights.shape[1:])} must broadcast to it."
        )
    if not xs[0].is_floating_point():
        raise ConvexMixError(f"inputs must be floating point; got dtype {xs[0].dtype}.")
    if weights.device != xs[0].device:
        raise ConvexMixError(
            f"weights are on {weights.device} but the inputs on {xs[0].device}; move one of them."
        )
    acc = torch.promote_types(compute_dtype(xs[0].dtype), weights.dtype)
    w = weights if weights.dtype == acc else weights.to(acc)
    if out is not None:
        if not isinstance(out, Tensor) or out.shape != shape or out.dtype != xs[0].dtype:
            got = (tuple(out.shape), out.dtype) if isinstance(out, Tensor) else type(out).__name__
            raise ShapeError(
                f"out must have shape {tuple(shape)} and dtype {xs[0].dtype}; got {got}."
            )
        if torch.is_grad_enabled() and (w.requires_grad or any(x.requires_grad for x in xs)):
            raise ConvexMixError(
                "out= does not support autograd: drop out= or run under torch.no_grad()."
            )
        _combine_out_op(w.detach(), xs, out)
        return out
    return cast(Tensor, _combine_op(w, xs))
