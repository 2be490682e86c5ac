"""Bounded and sparse weights: the capped projection, constrained softmax/sparsemax, the
k-sparse simplex and the l1 ball, against independent float64 references."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import convexmix as cx
from convexmix.functional import (
    project_l1_ball,
    project_simplex,
    project_sparse_simplex,
    softmax,
    sparsemax,
)
from tests.reference import (
    capped_projection_ref,
    constrained_softmax_ref,
    l1_ball_ref,
    sparse_projection_bruteforce,
)


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ------------------------------------------------------------------ capped projection


@pytest.mark.parametrize("seed", range(40))
def test_capped_projection_matches_bisection_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows, k = 3, int(torch.randint(1, 30, (), generator=g))
    x = rand(rows, k, seed=seed, scale=float(torch.rand((), generator=g)) * 5 + 0.01)
    total = float(torch.rand((), generator=g)) * 3 + 0.1
    kind = seed % 4
    if kind == 0:  # scalar cap
        lower, upper = 0.0, 1.5 * total / k
    elif kind == 1:  # per-entry box
        lower = torch.rand(k, generator=g, dtype=torch.float64) * total / k
        upper = lower + torch.rand(k, generator=g, dtype=torch.float64) * total
    elif kind == 2:  # per-row-and-entry cap, no lower
        lower, upper = None, torch.rand(rows, k, generator=g, dtype=torch.float64) + total / k
    else:  # negative lower bound, no cap
        lower, upper = -0.2, None
    p = project_simplex(x, total=total, lower=lower, upper=upper)
    lo = 0.0 if lower is None else lower
    up = math.inf if upper is None else upper
    for r in range(rows):
        lo_r = lo if not isinstance(lo, torch.Tensor) else lo.numpy()
        up_r = up if not isinstance(up, torch.Tensor) else up.expand(rows, k)[r].numpy()
        ref = capped_projection_ref(x[r].numpy(), lo_r, up_r, total)
        assert np.abs(p[r].numpy() - ref).max() <= 1e-9


@pytest.mark.parametrize("shape", [(1, 100_000), (50, 2000), (4000, 10)])
def test_capped_projection_exact_on_long_rows(shape: tuple[int, int]) -> None:
    x = rand(*shape, seed=1)
    k = shape[1]
    p = project_simplex(x, upper=2.0 / k)
    for r in range(0, shape[0], max(1, shape[0] // 5)):
        ref = capped_projection_ref(x[r].numpy(), 0.0, 2.0 / k)
        assert np.abs(p[r].numpy() - ref).max() <= 1e-9
    assert (p.sum(-1) - 1).abs().max() <= 1e-12
    p32 = project_simplex(x.float(), upper=2.0 / k)
    assert (p32.double() - p).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("rows", "k"), [(8, 1), (9, 2), (16, 10), (17, 33), (40, 64), (33, 300), (16, 1000)]
)
@pytest.mark.parametrize("bounds", ["cap", "box", "per_row", "negative_lower"])
def test_capped_projection_of_many_rows_matches_reference(
    dtype: torch.dtype, rows: int, k: int, bounds: str
) -> None:
    """8+ rows with bounds that do not vary along a row (the native kernel's lockstep
    search, which drops the settled entries of long rows every few steps), with ties,
    absent entries, a row of only -inf and logits of mixed scales: each row against the
    float64 reference on the same values, and the torch path on the same rows."""
    g = torch.Generator().manual_seed(rows * 1009 + k)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    x = x * torch.tensor([0.01, 1.0, 100.0]).double().repeat(rows)[:rows, None]
    x[1::3, : k // 2] = x[1::3, :1]  # ties
    x[2::5, ::4] = -math.inf  # absent entries
    x[rows - 1] = -math.inf  # nothing present: zeros
    x = x.to(dtype)
    total = 1.25
    lower: float | torch.Tensor | None = None
    upper: float | torch.Tensor | None
    if bounds == "cap":  # feasible with a quarter of the entries absent
        upper = 2.5 * total / k
    elif bounds == "box":
        lower, upper = 0.25 * total / k, 3.0 * total / k
    elif bounds == "per_row":  # one cap a row, (rows, 1)
        upper = (torch.rand(rows, 1, generator=g, dtype=torch.float64) + 2.5) * total / k
        upper = upper.to(dtype)
    else:
        lower, upper = -0.5 / k, None
    p = project_simplex(x, total=total, lower=lower, upper=upper)
    xv = x.double().numpy()
    lo_v = np.broadcast_to(np.asarray(0.0 if lower is None else lower, np.float64), (rows, k))
    up_np = math.inf if upper is None else upper
    if isinstance(up_np, torch.Tensor):
        up_np = up_np.double().numpy()
    up_v = np.broadcast_to(np.asarray(up_np, np.float64), (rows, k))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for r in range(rows):
        present = xv[r] > -math.inf
        if not present.any():
            assert (p[r] == 0).all()
            continue
        lo_r, up_r = lo_v[r][present], up_v[r][present]
        if lower is not None:  # the bounds rounded as the op sees them
            lo_r = torch.tensor(lo_r).to(dtype).double().numpy()
        up_r = torch.tensor(up_r).to(dtype).double().numpy()
        ref = capped_projection_ref(xv[r][present], lo_r, up_r, total)
        got = p[r].double().numpy()
        assert np.abs(got[present] - ref).max() <= tol * max(1.0, np.abs(xv[r][present]).max())
        assert (got[~present] == 0).all()
    # the torch path (the fallback where the kernel does not apply) on the same rows
    from convexmix.functional import _capped

    z = x.masked_fill(x == -math.inf, -math.inf)
    lo_t = torch.full((1, 1), 0.0 if lower is None else float(lower), dtype=dtype)
    lo_t = lo_t.clamp_min(-torch.finfo(dtype).max)
    up_t = (
        upper.to(dtype).reshape(rows, 1)
        if isinstance(upper, torch.Tensor)
        else torch.full((1, 1), math.inf if upper is None else upper, dtype=dtype)
    )
    present = z > -math.inf
    lo_t = torch.where(present, lo_t, 0.0)
    up_t = torch.where(present, up_t, 0.0)
    q = _capped._capped_rows(z, lo_t, up_t, total, _capped.CAPPED_BISECT_STEPS)
    torch.testing.assert_close(p, q, atol=4 * tol, rtol=0)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_capped_projection_number_bounds_equal_tensor_bounds(data: st.DataObject) -> None:
    """Bounds given as numbers take a lean path (no bound tensors, the special values left
    to the kernel's checks); the same bounds as tensors take the full one: the same output
    (to the rounding), the same special values and the same errors, along any dim and on
    non-contiguous inputs."""
    rows, k = data.draw(st.integers(0, 20)), data.draw(st.integers(0, 12))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    special = st.sampled_from([0.0, 1.0, -math.inf, math.inf, math.nan, 1e4])
    values = st.one_of(st.floats(-10, 10, width=32), special)
    x = torch.tensor(
        data.draw(hnp.arrays(np.float64, (rows, k), elements=values)), dtype=dtype
    ).reshape(rows, k)
    dim = data.draw(st.sampled_from([-1, 0]))
    if data.draw(st.booleans()):  # non-contiguous
        x = x.T.contiguous().T
    lower = data.draw(st.sampled_from([None, 0.0, -0.25, 0.05, -math.inf]))
    upper = data.draw(st.sampled_from([None, 0.25, 0.5, 1.0, math.inf, 1e39]))
    total = data.draw(st.sampled_from([1.0, 2.5]))

    def call(lo: object, up: object) -> torch.Tensor | str:
        try:
            return project_simplex(x, dim, total=total, lower=lo, upper=up)  # type: ignore[arg-type]
        except cx.ConvexMixError as err:
            return str(err)

    def as_tensor(b: float | None) -> torch.Tensor | None:
        return None if b is None else torch.tensor(b, dtype=torch.float64)

    lean, full = call(lower, upper), call(as_tensor(lower), as_tensor(upper))
    if isinstance(lean, str) or isinstance(full, str):
        assert lean == full
        return
    # a negative lower bound becomes a per-entry tensor on the full path (absent entries
    # at 0), whose kernel pass sums in another order: equal to the rounding
    atol = 8 * torch.finfo(dtype).eps * total
    torch.testing.assert_close(lean, full, rtol=0, atol=atol, equal_nan=True)
    assert torch.equal(torch.isnan(lean), torch.isnan(full))


def test_capped_edge_cases() -> None:
    x = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    # sum(upper) == total: every entry at its cap
    torch.testing.assert_close(project_simplex(x, upper=1 / 3), torch.full((2, 3), 1 / 3).double())
    # sum(lower) == total: every entry at its lower bound
    torch.testing.assert_close(project_simplex(x, lower=1 / 3), torch.full((2, 3), 1 / 3).double())
    # -inf entries are absent (0), the rest meets the bounds; all -inf is zeros
    y = torch.tensor([[2.0, -math.inf, 1.0, 0.5], [-math.inf] * 4], dtype=torch.float64)
    p = project_simplex(y, upper=0.6)
    torch.testing.assert_close(p[0], torch.tensor([0.6, 0.0, 0.4, 0.0]).double())
    assert (p[1] == 0).all()
    # sparsemax with a mask is the same projection over the present entries
    mask = torch.tensor([True, False, True, True])
    q = sparsemax(torch.tensor([2.0, 5.0, 1.0, 0.5]).double(), mask=mask, upper=0.6)
    torch.testing.assert_close(q, p[0])
    # any dim, float32, tensor bounds broadcast along dim 0
    z = rand(5, 3, seed=2).float()
    up = torch.tensor([[0.5], [0.3], [0.4], [0.2], [0.6]])
    out = project_simplex(z, dim=0, upper=up)
    assert (out <= up + 1e-7).all()
    assert torch.allclose(out.sum(0), torch.ones(3))


def test_capped_gradcheck_and_jacobian() -> None:
    x = rand(3, 6, seed=3).requires_grad_()
    up = (torch.rand(6, dtype=torch.float64) * 0.5 + 0.25).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t, u: project_simplex(t, total=1.5, upper=u, lower=0.05), (x, up)
    )
    lo = torch.full((6,), 0.02, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, a: sparsemax(t, lower=a, upper=0.6), (x, lo))
    v = torch.tensor([1.0, 0.9, 0.3, 0.25, -2.0, 0.1], dtype=torch.float64)
    p = project_simplex(v, upper=0.4)
    free = ((p > 0) & (p < 0.4)).double()
    jac = torch.func.jacrev(lambda t: project_simplex(t, upper=0.4))(v)
    torch.testing.assert_close(jac, torch.diag(free) - torch.outer(free, free) / free.sum())


def test_capped_compile_and_vmap() -> None:
    f = torch.compile(
        lambda t: project_simplex(t, upper=0.3) + softmax(t, upper=0.3),
        fullgraph=True,
        backend="aot_eager",
    )
    x = torch.randn(4, 9)
    torch.testing.assert_close(f(x), project_simplex(x, upper=0.3) + softmax(x, upper=0.3))
    x = rand(3, 4, 6, seed=9)
    up = torch.rand(6, dtype=torch.float64) * 0.5 + 0.7
    g = lambda t, u: project_simplex(t, dim=0, total=2.0, upper=u)  # noqa: E731
    out = torch.func.vmap(g, in_dims=(2, 0), out_dims=2)(x, up)
    torch.testing.assert_close(out, torch.stack([g(x[..., j], up[j]) for j in range(6)], 2))
    h = lambda t: softmax(t, upper=0.4)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(h)(x[0]), h(x[0]))
    jac = torch.func.jacrev(h)(x[0, 0])
    assert jac.shape == (6, 6)


def test_infeasible_and_bad_bounds() -> None:
    x = torch.randn(2, 4)
    with pytest.raises(cx.ConvexMixError, match=r"sum of upper \(0\.8\) .* below total \(1\)"):
        project_simplex(x, upper=0.2)
    with pytest.raises(cx.ConvexMixError, match=r"sum of lower \(2\) exceeds total \(1\)"):
        sparsemax(x, lower=0.5)
    with pytest.raises(cx.ConvexMixError, match=r"sum of upper \(0\.9\) .* below total \(1\)"):
        softmax(x, upper=torch.tensor([0.3, 0.3, 0.2, 0.1]))
    with pytest.raises(cx.ConvexMixError, match=r"lower must be <= upper"):
        project_simplex(x, lower=0.3, upper=0.2)
    with pytest.raises(cx.ShapeError, match=r"upper of shape \(3,\) does not broadcast"):
        project_simplex(x, upper=torch.ones(3))
    with pytest.raises(cx.ConvexMixError, match=r"upper must be >= 0 for the softmax"):
        softmax(torch.randn(3), upper=torch.tensor([2.0, -0.1, 1.0]))


# ---------------------------------------------------------------- constrained softmax


@pytest.mark.parametrize("seed", range(20))
def test_constrained_softmax_matches_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(2, 20, (), generator=g))
    x = rand(k, seed=seed, scale=3.0)
    total = float(torch.rand((), generator=g)) * 2 + 0.5
    upper = (torch.rand(k, generator=g, dtype=torch.float64) + 0.3) * total * 2 / k
    temperature = 0.7
    p = softmax(x, upper=upper, total=total, temperature=temperature)
    ref = constrained_softmax_ref(x.numpy() / temperature, upper.numpy(), total)
    assert np.abs(p.numpy() - ref).max() <= 1e-9


def test_constrained_softmax_gradient() -> None:
    x = rand(3, 5, seed=5).requires_grad_()
    up = torch.tensor([0.3, 0.25, 0.5, 0.4, 0.35], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, u: softmax(t, upper=u, total=1.2), (x, up))
    v = torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    p = softmax(v, upper=0.5)
    free = p < 0.5
    pf = torch.where(free, p, 0.0)
    expected = torch.diag(pf) - torch.outer(pf, pf) / pf.sum()
    torch.testing.assert_close(torch.func.jacrev(lambda t: softmax(t, upper=0.5))(v), expected)


def test_constrained_softmax_mask_and_zero_caps() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    mask = torch.tensor([True, True, False, True])
    p = softmax(x, mask=mask, upper=torch.tensor([0.5, 0.0, 0.5, 0.5]).double())
    assert p[1] == 0
    assert p[2] == 0
    torch.testing.assert_close(p.sum(), torch.tensor(1.0).double())
    torch.testing.assert_close(p[0], torch.tensor(0.5).double())
    assert (softmax(torch.full((3,), -math.inf), upper=0.5) == 0).all()


# -------------------------------------------------------------------- k-sparse / l1


@pytest.mark.parametrize("seed", range(15))
def test_sparse_simplex_matches_bruteforce(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    k_all = int(torch.randint(1, 9, (), generator=g))
    k = int(torch.randint(1, k_all + 1, (), generator=g))
    x = rand(k_all, seed=seed)
    total = [1.0, 0.5, 2.0][seed % 3]
    p = project_sparse_simplex(x, k, total=total)
    ref = sparse_projection_bruteforce(x.numpy(), k, total)
    assert np.abs(p.numpy() - ref).max() <= 1e-9
    assert int((p > 0).sum()) <= k


def test_sparse_simplex_batched_gradcheck_and_errors() -> None:
    x = rand(4, 7, seed=2)
    p = project_sparse_simplex(x, 3, dim=0, total=1.5)
    assert ((p > 0).sum(0) <= 3).all()
    torch.testing.assert_close(p.sum(0), torch.full((7,), 1.5).double())
    torch.testing.assert_close(project_sparse_simplex(x, 10), project_simplex(x))
    xg = rand(3, 6, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: project_sparse_simplex(t, 2, total=1.3), (xg,))
    out = torch.func.vmap(lambda t: project_sparse_simplex(t, 2))(x)
    torch.testing.assert_close(out, project_sparse_simplex(x, 2))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(cx.ConvexMixError, match=r"k must be an int >= 1"):
            project_sparse_simplex(x, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(10))
def test_l1_ball_matches_reference(seed: int) -> None:
    x = rand(3, 8, seed=seed, scale=0.5)
    radius = [1.0, 0.3, 5.0][seed % 3]
    p = project_l1_ball(x, radius=radius)
    for r in range(3):
        assert np.abs(p[r].numpy() - l1_ball_ref(x[r].numpy(), radius)).max() <= 1e-9
    assert (p.abs().sum(-1) <= radius + 1e-12).all()


def test_l1_ball_gradcheck_and_errors() -> None:
    x = rand(4, 5, seed=4).requires_grad_()  # some rows inside, some outside
    x.data[0] *= 0.05
    assert torch.autograd.gradcheck(lambda t: project_l1_ball(t, radius=1.0), (x,))
    with pytest.raises(cx.ConvexMixError, match=r"radius must be finite and > 0; got -1"):
        project_l1_ball(x, radius=-1.0)


# ---------------------------------------------------------------------- properties


@st.composite
def boxes(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    k = draw(st.integers(1, 10))
    x = draw(hnp.arrays(np.float64, (2, k), elements=st.floats(-100, 100, width=32)))
    lo = draw(hnp.arrays(np.float64, (k,), elements=st.floats(0, 1, width=32)))
    width = draw(hnp.arrays(np.float64, (k,), elements=st.floats(0.015625, 2, width=32)))
    up = lo + width
    frac = draw(st.floats(0.01, 1.0))  # sum lo <= total <= sum up: feasible
    total = float(lo.sum() + frac * (up.sum() - lo.sum()))
    return x, lo, up, total


@settings(max_examples=60, deadline=None)
@given(problem=boxes())
def test_capped_properties(problem: tuple[np.ndarray, np.ndarray, np.ndarray, float]) -> None:
    x_np, lo_np, up_np, total = problem
    x, lo, up = (torch.tensor(a) for a in (x_np, lo_np, up_np))
    p = project_simplex(x, total=total, lower=lo, upper=up)
    assert (p >= lo - 1e-12).all()
    assert (p <= up + 1e-12).all()
    torch.testing.assert_close(
        p.sum(-1), torch.full((2,), total, dtype=torch.float64), atol=1e-9, rtol=0
    )
    q = project_simplex(p, total=total, lower=lo, upper=up)  # idempotent
    torch.testing.assert_close(q, p, atol=1e-9, rtol=0)
    # loose bounds: the unbounded projection and softmax
    torch.testing.assert_close(
        project_simplex(x, total=total, lower=0.0, upper=total + 1.0),
        project_simplex(x, total=total),
        atol=1e-9,
        rtol=0,
    )
    torch.testing.assert_close(
        softmax(x, total=total, upper=total + 1.0), softmax(x, total=total), atol=1e-12, rtol=0
    )
    s = softmax(x, total=total, upper=up)
    assert (s <= up + 1e-12).all()
    assert (s >= 0).all()
    torch.testing.assert_close(
        s.sum(-1), torch.full((2,), total, dtype=torch.float64), atol=1e-9, rtol=0
    )
