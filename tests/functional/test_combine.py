"""convex_combination against naive autograd (float64), shapes, dtypes and errors."""

from __future__ import annotations

import pytest
import torch

import convexmix as cx
from convexmix.functional import _combine, convex_combination


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


# ------------------------------------------------------------ the blocked CPU kernels

BIG = 3 * (1 << 18) + 17  # more than three blocks, with a ragged end


@pytest.fixture
def fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernels whatever the size (BIG is below the composite path's limit)."""
    monkeypatch.setattr(_combine, "_force", "fused")


@pytest.mark.parametrize("layout", ["list", "stacked", "strided"])
@pytest.mark.parametrize("wkind", ["scalar", "per-channel", "per-sample"])
@pytest.mark.usefixtures("fused")
def test_blocked_kernels_match_float64(layout: str, wkind: str) -> None:
    k, rows, cols = 5, BIG // 7 + 1, 7
    base = rand(k, rows, cols, seed=20).float()
    if layout == "list":
        xs = [t.clone() for t in base]
    elif layout == "stacked":
        xs = base  # K along dim 0, contiguous
    else:
        xs = [t.T.contiguous().T for t in base]  # non-contiguous views
    shapes = {"scalar": (k,), "per-channel": (k, cols), "per-sample": (k, rows, 1)}
    w = torch.rand(*shapes[wkind], generator=torch.Generator().manual_seed(3)).requires_grad_()
    inputs = [t.requires_grad_() for t in (xs if isinstance(xs, list) else [xs])]
    out = convex_combination(w, inputs if isinstance(xs, list) else inputs[0])
    ref = sum(w.double()[i] * base[i].double() for i in range(k))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(4))
    out.backward(g)
    ref_gw = torch.stack(
        [(g.double() * base[i].double()).sum_to_size(shapes[wkind][1:]) for i in range(k)]
    )
    # float32 inputs: products rounded once (rel. 6e-8), summed by cascade then in float64,
    # so the error scales with sum |g x| (~5e5 here), as for naive float32 autograd.
    scale = float((g.double().abs() * base.detach().double().abs()).sum(dim=(1, 2)).max())
    torch.testing.assert_close(w.grad.double(), ref_gw, atol=4e-9 * scale, rtol=0)
    if layout == "list":
        for i in range(k):
            torch.testing.assert_close(inputs[i].grad, w.detach()[i] * g)


def test_gradients_only_where_needed() -> None:
    xs = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)]
    w = torch.tensor([0.3, 0.7])
    convex_combination(w, xs).sum().backward()
    torch.testing.assert_close(xs[0].grad, torch.full((4, 3), 0.3))
    assert xs[1].grad is None
    w2 = torch.tensor([0.3, 0.7], requires_grad=True)
    convex_combination(w2, [x.detach() for x in xs]).sum().backward()
    assert w2.grad is not None


def test_out_reuses_a_buffer() -> None:
    xs = [torch.randn(BIG) for _ in range(3)]
    w = torch.tensor([0.2, 0.3, 0.5])
    buf = torch.empty(BIG)
    res = convex_combination(w, xs, out=buf)
    assert res is buf
    torch.testing.assert_close(buf, 0.2 * xs[0] + 0.3 * xs[1] + 0.5 * xs[2])
    with pytest.raises(
        cx.ShapeError, match=r"out must have shape \(786449,\) and dtype torch.float32"
    ):
        convex_combination(w, xs, out=torch.empty(3))
    with pytest.raises(cx.ConvexMixError, match="out= does not support autograd"):
        convex_combination(w.requires_grad_(), xs, out=buf)


@pytest.mark.usefixtures("fused")
def test_half_inputs_over_many_blocks() -> None:
    xs = [torch.randn(BIG).to(torch.bfloat16) for _ in range(4)]
    w = torch.softmax(torch.randn(4), 0)
    out = convex_combination(w, xs)
    exact = sum(w[i].double() * xs[i].double() for i in range(4))
    assert out.dtype == torch.bfloat16
    assert (
        (out.double() - exact).abs() <= torch.finfo(torch.bfloat16).eps * exact.abs() + 1e-6
    ).all()


def test_compile_inductor_with_backward() -> None:
    def f(w: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
        return convex_combination(torch.softmax(w, 0), xs).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    w = torch.randn(3, requires_grad=True)
    xs = [torch.randn(5, 4, requires_grad=True) for _ in range(3)]
    grads = torch.autograd.grad(compiled(w, xs), [w, *xs])
    ref = torch.autograd.grad(f(w, xs), [w, *xs])
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------- issue 14: hardening regressions


@pytest.mark.parametrize("path", ["native", "aten"])
def test_out_overlapping_an_input_is_correct(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14.2: out=b (an input) was off by 1.06; a shifted view off by 2.08; with
    CONVEXMIX_NATIVE=0 even an exact alias was wrong and a partial overlap raised."""
    if path == "aten":
        from convexmix._kernels import native

        monkeypatch.setattr(native, "_state", {"lib": None})
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    w = torch.full((2, 5), 0.5)
    out = b.clone()
    convex_combination(w, [a, out], out=out)
    torch.testing.assert_close(out, 0.5 * a + 0.5 * b)
    base = torch.randn(4097, generator=gen)
    x0 = torch.randn(4096, generator=gen)
    expected = 0.3 * base[:-1] + 0.7 * x0
    convex_combination(torch.tensor([0.3, 0.7]), [base[:-1], x0], out=base[1:])
    torch.testing.assert_close(base[1:], expected)
    weights = torch.tensor([0.25, 0.75])
    with pytest.raises(cx.ConvexMixError, match="out must not have overlapping elements"):
        convex_combination(weights, [torch.ones(3)] * 2, out=torch.zeros(1).expand(3))


def test_empty_inputs_give_empty_outputs() -> None:
    """Issue 14.6: empty inputs raised "range() arg 3 must not be zero" (the range splitter)."""
    w = torch.tensor([0.5, 0.5], requires_grad=True)
    xs = [torch.zeros(0, 4, requires_grad=True) for _ in range(2)]
    out = convex_combination(w, xs)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert w.grad is not None
    assert (w.grad == 0).all()
    assert xs[0].grad is not None
    assert xs[0].grad.shape == (0, 4)
    plain = [x.detach() for x in xs]
    assert convex_combination(w.detach(), plain, out=torch.empty(0, 4)).shape == (0, 4)
    assert cx.WeightedSum(3)([torch.zeros(0, 4)] * 3).shape == (0, 4)


def test_bad_kinds_of_inputs_are_clear_errors() -> None:
    """Issue 14.12: K = 0, complex weights (imaginary part dropped) and sparse tensors."""
    with pytest.raises(cx.ShapeError, match=r"hold no input along dim=0; expected K >= 1\."):
        convex_combination(torch.zeros(0), torch.zeros(0, 5))
    with pytest.raises(cx.ConvexMixError, match=r"dense real tensor; got torch\.complex64"):
        convex_combination(torch.tensor([0.5 + 1j, 0.5]), [torch.ones(3)] * 2)
    with pytest.raises(cx.ConvexMixError, match=r"dense real tensor; got torch\.sparse_coo"):
        convex_combination(torch.tensor([0.5, 0.5]).to_sparse(), [torch.ones(3)] * 2)
    with pytest.raises(cx.ConvexMixError, match=r"dense \(strided\) tensors; got layout"):
        convex_combination(torch.tensor([0.5, 0.5]), [torch.ones(3).to_sparse()] * 2)
