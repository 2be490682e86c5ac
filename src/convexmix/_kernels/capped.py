"""The capped-simplex projection, row by row (``capped.c``), for the bounded maps."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from convexmix._kernels import native
from convexmix._validation import plain

__all__: list[str] = []

#: Below this many elements the capped projection runs on one thread.
CAPPED_PARALLEL_MIN = 1 << 16
#: Rows the kernel searches in lockstep (``CX_LANES`` in ``capped.c``): a thread's range
#: of rows starts at a multiple of it.
CAPPED_LANES = 16
_SCALAR = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_NAMES = {torch.float32: "cx_capped_f32", torch.float64: "cx_capped_f64"}


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
    return _run(fn, out, rows, k, args, args2)


def _run(
    fn: native.Kernel,
    out: Tensor,
    rows: int,
    k: int,
    args: tuple[int, ...],
    args2: tuple[int | float, ...],
) -> Tensor | None:
    """``fn`` over the rows (cut into ranges for the threads where the work is large
    enough, each starting at a multiple of :data:`CAPPED_LANES`); its return codes."""
    n = rows * k if rows > 1 else 0
    if n < CAPPED_PARALLEL_MIN or torch.get_num_threads() == 1:
        rcs = [fn(*args, *args2, 0, rows)]
    else:
        parts = native.split(rows, torch.get_num_threads(), CAPPED_LANES)
        rcs = native.run(fn, [(*args, *args2, a, b) for a, b in parts])
    if any(rc == 2 for rc in rcs):
        raise MemoryError("convexmix: out of memory for the capped projection's scratch")
    if any(rc == 3 for rc in rcs):
        raise InfeasibleError
    return None if any(rcs) else out


def capped_scalar(x: Tensor, k: int, lower: float, upper: float, total: float) -> Tensor | None:
    """:func:`capped` of the rows of ``k`` entries of ``x`` (a plain contiguous CPU
    float32/64 tensor of any shape whose last dim is the rows', with the kernels loaded:
    :func:`capped_applies`), with bounds that are the same for every entry, given as
    floats (in ``x``'s dtype's range: a finite ``lower <= upper``, ``upper`` possibly
    inf): no bound tensors, no views. None where the kernel leaves the rows to the caller
    (NaN, +inf); raises :class:`InfeasibleError`."""
    fn = native.kernel(_NAMES[x.dtype])
    if fn is None:
        return None
    rows = x.numel() // k
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    scalar = _SCALAR[x.dtype]
    lo, up = scalar(lower), scalar(upper)
    args = (x.data_ptr(), out.data_ptr(), k, ctypes.addressof(lo), 0, 0)
    args2 = (ctypes.addressof(up), 0, 0, float(total))
    return _run(fn, out, rows, k, args, args2)
