"""The native NaN scan behind softmax's check (``checks.c``) against numpy, and softmax's
special slices (all -inf, +inf, NaN) along every dim, with the scan and without it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from convexmix._kernels import checks, native
from convexmix.functional import _softmax, softmax

pytestmark = pytest.mark.skipif(native.library() is None, reason="no native kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 8, 1), (5, 3, 1), (1, 4, 7), (6, 5, 9)])
def test_first_nan_reads_the_first_entry_of_each_slice(
    dtype: torch.dtype, shape: tuple[int, int, int]
) -> None:
    scan = checks.first_nan(dtype)
    assert scan is not None
    outer, k, inner = shape
    rng = np.random.default_rng(sum(shape))
    for trial in range(30):
        x = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
        flat = x.view(-1)
        for i in rng.choice(flat.numel(), size=trial % 4, replace=True):
            flat[int(i)] = math.nan
        expected = bool(np.isnan(x.numpy()[:, 0, :]).any())
        assert bool(scan(x.data_ptr(), outer, k * inner, inner)) == expected


def test_first_nan_is_there_for_float32_and_float64_only() -> None:
    assert checks.first_nan(torch.float16) is None
    assert checks.first_nan(torch.bfloat16) is None


def reference_softmax(x: np.ndarray, dim: int) -> np.ndarray:
    """softmax along ``dim`` in float64: all--inf slices 0, +inf entries share the mass,
    a NaN fills its slice."""
    z = np.moveaxis(x.astype(np.float64), dim, -1)
    out = np.zeros_like(z)
    for idx in np.ndindex(z.shape[:-1]):
        row = z[idx]
        if np.isnan(row).any():
            out[idx] = np.nan
        elif np.isposinf(row).any():
            out[idx] = np.isposinf(row) / np.isposinf(row).sum()
        elif np.isneginf(row).all():
            out[idx] = 0.0
        else:
            e = np.exp(row - row.max())
            out[idx] = e / e.sum()
    return np.moveaxis(out, -1, dim)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_softmax_special_slices_along_every_dim(
    scan: bool, dtype: torch.dtype, dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not scan:  # the sum that runs where the scan does not apply
        monkeypatch.setattr(_softmax, "_SCANS", {dtype: None})
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((4, 5, 6))
    z = np.moveaxis(x, dim, -1)  # a view: slices along dim are its last axis
    z[0, 0] = -np.inf  # an all--inf slice
    z[1, 1, :2] = np.inf  # two +inf entries share the mass
    z[2, 2, 3] = np.nan  # a NaN fills its slice
    z[3, 0, 1:] = -np.inf  # one entry left: it takes all the mass
    t = torch.from_numpy(x).to(dtype)
    for inp in (t, t.transpose(0, 2).contiguous().transpose(0, 2)):  # and non-contiguous
        out = softmax(inp, dim)
        np.testing.assert_allclose(
            out.double().numpy(), reference_softmax(x, dim), rtol=1e-6, atol=1e-7
        )
    # the usual case: no special slice, torch.softmax's own output
    clean = torch.randn(4, 5, 6, dtype=dtype)
    torch.testing.assert_close(softmax(clean, dim), torch.softmax(clean, dim))
