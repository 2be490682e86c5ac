"""Triton kernels of ``convex_combination`` for CUDA tensors (used when Triton imports).

One program per ``BLOCK`` elements loads the K inputs once, accumulates in float32 (float64
for float64 inputs) and stores the output once. The inputs need not be one tensor: each is
addressed as ``x0 + offset[k]``, its element offset from the first input. The backward
reads the output gradient once per block, writes each program's K partial dot products
(summed on the host in float64, in a fixed order) and the K input gradients
``w_k * grad`` (addressed by offsets in the same way).

Any contiguous inputs with scalar weights take this path; strided inputs and broadcast
weights run the blocked ATen loop. With ``TRITON_INTERPRET=1`` *and*
``CONVEXMIX_TRITON_INTERPRET=1`` the kernels run on CPU tensors in Triton's interpreter
(slowly): that is how the test suite checks them on machines without a GPU. Triton's flag
alone changes nothing here, so a program that interprets its own kernels keeps
convexmix's native CPU path.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from convexmix._kernels.backend import Grads
from convexmix._validation import plain

__all__: list[str] = []

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

BLOCK = 1024
_INTERPRET = (
    os.environ.get("TRITON_INTERPRET") == "1"
    and os.environ.get("CONVEXMIX_TRITON_INTERPRET") == "1"
)
_ACC: dict[torch.dtype, Any] = {}

if triton is not None:
    _ACC = {
        torch.float64: tl.float64,
        torch.float32: tl.float32,
        torch.bfloat16: tl.float32,
        torch.float16: tl.float32,
    }

    @triton.jit
    def _fwd_kernel(x0, offs, w, out, n, K, ACC: tl.constexpr, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        acc = tl.zeros([BLOCK], dtype=ACC)
        for k in range(K):
            xk = x0 + tl.load(offs + k)
            acc += tl.load(w + k).to(ACC) * tl.load(xk + idx, mask=mask, other=0.0).to(ACC)
        tl.store(out + idx, acc.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(
        g,
        x0,
        offs,
        w,
        dots,
        gx,
        goffs,
        n,
        K,
        NEED_W: tl.constexpr,
        NEED_X: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        gv = tl.load(g + idx, mask=mask, other=0.0).to(ACC)
        for k in range(K):
            if NEED_W:
                xk = tl.load(x0 + tl.load(offs + k) + idx, mask=mask, other=0.0).to(ACC)
                tl.store(dots + pid * K + k, tl.sum(gv * xk, axis=0).to(tl.float64))
            if NEED_X:
                wk = tl.load(w + k).to(ACC)
                gk = gx + tl.load(goffs + k)
                tl.store(gk + idx, (wk * gv).to(gx.dtype.element_ty), mask=mask)


def _applies(weights: Tensor, tensors: list[Tensor]) -> bool:
    if triton is None or weights.dim() != 1 or not tensors:
        return False
    device = "cpu" if _INTERPRET else "cuda"
    x = tensors[0]
    return (
        x.dtype in _ACC
        and plain([weights, *tensors])
        and all(t.device.type == device and t.is_contiguous() for t in tensors)
        and all(t.element_size() == x.element_size() for t in tensors)
    )


def _offsets(xs: list[Tensor]) -> Tensor | None:
    """Element offsets of each input from the first, or None if one is not a whole number
    of elements away (never with the CUDA caching allocator's aligned blocks)."""
    size, base = xs[0].element_size(), xs[0].data_ptr()
    gaps = [x.data_ptr() - base for x in xs]
    if any(g % size for g in gaps):
        return None
    return torch.tensor([g // size for g in gaps], dtype=torch.int64, device=xs[0].device)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def forward(weights: Tensor, xs: list[Tensor], out: Tensor) -> bool:
    """``out = sum_k weights[k] xs[k]`` with Triton; False (nothing done) if it does not
    apply."""
    if not _applies(weights, [*xs, out]) or out.numel() == 0:
        return False
    offs = _offsets(xs)
    if offs is None:
        return False
    n = out.numel()
    acc = _ACC[xs[0].dtype]
    _fwd_kernel[_grid(n)](xs[0], offs, weights.contiguous(), out, n, len(xs), acc, BLOCK)
    return True


def backward(
    grad: Tensor, weights: Tensor, xs: list[Tensor], need_w: bool, need_x: list[bool]
) -> Grads | None:
    """The gradients with Triton (:class:`~convexmix._kernels.backend.Grads`), or None when
    the Triton path does not apply."""
    if not _applies(weights, [grad, *xs]) or grad.numel() == 0:
        return None
    offs = _offsets(xs)
    if offs is None:
        return None
    n, k = grad.numel(), len(xs)
    blocks = _grid(n)[0]
    dots = torch.empty(blocks, k, dtype=torch.float64, device=grad.device) if need_w else None
    # K separate tensors (views of one buffer would alias the custom op's outputs); the
    # kernel writes all K when any is needed
    any_x = any(need_x)
    gxs = [torch.empty_like(x) for x in xs] if any_x else []
    goffs = _offsets(gxs) if gxs else offs
    if goffs is None:
        return None
    _bwd_kernel[(blocks,)](
        grad,
        xs[0],
        offs,
        weights.contiguous(),
        dots if dots is not None else grad,
        gxs[0] if gxs else grad,
        goffs,
        n,
        k,
        need_w,
        any_x,
        _ACC[xs[0].dtype],
        BLOCK,
    )
    kept = [g for g, needed in zip(gxs, need_x, strict=False) if needed]
    return Grads(dots.sum(0).to(weights.dtype) if dots is not None else None, kept)
