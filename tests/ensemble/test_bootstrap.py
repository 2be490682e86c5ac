"""cx.ensemble.bootstrap: rows are exact weighted fits, Dirichlet draws, intervals."""

from __future__ import annotations

import pytest
import torch

import convexmix as cx
from convexmix.ensemble import bootstrap, fit_weights

from .problems import mixed_problem, two_model_problem


def test_rows_equal_their_weighted_fits() -> None:
    P, y = mixed_problem(6, 400, 3, seed=1)
    bs = bootstrap(P, y, n=12, seed=3)
    assert bs.weights.shape == (12, 6)
    assert bs.sample_weights.shape == (12, 400)
    assert bs.loss.shape == (12,)
    assert bool(bs.converged.all())
    warm = bootstrap(P, y, n=12, seed=3, warm_start=True)
    assert torch.equal(warm.sample_weights, bs.sample_weights)
    for i in range(12):
        ref = fit_weights(P, y, sample_weight=bs.sample_weights[i])
        assert torch.equal(bs.weights[i], ref.weights)  # bit for bit
        assert bs.loss[i].item() == ref.loss
        # warm starts take other Newton steps to the same optimum
        torch.testing.assert_close(warm.weights[i], ref.weights, rtol=0, atol=1e-8)
    # the draws moved the weights: not 12 copies of the point estimate
    assert bs.weights.std(0).max() > 1e-3
    torch.testing.assert_close(bs.fit.weights, fit_weights(P, y).weights)


def test_rows_equal_with_fit_arguments() -> None:
    P, y = mixed_problem(5, 300, 3, seed=2)
    bs = bootstrap(P, y, n=4, seed=0, loss="mse", regularization=0.01, tol=1e-12)
    for i in range(4):
        ref = fit_weights(
            P, y, sample_weight=bs.sample_weights[i], loss="mse", regularization=0.01, tol=1e-12
        )
        assert torch.equal(bs.weights[i], ref.weights)


def test_sample_weights_are_dirichlet_times_n() -> None:
    P, y = two_model_problem(50)
    bs = bootstrap(P, y, n=400, seed=7)
    s = bs.sample_weights
    assert bool((s > 0).all())
    torch.testing.assert_close(s.sum(1), torch.full((400,), 50.0, dtype=torch.float64))
    # Dirichlet(1,...,1) times N: each coordinate is N * Beta(1, N - 1): mean 1,
    # variance N^2 (N - 1) / (N^2 (N + 1)) = (N - 1) / (N + 1).
    assert s.mean().item() == pytest.approx(1.0, abs=1e-12)
    # 20000 values: the variance's relative standard error is about 2%
    assert s.var().item() == pytest.approx(49 / 51, rel=0.08)


def test_seeded_determinism() -> None:
    P, y = two_model_problem(200)
    a, b = bootstrap(P, y, n=20, seed=5), bootstrap(P, y, n=20, seed=5)
    assert torch.equal(a.sample_weights, b.sample_weights)
    assert torch.equal(a.weights, b.weights)
    c = bootstrap(P, y, n=20, seed=6)
    assert not torch.equal(a.sample_weights, c.sample_weights)


def test_intervals_shrink_with_more_data() -> None:
    widths = []
    for N in (100, 400, 1600):
        P, y = two_model_problem(N, seed=11)
        bs = bootstrap(P, y, n=100, seed=0)
        w = bs.fit.weights
        assert 0.05 < w[0].item() < 0.95  # the optimum is inside
        lo, hi = bs.interval(0.9)
        assert bool((lo <= w + 1e-12).all())
        assert bool((w <= hi + 1e-12).all())
        widths.append((hi - lo)[0].item())
    assert widths[0] > widths[1] > widths[2]
    # sqrt(N) scaling: 16x the data gives about a quarter of the width
    assert widths[2] < 0.5 * widths[0]


def test_interval_is_the_quantiles() -> None:
    P, y = mixed_problem(4, 200, 3, seed=4)
    bs = bootstrap(P, y, n=50, seed=1)
    lo, hi = bs.interval(0.8)
    ref = torch.quantile(bs.weights, torch.tensor([0.1, 0.9], dtype=torch.float64), dim=0)
    torch.testing.assert_close(lo, ref[0])
    torch.testing.assert_close(hi, ref[1])
    assert lo.shape == hi.shape == (4,)


def test_errors() -> None:
    P, y = two_model_problem(30)
    with pytest.raises(cx.ConvexMixError, match="n must be an int >= 1"):
        bootstrap(P, y, n=0)
    with pytest.raises(cx.ConvexMixError, match="level must be a number in"):
        bootstrap(P, y, n=3).interval(1.5)
    with pytest.raises(cx.ConvexMixError, match="sample_weight"):
        bootstrap(P, y, n=3, sample_weight=torch.ones(30))
    with pytest.raises(cx.ShapeError, match="targets"):
        bootstrap(P, y[:10], n=3)


def test_callback_counts_draws() -> None:
    P, y = two_model_problem(40)
    seen: list[tuple[int, int]] = []
    bootstrap(P, y, n=5, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)]
