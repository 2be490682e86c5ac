"""The native row kernel of sparsemax and 1.5-entmax (``_kernels/rows.c``) against an
exact (50-digit) reference and against the sort-based ATen code it replaces: random and
adversarial rows (ties, many +inf, masks, tiny spreads, long rows, huge and tiny totals),
every dim, float32 and float64; the backward by gradcheck and against the ATen backward;
and the paths: when it runs, when it must not (create_graph, strided inputs, torch.func,
torch.compile), threads, and the fallback without the kernels."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import mpmath
import numpy as np
import pytest
import torch

from convexmix._kernels import native, rows
from convexmix.functional import entmax15, project_simplex, sparsemax
from tests.spies import results_of

pytestmark = pytest.mark.skipif(native.library() is None, reason="no native kernels")

MAPS: dict[str, Callable[..., torch.Tensor]] = {"sparsemax": sparsemax, "entmax15": entmax15}
ALPHA = {"sparsemax": 2.0, "entmax15": 1.5}


@pytest.fixture
def aten() -> Iterator[None]:
    """The sort-based ATen path (the native kernel turned off)."""
    rows.rows_enabled = False
    try:
        yield
    finally:
        rows.rows_enabled = True


def on_aten(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    rows.rows_enabled = False
    try:
        return fn()
    finally:
        rows.rows_enabled = True


def exact_row(row: list[float], total: float, alpha: float) -> list[float]:
    """The map of one row in 50-digit arithmetic, rounded once (absent: -inf; +inf rows
    not here)."""
    mpmath.mp.dps = 50
    z = sorted((mpmath.mpf(v) for v in row if v > -math.inf), reverse=True)
    if not z:
        return [0.0] * len(row)
    t = mpmath.mpf(total)
    y = z if alpha == 2.0 else [v / 2 for v in z]
    tau = None
    for k in range(1, len(y) + 1):
        head = y[:k]
        m = sum(head) / k
        if alpha == 2.0:
            tk = (sum(head) - t) / k
        else:
            ss = sum((v - m) ** 2 for v in head)
            tk = m - mpmath.sqrt(max((t - ss) / k, 0))
        if tk < y[k - 1]:
            tau = tk
    assert tau is not None
    out = []
    for v in row:
        if v == -math.inf:
            out.append(0.0)
            continue
        d = mpmath.mpf(v) if alpha == 2.0 else mpmath.mpf(v) / 2
        p = max(d - tau, 0)
        out.append(float(p if alpha == 2.0 else p * p))
    return out


def rows_of(x: torch.Tensor) -> list[list[float]]:
    return x.reshape(-1, x.shape[-1]).tolist()  # type: ignore[no-any-return]


# ------------------------------------------------------------------------ values


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("total", [1.0, 3.0, 1e-3])
@pytest.mark.parametrize("k", [1, 3, 8, 30, 300])
def test_matches_exact_reference(name: str, total: float, k: int) -> None:
    """float64: within one rounding of the output of the exact value (the threshold in
    float64 adds at most a few ulps of the total), never worse than the ATen path."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(6, k, generator=g, dtype=torch.float64) * torch.tensor(
        [[0.1], [1], [10]]
    ).repeat(2, 1)
    x[3] = torch.round(x[3])  # ties
    out = MAPS[name](x, total=total)
    old = on_aten(lambda: MAPS[name](x, total=total))
    ref = torch.tensor([exact_row(r, total, ALPHA[name]) for r in rows_of(x)], dtype=torch.float64)
    err = (out - ref).abs().max().item()
    err_old = (old - ref).abs().max().item()
    assert err <= 4 * 2.2e-16 * total
    assert err <= err_old + 2 * 2.2e-16 * total


def adversarial_rows(k: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(4, k, generator=g, dtype=torch.float64)
    cases = {
        "normal": r,
        "tiny spread": 1e-6 * r,  # everything in the support
        "ties": torch.round(2 * r) / 2,
        "all equal": torch.full((4, k), 0.3, dtype=torch.float64),
        "huge logits": 1e4 * r,
        "offset": r + 1e6,  # |max| >> total: max - total rounds near max
        "log gaps": -torch.log1p(torch.arange(k, dtype=torch.float64)).expand(4, k) + 1e-3 * r,
        "one dominant": torch.cat([torch.full((4, 1), 50.0, dtype=torch.float64), r[:, 1:]], 1)
        if k > 1
        else r,
    }
    masked = r.clone()
    masked[r < 0.3] = -math.inf
    cases["masked"] = masked
    return cases


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 17, 600, 20000])
def test_matches_aten_on_adversarial_rows(name: str, dtype: torch.dtype, k: int) -> None:
    """Native and ATen agree to an ulp or two of the total on every kind of row, at every
    total, and both sum to it."""
    fn = MAPS[name]
    for kind, x64 in adversarial_rows(k, k).items():
        x = x64.to(dtype)
        for total in (1.0, 0.25, 1e3, 1e-20):
            out = fn(x, total=total)
            old = on_aten(lambda x=x, total=total: fn(x, total=total))
            assert out.dtype == dtype
            eps = torch.finfo(dtype).eps
            err = ((out.double() - old.double()).abs().max() / total).item()
            assert err <= 4 * eps, (kind, total, err)
            live = (x > -math.inf).any(-1)
            sums = out.double().sum(-1)
            assert ((sums[live] - total).abs() <= total * k * 2 * eps + 1e-300).all(), kind
            assert (out[~live] == 0).all()


@pytest.mark.parametrize("name", list(MAPS))
def test_special_values(name: str) -> None:
    """NaN fills its row, +inf entries share the mass, -inf is 0, nothing present is 0:
    exactly as the ATen code does."""
    inf, nan = math.inf, math.nan
    x = torch.tensor(
        [
            [nan, 1.0, 2.0, -inf],
            [inf, 0.0, inf, 1.0],
            [-inf, -inf, -inf, -inf],
            [inf, nan, 0.0, 0.0],
            [-inf, 3.0, -inf, -inf],
            [1e30, -1e30, 0.0, 1e30],
        ]
    )
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype)
        out = MAPS[name](xd, total=2.0)
        old = on_aten(lambda xd=xd: MAPS[name](xd, total=2.0))
        nan_row = [nan] * 4
        expected = torch.tensor(
            [
                nan_row,
                [1.0, 0.0, 1.0, 0.0],
                [0.0] * 4,
                nan_row,
                [0.0, 2.0, 0.0, 0.0],
                [1.0, 0.0, 0.0, 1.0],
            ],
            dtype=dtype,
        )
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out, expected, rtol=0, atol=4 * eps, equal_nan=True)
        torch.testing.assert_close(out, old, rtol=0, atol=4 * eps, equal_nan=True)
    huge = torch.tensor([[torch.finfo(torch.float64).max, -1e308, 0.0]], dtype=torch.float64)
    assert MAPS[name](huge).tolist() == [[1.0, 0.0, 0.0]]


@pytest.mark.parametrize("name", list(MAPS))
def test_every_dim_and_shape(name: str) -> None:
    """Rows along any dim of a contiguous tensor (strided rows in the kernel), K = 1,
    empty tensors, and half precision (computed in float32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 2, generator=g, dtype=torch.float64)
    for dim in range(-4, 4):
        out = MAPS[name](x, dim, total=1.5)
        ref = on_aten(lambda dim=dim: MAPS[name](x, dim, total=1.5))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-15)
        assert out.is_contiguous()
    assert MAPS[name](torch.randn(4, 1)).tolist() == [[1.0]] * 4
    for shape in [(0, 3), (3, 0), (0,)]:
        assert MAPS[name](torch.empty(shape)).shape == shape
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        out = MAPS[name](xh)
        assert out.dtype == dtype
        assert torch.equal(out, on_aten(lambda xh=xh: MAPS[name](xh)))


def test_strided_input_keeps_the_aten_path(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = results_of(monkeypatch, rows, "_rows_kernels")
    x = torch.randn(6, 5, dtype=torch.float64)
    out = sparsemax(x.T, 0)
    assert [k is not None for k in kernels] == [False]
    torch.testing.assert_close(out, sparsemax(x.T.contiguous(), 0), rtol=0, atol=1e-15)
    assert kernels[-1] is not None


def test_project_simplex_auto_takes_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = results_of(monkeypatch, rows, "rows_forward")
    x = torch.randn(50, 700, dtype=torch.float64)
    out = project_simplex(x)
    assert calls
    for method in ("sort", "bisect", "condat"):
        torch.testing.assert_close(out, project_simplex(x, method=method), rtol=0, atol=1e-15)


def test_threads_give_the_single_thread_result(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(37, 4000, dtype=torch.float64)  # above both thresholds
    g = torch.randn(37, 4000, dtype=torch.float64)
    for name, fn in MAPS.items():
        xr = x.clone().requires_grad_()
        out = fn(xr)
        out.backward(g)
        with monkeypatch.context() as m:
            m.setattr(rows, "ROWS_PARALLEL_MIN", 1 << 62)
            m.setattr(rows, "ROWS_BWD_PARALLEL_MIN", 1 << 62)
            xs = x.clone().requires_grad_()
            one = fn(xs)
            one.backward(g)
        assert torch.equal(out, one), name
        assert torch.equal(xr.grad, xs.grad), name  # type: ignore[arg-type]


# ---------------------------------------------------------------------- backward


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_gradcheck(name: str, dim: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: MAPS[name](t, dim, total=2.5), (x,))


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_aten(name: str, dtype: torch.dtype) -> None:
    """The native VJP against the ATen one: a dense gradient, an expanded one
    (``sum().backward()``), masked entries, NaN rows (sparsemax: 0, 1.5-entmax: NaN, as
    before)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 33, generator=gen, dtype=dtype)
    x[3, 5:] = -math.inf
    x[4] = -math.inf
    x[5, 2] = math.nan
    grad = torch.randn(40, 33, generator=gen, dtype=dtype)

    def grads(fn: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for g in (grad, None):
            xr = x.clone().requires_grad_()
            y = fn(xr)
            (y.sum() if g is None else (y * g).sum()).backward()
            assert xr.grad is not None
            out.append(xr.grad)
        return out

    fn = MAPS[name]
    new = grads(lambda t: fn(t, total=3.0))
    old = on_aten(lambda: torch.stack(grads(lambda t: fn(t, total=3.0))))
    for a, b in zip(new, old, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, equal_nan=True)
    assert new[0][5].isnan().all() == (name == "entmax15")


@pytest.mark.parametrize("name", list(MAPS))
def test_double_backward_uses_differentiable_ops(name: str) -> None:
    """create_graph=True records the backward: the ATen VJP runs, so the second
    derivative is right (the native kernel's output would have none)."""
    # (1.5-entmax's second derivative is finite only inside the support: no zeros there)
    scale = 1.0 if name == "sparsemax" else 0.1
    x = (scale * torch.randn(3, 7, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: MAPS[name](t, total=1.5), (x,))


@pytest.mark.parametrize("name", list(MAPS))
def test_torch_func_and_compile_keep_working(name: str) -> None:
    fn = MAPS[name]
    x = torch.randn(4, 9, dtype=torch.float64)
    jac = torch.func.jacrev(fn)(x[0])
    y = fn(x[0])
    s = (y > 0).double() if name == "sparsemax" else y.sqrt()
    ref = torch.diag(s) - torch.outer(s, s) / s.sum()
    torch.testing.assert_close(jac, ref)
    torch.testing.assert_close(torch.func.vmap(fn)(x), fn(x))
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), fn(x))


def test_without_the_kernels_the_aten_path_runs() -> None:
    """CONVEXMIX_NATIVE=0: the maps run their ATen code, with the same values."""
    code = (
        "import json, torch, convexmix as cx\n"
        "from convexmix._kernels import native, rows\n"
        "x = torch.randn(64, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))\n"
        "assert native.library() is None and not rows.rows_apply(x)\n"
        "p = cx.functional.entmax15(x, total=2.0)\n"
        "print(json.dumps([p.sum().item(), cx.functional.sparsemax(x)[0, :5].tolist()]))\n"
    )
    env = dict(os.environ, CONVEXMIX_NATIVE="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    x = torch.randn(64, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    total, head = json.loads(res.stdout)
    assert abs(total - entmax15(x, total=2.0).sum().item()) <= 1e-12
    assert np.abs(np.array(head) - sparsemax(x)[0, :5].numpy()).max() <= 1e-15
