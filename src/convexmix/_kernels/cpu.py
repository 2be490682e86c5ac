"""The native CPU back end of ``convex_combination`` (``combine.c``), one of the three
that :mod:`.combine` tries (see :mod:`.backend` for the interface).

One vectorised pass forward (``out = sum_k w_k x_k``) and one backward (the K dot
products with the output gradient, and the inputs' gradients ``w_k g``), split over
threads from ``PARALLEL_MIN`` elements moved. Outputs of at least ``NT_BYTES`` are
written with non-temporal stores; the input gradients come from :mod:`.alloc`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convexmix._kernels import alloc, native
from convexmix._kernels.backend import Grads
from convexmix._validation import plain

__all__: list[str] = []

#: Outputs at least this large bypass the cache (non-temporal stores): they would not stay
#: there anyway, and skipping the read-for-ownership saves a pass. The threshold sits
#: below ScalarMix's 12 MiB outputs (K = 25), which streaming stores made faster
#: (docs/benchmarks.md).
NT_BYTES = 8 << 20
#: Below this many elements moved ((K + 1) * N) one thread does the whole call.
PARALLEL_MIN = 1 << 20
_ALIGN = 64  # elements per thread boundary: keeps every range 64-byte aligned


def _kernel(
    kind: str, dtype: torch.dtype, weights: Tensor, tensors: list[Tensor]
) -> native.Kernel | None:
    """The C function for these tensors, or None when the native path does not apply."""
    suffix = native.SUFFIX.get(dtype)
    if suffix is None or weights.dim() != 1 or weights.dtype != native.acc_dtype(dtype):
        return None
    if not plain([weights, *tensors]):
        return None
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    return native.kernel(f"cx_{kind}_{suffix}")


def ranges(n: int, k: int) -> list[tuple[int, int]]:
    """The per-thread ranges of ``n`` elements of ``k`` inputs."""
    return native.split(n, native.threads((k + 1) * n, PARALLEL_MIN), _ALIGN)


def _nt(outs: list[Tensor]) -> int:
    big = bool(outs) and outs[0].numel() * outs[0].element_size() >= NT_BYTES
    return int(big and all(t.data_ptr() % 64 == 0 for t in outs))


def forward(weights: Tensor, xs: list[Tensor], out: Tensor) -> bool:
    """``out = sum_k weights[k] xs[k]`` natively; False (nothing done) if it does not apply."""
    fn = _kernel("fwd", out.dtype, weights, [*xs, out])
    if fn is None:
        return False
    w = weights.contiguous()
    ptrs, n, k = native.pointers(xs), out.numel(), len(xs)
    nt = _nt([out])
    native.run(fn, [(ptrs, w.data_ptr(), k, out.data_ptr(), a, b, nt) for a, b in ranges(n, k)])
    return True


def backward(
    grad: Tensor, weights: Tensor, xs: list[Tensor], need_w: bool, need_x: list[bool]
) -> Grads | None:
    """The gradients natively (:class:`~convexmix._kernels.backend.Grads`; the input
    gradients from the output cache), or None, having done nothing, when the native path
    does not apply."""
    # the input gradients are fresh contiguous tensors of the inputs' dtype: checking the
    # inputs checks them
    fn = _kernel("bwd", grad.dtype, weights, [grad, *xs])
    if fn is None:
        return None
    grads = [alloc.empty(x.shape, x.dtype) if n else None for x, n in zip(xs, need_x, strict=True)]
    outs = [g for g in grads if g is not None]
    w = weights.contiguous()
    n, k = grad.numel(), len(xs)
    parts = ranges(n, k)
    dots = torch.zeros(len(parts), k, dtype=torch.float64) if need_w else None
    ptrs = native.pointers(xs)
    gptrs = native.pointers(grads) if outs else None
    nt = _nt(outs)
    calls = [
        (
            grad.data_ptr(),
            ptrs,
            w.data_ptr(),
            k,
            dots[r].data_ptr() if dots is not None else None,
            gptrs,
            a,
            b,
            nt,
        )
        for r, (a, b) in enumerate(parts)
    ]
    if any(native.run(fn, calls)):
        raise MemoryError("convexmix: out of memory for the backward's partial sums")
    return Grads(dots.sum(0).to(weights.dtype) if dots is not None else None, outs)
