"""The ensemble's true-class gather (``gather.c``): one read of K models' predictions."""

from __future__ import annotations

import torch
from torch import Tensor

from convexmix._kernels import native
from convexmix._validation import plain

__all__: list[str] = []

#: Below this many elements read (K * N * C) one thread reads every model.
GATHER_PARALLEL_MIN = 1 << 22


def true_class(
    p: Tensor, t: Tensor, q: Tensor, floor: float, check: bool, atol: float
) -> int | None:
    """``q[k, i] = max(p[k, i, t[i]], floor)`` for the contiguous (K, N, C) CPU ``p``
    (float32/64), the int64 (N,) ``t`` and the (K, N) ``q`` of p's dtype, in one read of p;
    with ``check``, also whether every value is >= 0 and every row sums to 1 within
    ``atol``. Returns -1 (done, all checks hold), the first model that fails a check, or
    None (nothing done) where the native path does not apply."""
    suffix = native.SUFFIX.get(p.dtype)
    if (
        suffix not in ("f32", "f64")
        or p.dim() != 3
        or p.device.type != "cpu"
        or not p.is_contiguous()
        or not q.is_contiguous()
        or q.dtype != p.dtype
        or t.dtype != torch.int64
        or not t.is_contiguous()
        or not plain([p, t, q])
    ):
        return None
    fn = native.kernel(f"cx_true_class_{suffix}")
    if fn is None:
        return None
    K, n, c = p.shape
    args = (p.data_ptr(), t.data_ptr(), n, c, q.data_ptr())
    rest = (float(floor), int(check), float(atol))
    parts = native.split(K, native.threads(p.numel(), GATHER_PARALLEL_MIN))
    rcs = native.run(fn, [(*args, a, b, *rest) for a, b in parts])
    bad = [rc for rc in rcs if rc >= 0]
    return min(bad) if bad else -1
