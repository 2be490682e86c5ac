"""The checked read of (K, N, C) predictions (native gather.c against its torch fallback),
and the Newton solver's approximate Hessian and sparse blend."""

from __future__ import annotations

import pytest
import torch

import convexmix as cx
from convexmix._kernels import alloc, gather, native
from convexmix.ensemble import _objectives, fit_weights
from convexmix.ensemble._factory import make_objective
from convexmix.ensemble._inputs import true_class_probabilities
from convexmix.ensemble._log_loss import LogLoss
from convexmix.ensemble._objectives import LOG_LOSS_EPS

from .problems import mixed_problem

needs_native = pytest.mark.skipif(native.library() is None, reason="installed without kernels")


@pytest.fixture(params=["native", "aten"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on the native read and on the torch fallback."""
    if request.param == "native":
        if native.library() is None:
            pytest.skip("installed without kernels")
    else:
        monkeypatch.setattr(gather, "true_class", lambda *args: None)
    return str(request.param)


def _reference(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The gather by advanced indexing, floored like the log-loss floors it."""
    return p[:, torch.arange(p.shape[1]), t].clamp_min(LOG_LOSS_EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [1, 2, 3, 4, 5, 10, 13])
def test_gather_equals_indexing(path: str, dtype: torch.dtype, C: int) -> None:
    P, y = mixed_problem(5, 3001, C, seed=C, dtype=dtype)
    P[1, 7] = 0.0  # a true-class probability of 0 is floored
    P[1, 7, 0] = 1.0
    y[7] = 1 if C > 1 else 0
    for validate in (True, False):
        q = true_class_probabilities(P, y, validate)
        assert q.dtype == dtype
        assert q.shape == (5, 3001)
        torch.testing.assert_close(q, _reference(P, y), rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_and_fallback_give_the_same_fit(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    P, y = mixed_problem(9, 20011, 6, seed=5, dtype=dtype)
    fit = fit_weights(P, y)
    monkeypatch.setattr(gather, "true_class", lambda *args: None)
    slow = fit_weights(P, y)
    torch.testing.assert_close(fit.weights, slow.weights, rtol=0, atol=0)
    assert fit.loss == slow.loss


@needs_native
def test_native_read_splits_models_over_threads() -> None:
    P, y = mixed_problem(12, 40000, 10, seed=6)  # 4.8M values: above GATHER_PARALLEL_MIN
    assert P.numel() >= gather.GATHER_PARALLEL_MIN
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        q = alloc.empty((12, 40000), P.dtype)
        assert gather.true_class(P, y, q, LOG_LOSS_EPS, True, 1e-3) == -1
        torch.testing.assert_close(q, _reference(P, y), rtol=0, atol=0)
        P[10, 123, 4] = float("nan")
        assert gather.true_class(P, y, q, LOG_LOSS_EPS, True, 1e-3) == 10
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [1, 3, 4, 8, 10, 17])
def test_native_check_finds_every_bad_value(dtype: torch.dtype, C: int) -> None:
    """The vector check (rows folded into vectors of 4 or 8, a masked load of the rest,
    sums of 4 or 8 rows at once) and the rows after the last full group find a bad value
    in any row and column: NaN, inf, a negative value, a sum off by 2e-3."""
    K, N = 3, 1003  # 1003 = 125 * 8 + 3: full groups of 4 and 8 rows, then single rows
    P, y = mixed_problem(K, N, C, seed=C, dtype=dtype)
    q = torch.empty(K, N, dtype=dtype)
    assert gather.true_class(P, y, q, LOG_LOSS_EPS, True, 1e-3) == -1
    torch.testing.assert_close(q, _reference(P, y), rtol=0, atol=0)
    for row in (0, 5, 999, 1000, 1002):
        for col in sorted({0, C // 2, C - 1}):
            for value in (float("nan"), float("inf"), -float("inf"), -1e-6, 2e-3):
                bad = P.clone()
                bad[1, row, col] = value if value != 2e-3 else bad[1, row, col] + value
                assert gather.true_class(bad, y, q, LOG_LOSS_EPS, True, 1e-3) == 1, (
                    row,
                    col,
                    value,
                )
            fine = P.clone()
            fine[1, row, col] += 5e-4  # within the tolerance
            assert gather.true_class(fine, y, q, LOG_LOSS_EPS, True, 1e-3) == -1


@needs_native
def test_native_read_declines_what_it_does_not_handle() -> None:
    P, y = mixed_problem(3, 100, 4)
    q = torch.empty(3, 100, dtype=P.dtype)
    strided = P.transpose(1, 2).contiguous().transpose(1, 2)
    assert gather.true_class(strided, y, q, 0, True, 1e-3) is None
    assert gather.true_class(P.half(), y, q.half(), 0, True, 1e-3) is None
    assert gather.true_class(P, y.int(), q, 0, True, 1e-3) is None
    assert gather.true_class(P, y, q.float(), 0, True, 1e-3) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (float("nan"), cx.ConvexMixError, "predictions of model 2 must be finite"),
        (float("inf"), cx.ConvexMixError, "predictions of model 2 must be finite"),
        (-float("inf"), cx.ConvexMixError, "predictions of model 2 must be finite"),
        (-0.25, cx.InvalidProbabilitiesError, "model 2 must be probabilities >= 0; got -0.25"),
        (0.75, cx.InvalidProbabilitiesError, "model 2 .* row 1234 sums to 1.5"),
    ],
)
def test_bad_values_are_clear_errors(
    path: str, dtype: torch.dtype, value: float, error: type, match: str
) -> None:
    P, y = mixed_problem(4, 5000, 3, seed=7, dtype=dtype)
    P[2, 1234] = torch.tensor([0.25, 0.5, 0.25], dtype=dtype)
    P[2, 1234, 2] = value
    if value == 0.75:
        P[2, 1234, 1] = 0.5
    P[3, 10, 0] = float("nan")  # a later model's error is not the one reported
    with pytest.raises(error, match=match):
        fit_weights(P, y)
    assert issubclass(error, ValueError)


def test_unchecked_read_floors_and_keeps_going(path: str) -> None:
    P, y = mixed_problem(3, 500, 4, seed=8)
    P[0, 3, 1] = -5.0  # unchecked: read as given
    q = true_class_probabilities(P, y, validate=False)
    torch.testing.assert_close(q, _reference(P, y), rtol=0, atol=0)


def test_non_contiguous_predictions_take_the_fallback() -> None:
    P, y = mixed_problem(4, 2000, 5, seed=9)
    view = P.transpose(0, 1).contiguous().transpose(0, 1)  # (K, N, C), not contiguous
    assert not view.is_contiguous()
    torch.testing.assert_close(
        fit_weights(view, y).weights, fit_weights(P, y).weights, rtol=0, atol=0
    )


def _log_loss(P: torch.Tensor, y: torch.Tensor, s: torch.Tensor | None = None) -> LogLoss:
    obj = make_objective(P, y, "log_loss", s, True)
    assert isinstance(obj, LogLoss)
    return obj


@pytest.mark.parametrize("weighted", [False, True])
def test_approximate_hessian_is_close_and_exact_when_small(weighted: bool) -> None:
    P, y = mixed_problem(60, 50000, 4, seed=10)
    s = torch.rand(50000, generator=torch.Generator().manual_seed(0)) if weighted else None
    obj = _log_loss(P, y, s)
    w = torch.rand(60, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w /= w.sum()
    idx = torch.arange(60)
    assert _objectives.hessian_step(60, 50000) > 1
    exact, approx = obj.hessian(w, idx), obj.hessian(w, idx, approx=True)
    # the exact Hessian against its closed form
    u = w @ obj.q
    reference = (obj.q * (obj.s / u**2)) @ obj.q.T
    torch.testing.assert_close(exact, reference, rtol=1e-12, atol=0)
    assert float((approx - exact).norm() / exact.norm()) < 0.1
    torch.testing.assert_close(approx, approx.T, rtol=1e-12, atol=1e-13)
    # few models: every row, the same Hessian, summed in float32
    few = torch.tensor([3, 17, 40])
    torch.testing.assert_close(obj.hessian(w, few), reference[few][:, few], rtol=1e-12, atol=0)
    torch.testing.assert_close(
        obj.hessian(w, few, approx=True), reference[few][:, few], rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_blend_equals_the_dense_one(dtype: torch.dtype) -> None:
    P, y = mixed_problem(40, 3000, 3, seed=11, dtype=dtype)
    obj = _log_loss(P, y)
    w = torch.zeros(40, dtype=torch.float64)
    w[[2, 9, 31]] = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    u = obj._compute_blend(w)
    assert u.dtype == torch.float64
    torch.testing.assert_close(u, w @ obj.q.double(), rtol=1e-14, atol=0)


def test_fit_with_approximate_hessians_meets_the_kkt_conditions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    P, y = mixed_problem(80, 30000, 5, seed=12)
    fit = fit_weights(P, y)
    assert fit.converged
    assert fit.gap <= 1e-10
    monkeypatch.setattr(_objectives, "HESSIAN_WORK", 1 << 40)  # every Hessian exact
    exact = fit_weights(P, y)
    torch.testing.assert_close(fit.weights, exact.weights, rtol=0, atol=1e-8)
    # KKT: the gradient is lowest (and equal) on the support
    q = _reference(P, y)
    g = -(q / (fit.weights @ q)).mean(1)
    support = fit.weights > 0
    assert float(g[support].max() - g.min()) < 1e-8
    assert int(support.sum()) >= 2


@pytest.mark.parametrize(("n", "seed"), [(200, 14), (200, 18), (200, 21), (600, 14)])
def test_cv_guard_equals_cold_fits_on_every_fold_and_lambda(n: int, seed: int) -> None:
    """The warm-started path picks the lambda that independent cold fits pick, and its
    final fit (started from the folds' mean optimum) equals a cold fit at that lambda."""
    P, y = mixed_problem(6, n, 3, seed=seed)
    folds = 5
    parts = torch.randperm(n, generator=torch.Generator().manual_seed(0)).chunk(folds)
    grid = [0.0, *torch.logspace(-4, 1, 11, dtype=torch.float64).tolist()]
    scores = torch.zeros(len(grid), dtype=torch.float64)
    for i in range(folds):
        kept = torch.cat([parts[j] for j in range(folds) if j != i])
        held = parts[i]
        for j, lam in enumerate(grid):
            w = fit_weights(P[:, kept], y[kept], regularization=lam).weights
            blend = torch.einsum("k,knc->nc", w, P[:, held])
            scores[j] += -blend[torch.arange(held.numel()), y[held]].log().sum() / n
    best = grid[int(scores.argmin())]
    cv = fit_weights(P, y, regularization="cv")
    assert cv.regularization == pytest.approx(best, rel=1e-12)
    cold = fit_weights(P, y, regularization=best)
    torch.testing.assert_close(cv.weights, cold.weights, rtol=0, atol=1e-8)
    assert cv.converged
