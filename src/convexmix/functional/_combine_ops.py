"""The differentiable wrappers of ``convex_combination``'s fused kernels (private):
``torch.library`` custom ops (what ``torch.compile`` sees: opaque, no graph break) and
``_Fused``, a plain ``autograd.Function`` for eager calls (a few microseconds a call,
against ~100 for the custom op's Python autograd). Both run the kernels of
``convexmix._kernels.combine``; :mod:`._combine` chooses between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from convexmix._kernels import combine

__all__: list[str] = []


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
    grad_w = combine.backward(grad, weights, inputs, True, [False] * len(inputs)).weights
    assert grad_w is not None
    return grad_w


@_grad_w_op.register_fake
def _(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> Tensor:
    return weights.new_empty(weights.shape)


@torch.library.custom_op("convexmix::combine_grad_x", mutates_args=())
def _grad_x_op(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    return combine.backward(grad, weights, inputs, False, [True] * len(inputs)).inputs


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


# ------------------------------------------------------------------- eager autograd


def _grads(
    grad: Tensor, w: Tensor, xs: Sequence[Tensor], need_w: bool, need_x: Sequence[bool]
) -> tuple[Tensor | None, list[Tensor | None]]:
    """The backward in differentiable ATen ops (double backward, torch.func)."""
    grad_w = None
    if need_w:
        g = grad.to(w.dtype)
        grad_w = torch.stack([(g * x).sum_to_size(w.shape[1:]) for x in xs])
    ws = w.unbind(0)
    gx: list[Tensor | None] = [
        (grad * ws[k]).to(xs[k].dtype) if n else None for k, n in enumerate(need_x)
    ]
    return grad_w, gx


class _Fused(torch.autograd.Function):
    """Eager autograd for the fused kernels: a plain ``autograd.Function`` (a few
    microseconds a call, against ~100 for the custom op's Python autograd). The backward
    runs the fused kernel, or differentiable ATen ops when a graph of it is wanted
    (``create_graph=True``), so double backward works."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, *xs: Tensor) -> Tensor:
        # ctx in forward, not setup_context: Function.apply binds the default arguments
        # of a setup_context Function with inspect.signature (~10 us a call). torch.func
        # transforms never reach this class (they run the composite code).
        x0 = xs[0]
        out = combine.empty(x0.shape, x0.dtype, x0.device)
        combine.forward(w, list(xs), out)
        ctx.save_for_backward(w, *xs)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        w, *xs = ctx.saved_tensors
        need_w, *need_x = ctx.needs_input_grad
        if torch.is_grad_enabled():
            grad_w, gx = _grads(grad, w, xs, need_w, need_x)
            return (grad_w, *gx)
        grad_w, grad_xs = combine.backward(grad.contiguous(), w, xs, need_w, need_x)
        it = iter(grad_xs)
        return (grad_w, *(next(it) if n else None for n in need_x))
