"""Fits on many rows start from the optimum on a fixed row sample: the same optimum as a
cold start from equal weights, for optima inside the simplex, on a face and with ties."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from convexmix.ensemble import _dense, _log_loss, bootstrap, fit_weights
from convexmix.ensemble._log_loss import LogLoss

from .problems import mixed_problem


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row-sample start belongs to the torch path: these fits take it whatever their size."""
    monkeypatch.setattr(_dense, "DENSE_MAX_VALUES", 0)


N = 40_000  # a sample of 40 runs of 64 rows (2560 rows)
FEW_ROWS = 1 << 15  # a lowered SAMPLE_MIN_ROWS, below N


@pytest.fixture
def sampled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the samples the fits solved on (their row counts); the problems here are
    below SAMPLE_MIN_ROWS and SAMPLE_MIN_VALUES (K * N), which are lowered so that they
    take the sample."""
    monkeypatch.setattr(_log_loss, "SAMPLE_MIN_VALUES", 0)
    monkeypatch.setattr(_log_loss, "SAMPLE_MIN_ROWS", FEW_ROWS)
    seen: list[int] = []
    original = LogLoss.sample

    def spy(self: LogLoss) -> LogLoss | None:
        sub = original(self)
        if sub is not None:
            seen.append(sub.n_samples)
        return sub

    monkeypatch.setattr(LogLoss, "sample", spy)
    return seen


def cold_fit(monkeypatch: pytest.MonkeyPatch, fit: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The same fit without the sample start (from equal weights)."""
    with monkeypatch.context() as m:
        m.setattr(_log_loss, "SAMPLE_MIN_ROWS", 1 << 62)
        return fit()


def inside() -> tuple[torch.Tensor, torch.Tensor]:
    return mixed_problem(3, N, 4, seed=2)


def on_a_face() -> tuple[torch.Tensor, torch.Tensor]:
    # mixed models and two useless ones (uniform and a shuffled copy): exact zeros
    P, y = mixed_problem(6, N, 4, seed=3)
    uniform = torch.full_like(P[0], 0.25)
    shuffled = P[0][torch.randperm(N, generator=torch.Generator().manual_seed(0))]
    return torch.cat([P, uniform[None], shuffled[None]]), y


def ties() -> tuple[torch.Tensor, torch.Tensor]:
    # model 1 twice, model 0 three times
    P, y = mixed_problem(4, N, 4, seed=4)
    return torch.cat([P, P[1:2], P[0:1], P[0:1]]), y


@pytest.mark.parametrize("problem", [inside, on_a_face, ties])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"regularization": 0.05},
        {"sample_weight": torch.linspace(0.0, 2.0, N, dtype=torch.float64)},
        {"dtype": torch.float32},
    ],
    ids=["plain", "regularized", "weighted", "float32"],
)
def test_sample_start_gives_the_cold_fits_optimum(
    problem: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    kwargs: dict[str, object],
    sampled: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    P, y = problem()
    kw = dict(kwargs)
    P = P.to(kw.pop("dtype", torch.float64))  # type: ignore[arg-type]
    fit = fit_weights(P, y, **kw)  # type: ignore[arg-type]
    assert sampled == [2560]
    cold = fit_weights(P, y, **kw)  # type: ignore[arg-type]
    assert torch.equal(cold.weights, fit.weights)  # the sample is fixed: the same fit
    assert len(sampled) == 2
    ref = cold_fit(monkeypatch, lambda: fit_weights(P, y, **kw))  # type: ignore[arg-type]
    assert len(sampled) == 2  # the reference did not sample
    assert fit.converged
    assert fit.loss == pytest.approx(ref.loss, rel=1e-13)
    w, w_ref = fit.weights, ref.weights
    if problem is ties:
        # Identical models make the optimum a set: any split of a group's weight among
        # its copies is optimal, and neither start promises one. Each group's total and
        # every other weight are unique.
        groups = [[0, 5, 6], [1, 4], [2], [3]]
        w = torch.stack([w[g].sum() for g in groups])
        w_ref = torch.stack([w_ref[g].sum() for g in groups])
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-10)
    if problem is not ties:  # (ties: a singular Hessian, the steps depend on the split)
        assert fit.n_iter <= ref.n_iter  # no more Newton steps on all rows
    if problem is inside:
        assert bool((w > 0).all())
    elif problem is on_a_face:
        assert float(w[-2]) == 0.0
        assert float(w[-1]) == 0.0
        assert int((w > 0).sum()) >= 2
    else:
        assert bool((w > 0).all())  # every group is in the blend


def test_bootstrap_rows_equal_fits_with_the_sample_start(sampled: list[int]) -> None:
    P, y = mixed_problem(4, N, 3, seed=5)
    bs = bootstrap(P, y, n=2)
    assert len(sampled) == 3  # the point estimate and each draw
    for i in range(2):
        fit = fit_weights(P, y, sample_weight=bs.sample_weights[i])
        assert torch.equal(bs.weights[i], fit.weights)


def test_no_sample_below_the_thresholds_or_when_sharded(monkeypatch: pytest.MonkeyPatch) -> None:
    P, y = mixed_problem(3, N, 4, seed=6)
    q = P[:, torch.arange(N), y]
    s = torch.full((N,), 1.0 / N, dtype=torch.float64)
    assert 3 * N < _log_loss.SAMPLE_MIN_VALUES
    assert LogLoss(q, s).sample() is None  # too few values and rows to gain
    monkeypatch.setattr(_log_loss, "SAMPLE_MIN_VALUES", 3 * N)
    assert N < _log_loss.SAMPLE_MIN_ROWS
    assert LogLoss(q, s).sample() is None  # enough values, too few rows
    monkeypatch.setattr(_log_loss, "SAMPLE_MIN_ROWS", N)
    sub = LogLoss(q, s).sample()
    assert sub is not None
    # the sample is every 16th run of 64 rows, with its weights renormalised
    rows = torch.arange(N // 64 * 64).view(-1, 64)[::16].reshape(-1)
    torch.testing.assert_close(sub.q, q[:, rows], rtol=0, atol=0)
    torch.testing.assert_close(sub.s, s[rows] / s[rows].sum(), rtol=0, atol=0)
    monkeypatch.setattr(_log_loss, "SAMPLE_MIN_VALUES", 0)
    assert LogLoss(q[:, : N - 1], s[: N - 1]).sample() is None  # too few rows to sample
    # each rank of a sharded fit would sample its own rows
    assert LogLoss(q, s, reduce=lambda x: x.clone()).sample() is None
    # sample weights that leave out every sampled row
    zeroed = s.clone()
    zeroed[rows] = 0
    assert LogLoss(q, zeroed / zeroed.sum()).sample() is None
