"""The kernels of ``convex_combination``: one pass over the inputs, on any device.

Three back ends share one interface (:mod:`.backend`) and are tried in turn: contiguous
inputs with scalar weights run the Triton kernels of :mod:`.gpu` on CUDA and the native
kernels of :mod:`.cpu` (``combine.c``) on the CPU: one vectorised pass, several
threads. Everything else runs the blocked ATen code of :mod:`.aten`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from convexmix._kernels import alloc, aten, cpu, gpu
from convexmix._kernels.backend import Grads

__all__: list[str] = []

if TYPE_CHECKING:  # every back end implements the one interface (mypy checks it here)
    from convexmix._kernels.backend import Backward, Forward

    _forwards: tuple[Forward, ...] = (gpu.forward, cpu.forward, aten.forward)
    _backwards: tuple[Backward, ...] = (gpu.backward, cpu.backward, aten.backward)

#: A contiguous output; large CPU ones from the output cache (see :mod:`.alloc`).
empty = alloc.empty


def forward(weights: Tensor, xs: list[Tensor], out: Tensor) -> None:
    """``out[...] = sum_k weights[k] * xs[k]``; ``weights`` is in the accumulation dtype."""
    if out.numel() == 0:  # nothing to write (the native kernel splits no empty range)
        return
    if not (gpu.forward(weights, xs, out) or cpu.forward(weights, xs, out)):
        aten.forward(weights, xs, out)


def backward(
    grad: Tensor, weights: Tensor, xs: list[Tensor], need_w: bool, need_x: list[bool]
) -> Grads:
    """``grad_w[k] = sum(grad * x_k)`` reduced to the weights' shape (in their dtype), and
    ``grad_x[k] = w_k grad`` for the inputs with ``need_x[k]`` (in order, only those)."""
    if grad.numel() == 0:  # empty inputs: zero weight gradients, empty input gradients
        gw = (
            torch.zeros(weights.shape, dtype=weights.dtype, device=weights.device)
            if need_w
            else None
        )
        return Grads(gw, [torch.empty_like(x) for x, n in zip(xs, need_x, strict=True) if n])
    return (
        gpu.backward(grad, weights, xs, need_w, need_x)
        or cpu.backward(grad, weights, xs, need_w, need_x)
        or aten.backward(grad, weights, xs, need_w, need_x)
    )
