"""Sparsemax and 1.5-entmax, row by row (``rows.c``), for the sparse maps."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from convexmix._kernels import native
from convexmix._validation import PLAIN

__all__: list[str] = []

#: Below this many elements one thread does a whole map call (``rows.c``): the forward
#: costs ~10 ns a row plus ~1-2 ns an element, the backward ~1 ns an element, against
#: ~30 us to hand a range to the pool.
ROWS_PARALLEL_MIN = 1 << 15
ROWS_BWD_PARALLEL_MIN = 1 << 17
#: Rows of the maps' native kernels: sparsemax (0) and 1.5-entmax (1).
SPARSEMAX, ENTMAX15 = 0, 1
#: False turns the maps' native path off (tests force the ATen path with it).
rows_enabled = True
_ROW_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _rows_kernels(x: Tensor) -> tuple[native.Kernel, native.Kernel] | None:
    """The (forward, backward) row kernels for ``x``, or None where they do not apply:
    a plain contiguous CPU float32/float64 tensor, the kernels loaded and enabled."""
    if not rows_enabled or x.__class__ not in PLAIN or not x.is_cpu or not x.is_contiguous():
        return None
    lib, dtype = native.library(), x.dtype
    found = _FOUND.get(dtype)
    if found is None or found[0] is not lib:  # first call, or another library since
        suffix = _ROW_SUFFIX.get(dtype)
        if suffix is None:
            return None
        fwd, bwd = native.kernel(f"cx_rows_fwd_{suffix}"), native.kernel(f"cx_rows_bwd_{suffix}")
        found = _FOUND[dtype] = (lib, None if fwd is None or bwd is None else (fwd, bwd))
    return found[1]


#: dtype -> (the library they came from, the kernels or None), looked up once per library
_FOUND: dict[torch.dtype, tuple[object, tuple[native.Kernel, native.Kernel] | None]] = {}


def rows_apply(x: Tensor) -> bool:
    """Whether :func:`rows_forward` runs for ``x``."""
    return _rows_kernels(x) is not None


def _row_split(rows: int) -> list[tuple[int, int]]:
    return native.split(rows, torch.get_num_threads())


def _row_layout(shape: torch.Size, dim: int, n: int) -> tuple[int, int, int]:
    """(K, inner, rows) of a contiguous tensor of ``shape`` and ``n > 0`` elements with its
    slices along ``dim``: slice r starts at ``(r // inner) * K * inner + r % inner``."""
    if dim < 0:
        dim += len(shape)
    k = shape[dim]
    return k, math.prod(shape[dim + 1 :]), n // k


def rows_forward(x: Tensor, dim: int, total: float, kind: int) -> Tensor | None:
    """Sparsemax (``kind`` 0) or 1.5-entmax (1) of ``x`` along ``dim`` (non-negative)
    natively, summing to ``total``; None (nothing done) where the kernel does not apply."""
    kernels = _rows_kernels(x)
    if kernels is None:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    n = x.numel()
    if n == 0:
        return out
    k, inner, rows = _row_layout(x.shape, dim, n)
    fn, xp, op = kernels[0], x.data_ptr(), out.data_ptr()
    if n < ROWS_PARALLEL_MIN:
        rc = fn(xp, op, k, inner, total, kind, 0, rows)
    else:
        rc = max(
            native.run(fn, [(xp, op, k, inner, total, kind, a, b) for a, b in _row_split(rows)])
        )
    if rc:
        raise MemoryError("convexmix: out of memory for the map's scratch")
    return out


def rows_backward(y: Tensor, grad: Tensor, dim: int, kind: int) -> Tensor | None:
    """The vector-Jacobian product of sparsemax (``kind`` 0) or 1.5-entmax (1) from its
    output ``y`` natively; None (nothing done) where the kernel does not apply."""
    kernels = _rows_kernels(y)
    if kernels is None or grad.dtype != y.dtype or grad.shape != y.shape:
        return None
    if grad.__class__ not in PLAIN or not grad.is_cpu:
        return None
    grad = grad.contiguous()  # an expanded gradient: one copy beats the ATen path
    out = torch.empty(y.shape, dtype=y.dtype)
    n = y.numel()
    if n == 0:
        return out
    k, inner, rows = _row_layout(y.shape, dim, n)
    fn, yp, gp, op = kernels[1], y.data_ptr(), grad.data_ptr(), out.data_ptr()
    if n < ROWS_BWD_PARALLEL_MIN:
        fn(yp, gp, op, k, inner, kind, 0, rows)
    else:
        native.run(fn, [(yp, gp, op, k, inner, kind, a, b) for a, b in _row_split(rows)])
    return out
