"""The native (C) capped-simplex projection against the torch loop and the float64
bisection reference: ties, bounds at the edges, lower == upper, totals at the
feasibility limits, absent entries, float32, per-entry bounds of every broadcast shape."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import convexmix as cx
from convexmix._kernels import capped, native
from convexmix.functional import project_simplex, sparsemax
from tests.reference import capped_projection_ref
from tests.spies import results_of

pytestmark = pytest.mark.skipif(native.library() is None, reason="no native kernels")


def torch_path(
    monkeypatch: pytest.MonkeyPatch, *args: object, fn: object = project_simplex, **kwargs: object
) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(capped, "capped", lambda *a: None)
        m.setattr(capped, "capped_scalar", lambda *a: None)  # the number-bound path
        return fn(*args, **kwargs)  # type: ignore[no-any-return, operator]


def ref_rows(x: torch.Tensor, lower: object, upper: object, total: float) -> np.ndarray:
    xs = x.double().numpy()
    lo = np.broadcast_to(np.asarray(lower, dtype=np.float64), xs.shape)
    up = np.broadcast_to(np.asarray(upper, dtype=np.float64), xs.shape)
    return np.stack([capped_projection_ref(xs[i], lo[i], up[i], total) for i in range(xs.shape[0])])


def test_native_path_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = results_of(monkeypatch, capped, "capped")
    lean = results_of(monkeypatch, capped, "capped_scalar")
    x = torch.randn(3, 5, dtype=torch.float64)
    project_simplex(x, upper=0.4)  # number bounds, no gradient: straight to the kernel
    assert [r is not None for r in lean] == [True]
    assert not calls
    project_simplex(x, upper=torch.tensor(0.4, dtype=torch.float64))  # tensor bounds
    assert [r is not None for r in calls] == [True]
    project_simplex(x.requires_grad_(), upper=0.4)  # a gradient: the full path, natively
    assert [r is not None for r in calls] == [True, True]
    assert len(lean) == 1


CASES = [
    # (rows, k, lower, upper, total)
    (7, 10, 0.0, 0.15, 1.0),
    (3, 1000, 0.0, 1.5e-3, 1.0),
    (5, 50, -0.1, 0.3, 1.0),
    (4, 20, 0.0, math.inf, 2.5),
    (4, 20, 0.02, math.inf, 1.0),
    (6, 8, 0.0, 0.125, 1.0),  # total == K * upper: every entry at the cap
    (6, 8, 0.125, 0.5, 1.0),  # total == K * lower: every entry at the floor
    (2, 1, 0.0, 1.0, 1.0),
    (3, 4, 0.25, 0.25, 1.0),  # lower == upper
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", range(5))
def test_native_matches_reference_and_torch(
    monkeypatch: pytest.MonkeyPatch, case: tuple, dtype: torch.dtype, seed: int
) -> None:
    rows, k, lo, up, total = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    if seed % 2:  # ties: a few distinct values
        x = torch.round(x * 2) / 2
    x = x.to(dtype)
    y = project_simplex(x, -1, total=total, lower=lo, upper=up)
    ref = ref_rows(x, lo, up, total)
    tol = 1e-9 if dtype == torch.float64 else 2e-6
    assert np.abs(y.double().numpy() - ref).max() <= tol
    yt = torch_path(monkeypatch, x, -1, total=total, lower=lo, upper=up)
    assert (y.double() - yt.double()).abs().max() <= tol
    assert y.dtype == dtype
    s = y.double().sum(-1)
    assert torch.allclose(
        s, torch.full_like(s, total), atol=1e-9 if dtype == torch.float64 else 1e-5
    )


@pytest.mark.parametrize("shape", ["full", "column", "row", "scalar_up"])
def test_native_tensor_bounds(monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    g = torch.Generator().manual_seed(1)
    rows, k = 6, 40
    x = torch.randn(rows, k, generator=g, dtype=torch.float64) * 3
    u_full = torch.rand(rows, k, generator=g, dtype=torch.float64) * 0.08 + 0.03
    l_full = torch.rand(rows, k, generator=g, dtype=torch.float64) * 0.01
    if shape == "full":
        lo, up = l_full, u_full
    elif shape == "column":  # one bound per entry, the same in every row
        lo, up = l_full[:1], u_full[:1]
    elif shape == "row":  # one bound per row
        lo, up = l_full[:, :1], u_full[:, :1]
    else:
        lo, up = l_full, 0.05
    y = project_simplex(x, -1, lower=lo, upper=up)
    ref = ref_rows(x, lo, up, 1.0)
    assert np.abs(y.numpy() - ref).max() <= 1e-9
    yt = torch_path(monkeypatch, x, -1, lower=lo, upper=up)
    assert (y - yt).abs().max() <= 1e-9


def test_native_other_dim_and_absent_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    up = torch.rand(30, 1, generator=g, dtype=torch.float64) * 0.1 + 0.05
    y = project_simplex(x, 0, upper=up)
    ref = ref_rows(x.T.contiguous(), 0.0, up.T, 1.0).T
    assert np.abs(y.numpy() - ref).max() <= 1e-9
    mask = torch.rand(4, 30, generator=g) > 0.3
    mask[:, 0] = True
    z = x.T.contiguous()
    y = sparsemax(z, -1, upper=0.3, mask=mask)
    yt = torch_path(monkeypatch, z, -1, fn=sparsemax, upper=0.3, mask=mask)
    assert (y - yt).abs().max() <= 1e-9
    assert (y[~mask] == 0).all()


def test_native_large_row_and_many_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 200_000, generator=g, dtype=torch.float64)
    y = project_simplex(x, -1, upper=1.5 / 200_000)
    ref = ref_rows(x, 0.0, 1.5 / 200_000, 1.0)
    assert np.abs(y.numpy() - ref).max() <= 1e-9
    x = torch.randn(3000, 30, generator=g, dtype=torch.float64)  # split over threads
    y = project_simplex(x, -1, upper=0.05)
    yt = torch_path(monkeypatch, x, -1, upper=0.05)
    assert (y - yt).abs().max() <= 1e-9


def test_native_falls_back_on_nonfinite_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(3, 6, dtype=torch.float64)
    y = project_simplex(x, -1, lower=-math.inf, upper=0.3)
    yt = torch_path(monkeypatch, x, -1, lower=-math.inf, upper=0.3)
    torch.testing.assert_close(y, yt)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"upper": 0.1}, "sum of upper"),
        ({"lower": 0.3}, "sum of lower"),
        ({"lower": 0.3, "upper": 0.2}, "lower must be <= upper"),
    ],
)
@pytest.mark.parametrize("k", [5, 5000])
def test_native_infeasible_bounds_raise(kwargs: dict, match: str, k: int) -> None:
    x = torch.randn(3, k, dtype=torch.float64)
    if k > 5:
        kwargs = {n: v * 5 / k for n, v in kwargs.items()}
    with pytest.raises(cx.ConvexMixError, match=match):
        project_simplex(x, -1, **kwargs)
