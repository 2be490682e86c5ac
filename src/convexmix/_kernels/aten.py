"""The ATen back end of ``convex_combination``: blocked ATen code for what the Triton
(:mod:`.gpu`) and native (:mod:`.cpu`) kernels do not take (strided inputs, broadcast
weights, weights wider than the accumulation dtype, no C compiler); it always applies.

Forward, ``out = sum_k w_k x_k``:

* inputs that are rows of one strided block (``torch.stack``-ed, or the unbind of a
  contiguous ``(K, ...)`` tensor) with scalar weights: one BLAS GEMV, which reads each
  input once and writes the output once;
* otherwise the output is built in blocks of ~``BLOCK`` elements that stay in cache while
  the K inputs stream through (``add_``/``addcmul_``): K reads and one write, no K
  temporaries. Half precision accumulates in a block-sized float32 buffer.

Backward reads the output gradient once per block: ``grad_w[k] += <g, x_k>`` (K reads)
and ``grad_x[k] = w_k g`` (K writes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from convexmix._kernels import alloc
from convexmix._kernels.backend import Grads

__all__: list[str] = []

#: Elements per block: 256K float32 = 1 MiB, which stays in L2 while K inputs stream by.
BLOCK = 1 << 18


def as_block(xs: list[Tensor]) -> Tensor | None:
    """A ``(K, N)`` view when the K contiguous inputs are equally spaced in one storage."""
    x0 = xs[0]
    if not all(x.is_contiguous() for x in xs) or x0.numel() == 0:
        return None
    storage = x0.untyped_storage().data_ptr()
    if any(x.untyped_storage().data_ptr() != storage for x in xs):
        return None
    n = x0.numel()
    if len(xs) == 1:
        return x0.reshape(1, n)
    step = xs[1].storage_offset() - x0.storage_offset()
    if step < n:
        return None
    for k, x in enumerate(xs):
        if x.storage_offset() != x0.storage_offset() + k * step:
            return None
    return x0.as_strided((len(xs), n), (step, 1), x0.storage_offset())


def _blocks(shape: torch.Size, flat: bool) -> list[tuple[int, int]]:
    """Ranges to process: over the flat elements (scalar weights, contiguous inputs) or
    over dim 0 (any strides and any broadcast weights)."""
    if flat:
        n = shape.numel()
        return [(s, min(s + BLOCK, n)) for s in range(0, n, BLOCK)]
    rows = shape[0] if len(shape) else 1
    per_row = max(shape.numel() // max(rows, 1), 1)
    step = max(BLOCK // per_row, 1)
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


class _Slicer:
    """Cuts the same block out of inputs, outputs and (broadcast) weights."""

    def __init__(self, shape: torch.Size, weights: Tensor, flat: bool) -> None:
        self.flat = flat
        self.ndim = len(shape)
        s = weights.shape[1:]
        # weights (K, *S): S is right-aligned with the input shape; it varies along dim 0
        # of the input only if it has that dim with a size > 1.
        self.w_rows = len(s) == self.ndim and self.ndim > 0 and s[0] > 1
        self.weights = weights

    def x(self, t: Tensor, a: int, b: int) -> Tensor:
        if self.flat:
            return t.view(-1)[a:b]
        return t[a:b] if self.ndim else t

    def w(self, k: int, a: int, b: int) -> Tensor:
        wk = self.weights[k]
        return wk[a:b] if self.w_rows and not self.flat else wk


def forward(weights: Tensor, xs: list[Tensor], out: Tensor) -> bool:
    """``out[...] = sum_k weights[k] * xs[k]``; ``weights`` is in the accumulation dtype.
    Always applies (returns True)."""
    acc = weights.dtype
    scalar = weights.dim() == 1
    if scalar and out.is_contiguous() and out.dtype == acc == xs[0].dtype:
        block = as_block(xs)
        if block is not None and acc in (torch.float32, torch.float64):
            torch.mv(block.T, weights, out=out.view(-1))
            return True
    flat = scalar and out.is_contiguous() and all(x.is_contiguous() for x in xs)
    cut = _Slicer(xs[0].shape, weights, flat)
    wl = weights.tolist() if scalar else None
    direct = out.dtype == acc
    buf = None if direct else torch.empty(BLOCK, dtype=acc)
    for a, b in _blocks(xs[0].shape, flat):
        o = cut.x(out, a, b)
        if direct:
            dst = o
        else:
            assert buf is not None
            if buf.numel() < o.numel():
                buf = torch.empty(o.numel(), dtype=acc)
            dst = buf[: o.numel()].view(o.shape)
        for k, x in enumerate(xs):
            xc = cut.x(x, a, b)
            if wl is not None:
                if k == 0 and xc.dtype == acc:
                    torch.mul(xc, wl[0], out=dst)
                elif k == 0:  # a Python scalar would keep x's half dtype: widen first
                    dst.copy_(xc).mul_(wl[0])
                else:
                    dst.add_(xc, alpha=wl[k])
            elif k == 0:
                torch.mul(xc, cut.w(0, a, b), out=dst)
            else:
                dst.addcmul_(xc, cut.w(k, a, b))
        if not direct:
            o.copy_(dst)
    return True


def backward(
    grad: Tensor, weights: Tensor, xs: list[Tensor], need_w: bool, need_x: list[bool]
) -> Grads:
    """``grad_w[k] = sum(grad * x_k)`` reduced to the weights' shape, and ``grad_x[k] = w_k
    grad`` for the inputs with ``need_x[k]``. Always applies."""
    acc = weights.dtype
    scalar = weights.dim() == 1
    grads = {k: alloc.empty(x.shape, x.dtype, x.device) for k, x in enumerate(xs) if need_x[k]}
    grad_xs = list(grads.values())
    grad_w: Tensor | None = torch.zeros_like(weights) if need_w else None
    if not (need_w or grads):
        return Grads(grad_w, grad_xs)
    flat = scalar and grad.is_contiguous() and all(x.is_contiguous() for x in xs)
    cut = _Slicer(xs[0].shape, weights, flat)
    wl = weights.tolist() if scalar else None
    # Each block's products go to a reused, cache-sized buffer and are reduced by torch's
    # cascade sum; the blocks are then summed in float64. (BLAS sdot/sgemv accumulate in
    # float32 and lose ~1e-3 on sums with cancellation over a 256K block.)
    sums = torch.zeros(len(xs), dtype=torch.float64)
    half = xs[0].dtype != acc or grad.dtype != acc
    tmp = torch.empty(0, dtype=acc)
    for a, b in _blocks(xs[0].shape, flat):
        g = cut.x(grad, a, b)
        if half:
            g = g.to(acc)  # one block-sized float32 copy, in cache
        if tmp.numel() < g.numel():
            tmp = torch.empty(g.numel(), dtype=acc)
        prod = tmp[: g.numel()].view(g.shape)
        for k, x in enumerate(xs):
            xc = cut.x(x, a, b)
            if need_w:
                if wl is not None:
                    sums[k] += torch.mul(g, xc, out=prod).sum()
                else:
                    assert grad_w is not None
                    part = (g * xc).sum_to_size(cut.w(k, a, b).shape)  # block-sized, in cache
                    target = grad_w[k]
                    if cut.w_rows and not flat:
                        target = target[a:b]
                    target.add_(part)
            if k in grads:
                w = wl[k] if wl is not None else cut.w(k, a, b)
                torch.mul(g, w, out=cut.x(grads[k], a, b))
    if need_w and wl is not None:
        grad_w = sums.to(acc)
    return Grads(grad_w, grad_xs)
