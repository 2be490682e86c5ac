"""cx.ensemble: the exact optimum against SLSQP and KKT, exact zeros, Caruana, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import convexmix as cx
from convexmix.ensemble import compare, ensemble_selection, fit_weights


def class_problem(seed: int, K: int, N: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K models of mixed quality: a class signal plus independent noise, softmaxed."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (N,), generator=g)
    onehot = torch.nn.functional.one_hot(y, C).double()
    signal = torch.rand(K, 1, 1, generator=g, dtype=torch.float64) * 2.5
    noise = torch.rand(K, 1, 1, generator=g, dtype=torch.float64) * 2 + 0.5
    logits = onehot * signal + noise * torch.randn(K, N, C, generator=g, dtype=torch.float64)
    return torch.softmax(logits, -1), y


def slsqp(objective, K: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    res = minimize(
        objective,
        np.full(K, 1.0 / K),
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * K,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(K)}],
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    return np.asarray(res.x)


def log_loss_np(w: np.ndarray, q: np.ndarray) -> float:
    return float(-np.log(np.maximum(w @ q, 1e-300)).mean())


@pytest.mark.parametrize(("seed", "K", "C"), [(0, 3, 2), (1, 8, 5), (2, 20, 10), (3, 12, 3)])
def test_log_loss_matches_slsqp_and_kkt(seed: int, K: int, C: int) -> None:
    P, y = class_problem(seed, K, 3000, C)
    q = P[:, torch.arange(3000), y].numpy()
    ref = slsqp(lambda w: (log_loss_np(w, q), -(q / (w @ q)).mean(1)), K)
    fit = fit_weights(P, y)
    assert fit.converged
    assert fit.weights.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert (fit.weights >= 0).all()
    ref_loss = log_loss_np(ref, q)
    assert fit.loss <= ref_loss + 1e-12  # never worse than SLSQP
    assert fit.loss == pytest.approx(log_loss_np(fit.weights.numpy(), q), abs=1e-14)
    assert ref_loss - fit.loss < 1e-6
    np.testing.assert_allclose(fit.weights.numpy(), ref, atol=2e-4)
    # KKT from scratch: every gradient entry >= the support's, equal on the support
    g = -(q / (fit.weights.numpy() @ q)).mean(1)
    support = fit.weights.numpy() > 0
    mu = g[support].min()
    assert np.ptp(g[support]) < 1e-9
    assert (g >= mu - 1e-9).all()
    assert fit.gap >= fit.loss - ref_loss - 1e-12


def test_log_loss_uses_exact_zeros() -> None:
    P, y = class_problem(5, 10, 2000, 4)
    fit = fit_weights(P, y)
    assert 0 < int((fit.weights == 0).sum()) < 10
    assert fit.weights[fit.weights > 0].min() > 1e-6


def test_binary_probabilities_of_class_one() -> None:
    P, y = class_problem(7, 6, 1000, 2)
    fit2 = fit_weights(P[..., 1], y)  # (K, N) probabilities of class 1
    fit3 = fit_weights(P, y)
    torch.testing.assert_close(fit2.weights, fit3.weights, atol=1e-10, rtol=0)
    assert fit2.loss == pytest.approx(fit3.loss, abs=1e-13)


def test_mse_recovers_exact_weights_and_zeros() -> None:
    g = torch.Generator().manual_seed(0)
    P = torch.randn(10, 400, generator=g, dtype=torch.float64)
    true = torch.tensor([0.4, 0, 0.25, 0, 0, 0.2, 0, 0.15, 0, 0], dtype=torch.float64)
    fit = fit_weights(P, true @ P, loss="mse")
    torch.testing.assert_close(fit.weights, true, atol=1e-12, rtol=0)
    assert (fit.weights[true == 0] == 0).all()
    assert fit.loss < 1e-24


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mse_with_noise_matches_slsqp(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(7, 300, generator=g, dtype=torch.float64) + torch.arange(7.0)[:, None] / 7
    y = P[:3].mean(0) + 0.5 * torch.randn(300, generator=g, dtype=torch.float64)
    Pn, yn = P.numpy(), y.numpy()

    def obj(w: np.ndarray) -> tuple[float, np.ndarray]:
        r = w @ Pn - yn
        return float((r**2).mean()), 2 * Pn @ r / len(r)

    ref = slsqp(obj, 7)
    fit = fit_weights(P, y, loss="mse")
    assert fit.loss <= obj(ref)[0] + 1e-13
    np.testing.assert_allclose(fit.weights.numpy(), ref, atol=1e-5)


def test_brier_score_on_probabilities() -> None:
    P, y = class_problem(4, 6, 800, 3)
    Y = torch.nn.functional.one_hot(y, 3).double().numpy()
    Pn = P.numpy()

    def obj(w: np.ndarray) -> tuple[float, np.ndarray]:
        r = np.tensordot(w, Pn, 1) - Y
        return float((r**2).sum(1).mean()), 2 * np.einsum("knc,nc->k", Pn, r) / len(r)

    ref = slsqp(obj, 6)
    fit = fit_weights(P, y, loss="mse")
    assert fit.loss <= obj(ref)[0] + 1e-12
    assert fit.loss == pytest.approx(obj(fit.weights.numpy())[0], abs=1e-14)


def test_callable_loss_matches_builtin() -> None:
    P, y = class_problem(8, 5, 500, 3)

    def nll(blend: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -blend.gather(1, t[:, None]).squeeze(1).log()

    fit = fit_weights(P, y, loss=nll)
    ref = fit_weights(P, y)
    torch.testing.assert_close(fit.weights, ref.weights, atol=1e-8, rtol=0)
    assert fit.loss == pytest.approx(ref.loss, abs=1e-12)
    scalar = fit_weights(P, y, loss=lambda b, t: nll(b, t).mean())
    torch.testing.assert_close(scalar.weights, ref.weights, atol=1e-8, rtol=0)


def test_callable_loss_errors() -> None:
    P, y = class_problem(8, 3, 50, 3)
    with pytest.raises(cx.ConvexMixError, match="per-sample losses"):
        fit_weights(P, y, loss=lambda b, t: b.sum(), sample_weight=torch.ones(50))
    with pytest.raises(cx.ShapeError, match=r"shape \(50,\)"):
        fit_weights(P, y, loss=lambda b, t: b)
    with pytest.raises(cx.ConvexMixError, match=r"must return a torch\.Tensor"):
        fit_weights(P, y, loss=lambda b, t: 1.0)  # type: ignore[arg-type,return-value]


def test_sample_weight_equals_repeating_samples() -> None:
    P, y = class_problem(9, 5, 300, 3)
    reps = torch.randint(1, 4, (300,), generator=torch.Generator().manual_seed(1))
    idx = torch.repeat_interleave(torch.arange(300), reps)
    weighted = fit_weights(P, y, sample_weight=reps.double())
    repeated = fit_weights(P[:, idx], y[idx])
    torch.testing.assert_close(weighted.weights, repeated.weights, atol=1e-10, rtol=0)
    assert weighted.loss == pytest.approx(repeated.loss, abs=1e-13)


def test_regularization_pulls_towards_equal_weights() -> None:
    P, y = class_problem(10, 6, 400, 3)
    free = fit_weights(P, y)
    mild = fit_weights(P, y, regularization=0.1)
    strong = fit_weights(P, y, regularization=1e6)
    uniform = torch.full((6,), 1 / 6, dtype=torch.float64)
    d = [float((r.weights - uniform).norm()) for r in (free, mild, strong)]
    assert d[0] > d[1] > d[2]
    assert d[2] < 1e-5
    assert mild.loss >= free.loss
    cv = fit_weights(P, y, regularization="cv")
    grid = [0.0, *torch.logspace(-4, 1, 11, dtype=torch.float64).tolist()]
    assert any(cv.regularization == pytest.approx(v) for v in grid)


def test_free_values_reproduce_the_weights() -> None:
    P, y = class_problem(11, 6, 400, 3)
    for name in ("softmax", "sparsemax", "entmax15", "stick_breaking"):
        fit = fit_weights(P, y, map=name)
        layer = cx.SimplexWeights(6, map=name, init=fit.weights)
        torch.testing.assert_close(layer().detach().double(), fit.weights, atol=1e-6, rtol=0)
    sparse = fit_weights(P, y, map="sparsemax")
    torch.testing.assert_close(cx.functional.sparsemax(sparse.free), sparse.weights)
    soft = fit_weights(P, y)
    torch.testing.assert_close(torch.softmax(soft.free, 0), soft.weights, atol=1e-11, rtol=0)


def test_degenerate_cases() -> None:
    P, y = class_problem(12, 4, 300, 3)
    dup = torch.cat([P, P[:1]])  # an identical copy of model 0
    fit, ref = fit_weights(dup, y), fit_weights(P, y)
    assert fit.loss == pytest.approx(ref.loss, abs=1e-12)
    torch.testing.assert_close(fit.weights[0] + fit.weights[4], ref.weights[0])
    one = fit_weights(P[:1], y)
    assert one.weights.tolist() == [1.0]
    zero = P.clone()
    zero[0, 0] = torch.nn.functional.one_hot((y[0] + 1) % 3, 3).double()  # p(true) = 0
    assert np.isfinite(fit_weights(zero, y).loss)


def test_inputs_from_numpy_and_lists() -> None:
    P, y = class_problem(13, 3, 200, 3)
    ref = fit_weights(P, y)
    for preds, numpy in (
        (P.numpy(), True),
        ([P[k].numpy() for k in range(3)], True),
        (list(P), False),
    ):
        fit = fit_weights(preds, y.numpy())
        # numpy predictions give numpy results, tensors (or a list of them) tensors
        assert isinstance(fit.weights, np.ndarray) == numpy
        assert isinstance(fit.free, np.ndarray) == numpy
        assert isinstance(fit.predict(preds), np.ndarray) == numpy
        torch.testing.assert_close(torch.as_tensor(fit.weights), ref.weights)
    floats = fit_weights(P.float(), y.double())  # float labels that are integers are fine
    torch.testing.assert_close(floats.weights, ref.weights, atol=1e-5, rtol=0)


def test_input_errors() -> None:
    P, y = class_problem(14, 3, 40, 3)
    summing = P.clone()
    summing[1, 5] *= 2
    negative = P.clone()
    negative[2, 3] = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
    nan = P.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(cx.InvalidProbabilitiesError, match="row 5 sums to 2"):
        fit_weights(summing, y)
    with pytest.raises(cx.InvalidProbabilitiesError, match=">= 0"):
        fit_weights(negative, y)
    with pytest.raises(cx.ConvexMixError, match="finite"):
        fit_weights(nan, y)
    with pytest.raises(cx.ShapeError, match="N=40"):
        fit_weights(P, y[:30])
    with pytest.raises(cx.ShapeError, match=r"\(K, N\) or \(K, N, C\)"):
        fit_weights(P[0, 0], y)
    with pytest.raises(cx.ConvexMixError, match=r"class labels in \[0, 2\]"):
        fit_weights(P, y + 3)
    with pytest.raises(cx.ConvexMixError, match="integer class labels"):
        fit_weights(P, y.double() + 0.5)
    with pytest.raises(cx.InvalidProbabilitiesError, match=r"in \[0, 1\]"):
        fit_weights(P[..., 0] * 2, y % 2)
    with pytest.raises(cx.ConvexMixError, match="loss must be"):
        fit_weights(P, y, loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(cx.UnknownMapError, match="map must be one of"):
        fit_weights(P, y, map="softplus")
    with pytest.raises(cx.ConvexMixError, match="regularization must be"):
        fit_weights(P, y, regularization=-1.0)
    with pytest.raises(cx.ConvexMixError, match="at least 10 samples"):
        fit_weights(P[:, :8], y[:8], regularization="cv")
    with pytest.raises(cx.ConvexMixError, match="tol must be"):
        fit_weights(P, y, tol=0)
    with pytest.raises(cx.ConvexMixError, match="sample_weight must be finite"):
        fit_weights(P, y, sample_weight=-torch.ones(40))
    with pytest.raises(cx.ConvexMixError, match="numeric"):
        fit_weights(np.array([["a"]]), y)


def caruana_reference(q: np.ndarray, size: int) -> np.ndarray:
    """A plain loop over candidates, recomputing each blend from scratch."""
    K = q.shape[0]
    counts = np.zeros(K)
    for m in range(size):
        losses = [log_loss_np((counts + np.eye(K)[k]) / (m + 1), q) for k in range(K)]
        counts[int(np.argmin(losses))] += 1
    return counts / size


def test_ensemble_selection_against_a_plain_loop() -> None:
    P, y = class_problem(15, 7, 500, 4)
    q = P[:, torch.arange(500), y].numpy()
    sel = ensemble_selection(P, y, size=25)
    np.testing.assert_allclose(sel.weights.numpy(), caruana_reference(q, 25), atol=1e-15)
    assert torch.allclose(sel.weights * 25, (sel.weights * 25).round(), atol=1e-12)
    assert sel.weights.sum().item() == pytest.approx(1.0)
    first = int(np.argmin([log_loss_np(np.eye(7)[k], q) for k in range(7)]))
    assert sel.history[0] == pytest.approx(log_loss_np(np.eye(7)[first], q))
    assert sel.loss >= fit_weights(P, y).loss - 1e-12
    assert sel.gap >= sel.loss - fit_weights(P, y).loss - 1e-12


def test_ensemble_selection_best_prefix() -> None:
    P, y = class_problem(16, 6, 300, 3)
    full = ensemble_selection(P, y, size=40)
    best = ensemble_selection(P, y, size=40, best_prefix=True)
    assert best.n_iter == int(np.argmin(full.history)) + 1
    assert best.loss == pytest.approx(min(full.history))
    assert best.loss <= full.loss
    n = best.n_iter
    assert torch.allclose(best.weights * n, (best.weights * n).round(), atol=1e-12)
    with pytest.raises(cx.ConvexMixError, match="size must be"):
        ensemble_selection(P, y, size=0)


def test_compare_and_predict() -> None:
    P, y = class_problem(17, 5, 400, 3)
    c = compare(P, y, size=20)
    q = P[:, torch.arange(400), y].numpy()
    singles = [log_loss_np(np.eye(5)[k], q) for k in range(5)]
    np.testing.assert_allclose(c.single_losses.numpy(), singles, rtol=1e-13)
    assert c.best_single == int(np.argmin(singles))
    assert c.equal_loss == pytest.approx(log_loss_np(np.full(5, 0.2), q))
    losses = c.losses()
    assert losses["convexmix"] == min(losses.values())
    blend = c.fit.predict(P)
    torch.testing.assert_close(blend, torch.tensordot(c.fit.weights, P, 1))
    with pytest.raises(cx.ShapeError, match="5 models"):
        c.fit.predict(P[:2])


def test_progress_callback_and_history() -> None:
    P, y = class_problem(18, 8, 500, 3)
    seen: list[tuple[int, float, float]] = []
    fit = fit_weights(P, y, callback=lambda i, f, gap: seen.append((i, f, gap)))
    assert [s[0] for s in seen] == list(range(1, len(seen) + 1))
    assert len(fit.history) == len(seen) + 1
    assert all(b <= a + 1e-15 for a, b in zip(fit.history, fit.history[1:], strict=False))
    assert seen[-1][2] == fit.gap <= 1e-10


@pytest.mark.parametrize("N", [300, 70_000])  # the dense numpy path and the torch path
@pytest.mark.parametrize("offset", [1e3, 1e6, 1e9])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_mse_is_exact_whatever_the_targets_level_and_scale(
    N: int, offset: float, scale: float
) -> None:
    """Shifting predictions and targets by the same level leaves the optimum where it was
    (the weights sum to one); scaling them scales the loss. Targets at 1e6 with errors of
    1 gave weights 0.35 off the optimum, a loss 4.5x the optimum's, and converged=True
    (the quadratic was expanded as w'PP'w - 2w'Py + y'y, which cancels 12 digits)."""
    rng = np.random.default_rng(N)
    K = 4
    y = rng.standard_normal(N)
    sd = np.array([0.5, 1.0, 2.0, 0.7])[:, None]
    bias = np.array([0.1, -0.2, 0.3, 0.0])[:, None]
    P = y + sd * rng.standard_normal((K, N)) + bias
    D = P - y

    def obj(w: np.ndarray) -> tuple[float, np.ndarray]:
        r = w @ D
        return float(r @ r) / N, 2 * D @ r / N

    ref = slsqp(obj, K)  # on the unshifted, unscaled residuals
    fit = fit_weights((P + offset) * scale, (y + offset) * scale, loss="mse")
    assert fit.converged
    np.testing.assert_allclose(fit.weights, ref, atol=1e-5)
    # the shifted data's own rounding: each value carries half an ulp of the level
    ulp = np.spacing((abs(offset) + 10) * scale) / scale
    assert abs(fit.loss / scale**2 - obj(ref)[0]) <= 1e-9 + 8 * ulp


# ------------------------------------------------------------------ hardening regressions


def test_mse_on_overflowing_predictions_is_a_clear_error() -> None:
    """Predictions >= 1e154 raised IndexError from argmin (or gave uniform)."""
    rng = np.random.default_rng(0)
    for scale in (1e155, 1e200):
        P, y = rng.random((3, 50)) * scale, rng.random(50) * scale
        with pytest.raises(cx.ConvexMixError, match=r"mse squares them.*rescale them"):
            fit_weights(P, y, loss="mse")
        with pytest.raises(cx.ConvexMixError, match="not finite at the starting weights"):
            compare(P, y, loss="mse", size=5)


def test_callable_loss_returning_nan_is_a_clear_error() -> None:
    """A callable loss returning NaN gave uniform weights, converged=False."""
    rng = np.random.default_rng(1)
    P, y = rng.random((3, 40)), (rng.random(40) > 0.5).astype(float)

    def nan_loss(blend: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (blend * float("nan")).mean()

    with pytest.raises(cx.ConvexMixError, match="callable loss returns finite values"):
        fit_weights(P, y, loss=nan_loss)
