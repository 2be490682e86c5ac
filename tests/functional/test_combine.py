"""convex_combination against naive autograd (float64), shapes, dtypes and errors."""

from __future__ import annotations

import pytest
import torch

import convexmix as cx
from convexmix.functional import convex_combination


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("wshape", [(4,), (4, 6), (4, 3, 1), (4, 1, 6), (4, 3, 6)])
def test_values_and_grads_match_naive(wshape: tuple[int, ...]) -> None:
    w = rand(*wshape, seed=1).requires_grad_()
    xs = [rand(3, 6, seed=10 + k).requires_grad_() for k in range(4)]
    out = convex_combination(w, xs)
    w_naive = w.reshape(4, *wshape[1:])
    naive = sum(w_naive[k] * xs[k] for k in range(4))
    torch.testing.assert_close(out, naive)
    g = rand(3, 6, seed=2)
    grads = torch.autograd.grad((out * g).sum(), [w, *xs])
    naive_grads = torch.autograd.grad((naive * g).sum(), [w, *xs])
    for a, b in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_stacked_inputs_along_any_dim(dim: int) -> None:
    x = rand(5, 4, 3, seed=3)
    k = x.shape[dim]
    w = rand(k, seed=4)
    expected = (x * w.reshape([k if i == dim % 3 else 1 for i in range(3)])).sum(dim)
    torch.testing.assert_close(convex_combination(w, x, dim=dim), expected)


def test_gradcheck() -> None:
    w = rand(3, 2, seed=5).requires_grad_()
    xs = [rand(4, 2, seed=6 + k).requires_grad_() for k in range(3)]
    assert torch.autograd.gradcheck(lambda w, *xs: convex_combination(w, list(xs)), (w, *xs))


def test_non_contiguous_inputs() -> None:
    base = rand(6, 8, seed=7)
    xs = [base.T, (base * 2).T, base.T[:, ::1]]
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    torch.testing.assert_close(convex_combination(w, xs), (0.2 + 0.6 + 0.5) * base.T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype: torch.dtype) -> None:
    xs = [torch.randn(64, 32).to(dtype) for _ in range(16)]
    w = torch.softmax(torch.randn(16), 0)
    out = convex_combination(w, xs)
    assert out.dtype == dtype
    exact = sum(w[k].double() * xs[k].double() for k in range(16))
    # one rounding of the result: half an ulp of the output dtype, relative
    eps = torch.finfo(dtype).eps
    assert ((out.double() - exact).abs() <= eps * exact.abs() + 1e-6).all()


def test_compile_fullgraph() -> None:
    f = torch.compile(lambda w, xs: convex_combination(w, xs), fullgraph=True, backend="aot_eager")
    w = torch.tensor([0.5, 0.5])
    xs = [torch.ones(3), torch.zeros(3)]
    torch.testing.assert_close(f(w, xs), torch.full((3,), 0.5))


def test_errors() -> None:
    xs = [torch.randn(2, 3) for _ in range(3)]
    with pytest.raises(
        cx.ShapeError, match=r"weights must have shape \(K, \.\.\.\) with K=3 inputs; got \(2,\)"
    ):
        convex_combination(torch.ones(2), xs)
    with pytest.raises(cx.ShapeError, match=r"do not broadcast against inputs of shape \(2, 3\)"):
        convex_combination(torch.ones(3, 4), xs)
    with pytest.raises(cx.ShapeError, match=r"same shape; got \[\(2, 3\), \(2, 3\), \(3, 3\)\]"):
        convex_combination(torch.ones(3), [*xs[:2], torch.randn(3, 3)])
    with pytest.raises(cx.ConvexMixError, match="non-empty list/tuple"):
        convex_combination(torch.ones(1), [])
    with pytest.raises(cx.ConvexMixError, match="same dtype"):
        convex_combination(torch.ones(2), [xs[0], xs[1].double()])
    with pytest.raises(cx.ConvexMixError, match=r"inputs\[1\] must be a tensor; got int"):
        convex_combination(torch.ones(2), [xs[0], 3])  # type: ignore[list-item]
