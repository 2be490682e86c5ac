"""fit_weights' two paths (the dense numpy path for small fits, the torch path) reach the
same optimum; the stopping rule does not depend on the units of mse targets; regression
targets without loss="mse" get a hint; results follow the type of the inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import convexmix as cx
from convexmix.ensemble import _dense, fit_weights

from .problems import mixed_problem


def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force every fit onto the torch path."""
    monkeypatch.setattr(_dense, "DENSE_MAX_VALUES", 0)


def spy_dense(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per fit, whether the dense path took it."""
    taken: list[bool] = []
    original = _dense.prepare

    def spy(*args: object, **kwargs: object) -> _dense.DenseProblem | None:
        out = original(*args, **kwargs)  # type: ignore[arg-type]
        taken.append(out is not None)
        return out

    monkeypatch.setattr(_dense, "prepare", spy)
    return taken


@settings(max_examples=40, deadline=None)
@given(
    K=st.integers(1, 12),
    N=st.integers(1, 400),
    C=st.sampled_from([0, 2, 3, 10]),  # 0: (K, N) binary probabilities
    loss=st.sampled_from(["log_loss", "mse"]),
    lam=st.sampled_from([0.0, 0.0, 1e-3, 0.5]),
    weighted=st.booleans(),
    float32=st.booleans(),
    numpy=st.booleans(),
    layout=st.sampled_from(["C", "F", "strided"]),  # the gathers' two branches
    seed=st.integers(0, 2**16),
)
def test_dense_path_equals_the_torch_path(
    K: int,
    N: int,
    C: int,
    loss: str,
    lam: float,
    weighted: bool,
    float32: bool,
    numpy: bool,
    layout: str,
    seed: int,
) -> None:
    P, y = mixed_problem(K, N, max(C, 2), seed=seed)
    if C == 0:
        P = P[..., 1]  # the probability of class 1
    if float32:
        P = P.float()
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(N, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    if numpy:
        a = P.numpy()
        if layout == "F":
            a = np.asfortranarray(a)
        elif layout == "strided":
            a = np.repeat(a, 2, axis=1)[:, ::2]  # a view with a step along the rows
        assert np.array_equal(a, P.numpy())
        args = (a, y.numpy())
    else:
        args = (P, y)
    kw = {"loss": loss, "regularization": lam, "sample_weight": s}
    with pytest.MonkeyPatch.context() as m:
        taken = spy_dense(m)
        dense = fit_weights(*args, **kw)  # type: ignore[arg-type]
        assert taken == [True]
    with pytest.MonkeyPatch.context() as m:
        torch_path(m)
        ref = fit_weights(*args, **kw)  # type: ignore[arg-type]
    assert type(dense.weights) is type(ref.weights)
    assert isinstance(dense.weights, np.ndarray) == numpy
    assert dense.converged
    assert ref.converged
    w = torch.as_tensor(dense.weights)
    assert bool((w >= 0).all())
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    # the same optimum: the losses within the stopping rule's tolerance (scale-free)
    scale = 1.0 if loss == "log_loss" else max(float((y.double() ** 2).mean()), 1.0)
    assert dense.loss == pytest.approx(ref.loss, abs=1e-9 * scale)
    assert dense.regularization == ref.regularization
    torch.testing.assert_close(torch.as_tensor(dense.free), torch.as_tensor(ref.free).double())


@pytest.mark.parametrize("loss", ["log_loss", "mse"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_validated_guard_is_the_same_on_both_paths(
    loss: str, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    P, y = mixed_problem(6, 120, 3, seed=seed)
    dense = fit_weights(P.numpy(), y.numpy(), loss=loss, regularization="cv", seed=seed)
    torch_path(monkeypatch)
    ref = fit_weights(P.numpy(), y.numpy(), loss=loss, regularization="cv", seed=seed)
    assert dense.regularization == ref.regularization  # the same lambda chosen
    assert dense.converged
    assert ref.converged
    assert dense.loss == pytest.approx(ref.loss, abs=1e-9)
    np.testing.assert_allclose(dense.weights, ref.weights, atol=1e-6)
    with pytest.raises(cx.ConvexMixError, match="needs at least 10 samples"):
        fit_weights(P[:, :9].numpy(), y[:9].numpy(), regularization="cv")


def test_the_dense_path_takes_small_fits_only(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = spy_dense(monkeypatch)
    P, y = mixed_problem(4, 300, 3, seed=0)
    fit_weights(P, y)
    fit_weights(P, y, max_weight=0.5)  # caps: the torch path (prepare is not asked)
    fit_weights(P, y, loss=lambda b, t: -b.gather(1, t[:, None]).log().squeeze(1))  # callable
    monkeypatch.setattr(_dense, "DENSE_MAX_VALUES", 4 * 300 - 1)
    fit_weights(P, y)
    assert taken == [True, False, False]


def test_bad_inputs_get_the_torch_paths_errors() -> None:
    P, y = mixed_problem(3, 50, 3, seed=1)
    bad = P.clone()
    bad[1, 7, 0] = -0.1
    with pytest.raises(cx.InvalidProbabilitiesError, match="model 1 must be probabilities >= 0"):
        fit_weights(bad.numpy(), y.numpy())
    nan = P.clone()
    nan[2, 3, 1] = float("nan")
    with pytest.raises(cx.ConvexMixError, match="finite"):
        fit_weights(nan, y)
    with pytest.raises(cx.ConvexMixError, match=r"class labels in \[0, 2\]"):
        fit_weights(P, y + 1)
    for value, error in [
        (1.5, r"row 5 sums to 2\.5"),  # a row that does not sum to 1
        (float("inf"), "model 0 must be finite"),
    ]:
        off = P.clone()
        off[0, 5] = torch.tensor([value, 0.5, 0.5], dtype=off.dtype)
        with pytest.raises(cx.ConvexMixError, match=error):
            fit_weights(off.numpy(), y.numpy())
    near = P.clone()
    near[0, 5] = torch.tensor([0.5009, 0.25, 0.25], dtype=near.dtype)  # within 1e-3 of 1
    with pytest.MonkeyPatch.context() as m:
        taken = spy_dense(m)
        assert fit_weights(near.numpy(), y.numpy()).converged
        assert taken == [True]


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6])
@pytest.mark.parametrize("path", ["dense", "torch"])
def test_mse_converges_at_any_scale(
    scale: float, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stopping rule is relative to the loss's scale: the same problem in other units
    converges to the same weights (diabetes-like targets in [25, 341] did not)."""
    if path == "torch":
        torch_path(monkeypatch)
    g = torch.Generator().manual_seed(0)
    y = 25 + 316 * torch.rand(300, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 300, generator=g, dtype=torch.float64)
    P = y + noise * torch.tensor([[20.0], [35.0], [50.0], [80.0]])
    unit = fit_weights(P / 100, y / 100, loss="mse")
    fit = fit_weights(P * (scale / 100), y * (scale / 100), loss="mse")
    assert fit.converged
    assert unit.converged
    torch.testing.assert_close(fit.weights, unit.weights, atol=1e-7, rtol=0)
    assert fit.loss == pytest.approx(unit.loss * scale**2, rel=1e-9)


@pytest.mark.parametrize("path", ["dense", "torch"])
def test_regression_targets_without_mse_get_a_hint(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "torch":
        torch_path(monkeypatch)
    g = torch.Generator().manual_seed(0)
    y = 25 + 316 * torch.rand(60, generator=g, dtype=torch.float64)
    P = torch.stack([y + 10, y - 10])
    with pytest.raises(cx.ConvexMixError, match="regression targets: pass loss='mse'"):
        fit_weights(P, y.round())  # integers out of the label range
    with pytest.raises(cx.ConvexMixError, match="regression targets: pass loss='mse'"):
        fit_weights(P.numpy(), y.numpy())  # non-integer
    assert fit_weights(P.numpy(), y.numpy(), loss="mse").converged


@pytest.mark.parametrize("map_", ["softmax", "sparsemax"])
def test_free_values_of_a_numpy_fit_are_the_maps_inverse(map_: str) -> None:
    """A numpy fit's ``free`` (softmax: computed in numpy, no torch call) is the map's
    inverse of its weights, as for tensors: the map takes it back to the weights."""
    P, y = mixed_problem(5, 200, 3, seed=4)
    P[3] = 1.0 / 3  # an uninformative model: an exact zero weight
    fit = fit_weights(P.numpy(), y.numpy(), map=map_)
    ref = fit_weights(P, y, map=map_)
    assert isinstance(fit.free, np.ndarray)
    assert fit.free.dtype == np.float64
    np.testing.assert_allclose(fit.free, ref.free.numpy(), rtol=1e-15, atol=0)
    back = getattr(cx.functional, map_)(torch.from_numpy(fit.free))
    np.testing.assert_allclose(back.numpy(), fit.weights, atol=1e-10)
