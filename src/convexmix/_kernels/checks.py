"""Scans for the maps' special values (``checks.c``): the softmax's NaN check."""

from __future__ import annotations

import torch

from convexmix._kernels import native

__all__: list[str] = []


def first_nan(dtype: torch.dtype) -> native.Kernel | None:
    """``cx_first_nan_<t>(ptr, outer, block, inner)`` (``checks.c``) for contiguous CPU
    values of ``dtype`` (float32/64): whether the first entry of any slice is NaN. None
    where it does not apply (another dtype, no native kernels)."""
    suffix = native.SUFFIX.get(dtype)
    return native.kernel(f"cx_first_nan_{suffix}") if suffix in ("f32", "f64") else None
