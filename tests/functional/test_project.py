"""project_simplex against a brute-force projection, for every method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import convexmix as cx
from convexmix.functional import project_simplex
from tests.reference import apply_rows, projection_bruteforce

METHODS = ["sort", "bisect", "condat", "auto"]


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("total", [1.0, 0.25, 5.0])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0])
def test_matches_bruteforce(method: str, total: float, scale: float) -> None:
    x = rand(30, 6, seed=1, scale=scale)
    ref = apply_rows(projection_bruteforce, x.numpy(), total)
    np.testing.assert_allclose(
        project_simplex(x, total=total, method=method).numpy(), ref, atol=1e-12 * max(scale, 1)
    )


@pytest.mark.parametrize("method", METHODS)
def test_ties_n1_extremes_and_minus_inf(method: str) -> None:
    x = torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.5],  # ties: uniform
            [1e4, 1e4, -1e4, 0.0],  # large: two equal winners
            [-math.inf, 2.0, -math.inf, 1.0],  # -inf entries get 0
            [-math.inf] * 4,  # nothing present: zeros
        ],
        dtype=torch.float64,
    )
    out = project_simplex(x, method=method)
    expected = torch.tensor(
        [[0.25] * 4, [0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0] * 4], dtype=torch.float64
    )
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(
        project_simplex(torch.tensor([[-7.0]]), method=method, total=3.0), torch.tensor([[3.0]])
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_any_dim_and_idempotence(method: str, dim: int) -> None:
    x = rand(4, 5, 6, seed=2)
    out = project_simplex(x, dim, total=2.0, method=method)
    expected = project_simplex(x.movedim(dim, -1), total=2.0, method="sort").movedim(-1, dim)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(project_simplex(out, dim, total=2.0, method=method), out)
    torch.testing.assert_close(out.sum(dim), torch.full_like(out.sum(dim), 2.0))


def test_methods_agree_on_long_rows_in_float32() -> None:
    gen = torch.Generator().manual_seed(7)
    for scale in (1e-4, 1.0, 1e3):
        x = torch.randn(3, 200_000, generator=gen) * scale
        a = project_simplex(x, method="sort")
        b = project_simplex(x, method="bisect")
        c = project_simplex(x, method="condat")
        # The threshold is a float64 sum over the support, in a different order per
        # method: the outputs agree to an ulp or two of float32 (most of them exactly).
        ulps = {"rtol": 2.4e-7, "atol": 1e-12 * scale}
        torch.testing.assert_close(a, b, **ulps)
        torch.testing.assert_close(a, c, **ulps)
        assert (a != b).float().mean() < 1e-3
        assert abs(b.double().sum(-1) - 1).max() < 1e-6


@pytest.mark.parametrize("rows", [1, 3, 128, 129, 300])
@pytest.mark.parametrize("total", [1.0, 3.0])
def test_condat_row_by_row_and_batched_paths(rows: int, total: float) -> None:
    """Up to 128 rows run Condat's filter on Python floats, more rows on tensors."""
    x = rand(rows, 9, seed=rows, scale=2.0)
    x[0, 2] = x[0, 5]  # a tie
    x[-1, 0] = -math.inf
    ref = apply_rows(projection_bruteforce, np.where(np.isinf(x.numpy()), -1e3, x.numpy()), total)
    out = project_simplex(x, total=total, method="condat")
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("method", ["sort", "bisect", "condat"])
def test_gradcheck_and_sparsemax_jacobian(method: str) -> None:
    x = rand(3, 5, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: project_simplex(t, total=1.5, method=method), (x,))
    v = rand(6, seed=4)
    p = project_simplex(v, method=method)
    s = (p > 0).double()
    jac = torch.func.jacrev(lambda t: project_simplex(t, method=method))(v)
    torch.testing.assert_close(jac, torch.diag(s) - torch.outer(s, s) / s.sum())


def test_compile_fullgraph() -> None:
    f = torch.compile(
        lambda t: (
            project_simplex(t, method="bisect")
            + project_simplex(t, method="sort")
            + project_simplex(t, method="condat")
        ),
        fullgraph=True,
        backend="aot_eager",
    )
    x = torch.randn(4, 9)
    torch.testing.assert_close(f(x), 3 * project_simplex(x))


def test_errors() -> None:
    with pytest.raises(
        cx.ConvexMixError,
        match=r"method must be one of \['auto', 'sort', 'bisect', 'condat'\]; got 'quick'",
    ):
        project_simplex(torch.randn(3), method="quick")
    with pytest.raises(cx.ConvexMixError, match=r"total must be finite and > 0; got 0.0"):
        project_simplex(torch.randn(3), total=0.0)


@pytest.mark.parametrize("method", ["bisect", "condat"])
def test_vmap_matches_a_loop(method: str) -> None:
    x = rand(3, 4, 6, seed=9)
    f = lambda t: project_simplex(t, dim=0, total=2.0, method=method)  # noqa: E731
    out = torch.func.vmap(f, in_dims=2, out_dims=2)(x)
    torch.testing.assert_close(out, torch.stack([f(x[..., j]) for j in range(6)], dim=2))
