"""The capped-simplex projection, row by row (``capped.c``), for the bounded maps."""

from __future__ import annotations

import torch
from torch import Tensor

from convexmix._kernels import native
from convexmix._validation import plain

__all__: list[str] = []

#: Below this many elements the capped projection runs on one thread.
CAPPED_PARALLEL_MIN = 1 << 16


class InfeasibleError(Exception):
    """A row's bounds cannot meet the total (the caller raises its own error)."""


def capped_applies(x: Tensor) -> bool:
    """Whether :func:`capped` runs for ``x`` (CPU float32/64, kernels loaded)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and (native.library() is not None)
    )


def capped(x: Tensor, lower: Tensor, upper: Tensor, total: float) -> Tensor | None:
    """The capped-simplex projection of each row of the contiguous 2-D CPU ``x``
    (float32/64) onto ``{lower <= p <= upper, sum p = total}`` (absent entries, -inf, are
    0), with ``lower``/``upper`` of x's dtype, shaped (1|R, 1|K); None (nothing done)
    where the native path does not apply or the row holds values it leaves to the caller
    (NaN, +inf, a bound of -inf). Raises :class:`InfeasibleError` where a row's bounds cannot
    meet ``total``."""
    suffix = native.SUFFIX.get(x.dtype)
    if suffix not in ("f32", "f64") or x.dim() != 2 or not x.is_contiguous():
        return None
    if not plain([x, lower, upper]):
        return None
    fn = native.kernel(f"cx_capped_{suffix}")
    if fn is None:
        return None
    rows, k = x.shape
    out = torch.empty_like(x)

    def strides(b: Tensor) -> tuple[int, int]:
        return (b.stride(0) if b.shape[0] > 1 else 0), (b.stride(1) if b.shape[1] > 1 else 0)

    (lrs, lcs), (urs, ucs) = strides(lower), strides(upper)
    args = (x.data_ptr(), out.data_ptr(), k, lower.data_ptr(), lrs, lcs)
    args2 = (upper.data_ptr(), urs, ucs, float(total))
    parts = native.split(rows, native.threads(rows * k if rows > 1 else 0, CAPPED_PARALLEL_MIN))
    rcs = native.run(fn, [(*args, *args2, a, b) for a, b in parts])
    if any(rc == 2 for rc in rcs):
        raise MemoryError("convexmix: out of memory for the capped projection's scratch")
    if any(rc == 3 for rc in rcs):
        raise InfeasibleError
    return None if any(rcs) else out
