"""MixtureWeights against independent NumPy references of the published updates.

DoReMi (Xie et al., 2023, Algorithm 1): alpha'_t = alpha_{t-1} * exp(eta * lambda_t)
normalised, alpha_t = (1 - c) alpha'_t + c u, lambda_t = max(loss - ref, 0), the result
the mean of alpha_1..alpha_T; the reference code reuses an unobserved domain's last score.
EG: w_T proportional to w_0 * exp(eta * sum_t g_t). EXP3: w_t = (1 - gamma) softmax(log w_0 +
eta * sum_s ghat_s) + gamma / K with ghat = loss / w_{s-1} on the observed domains.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from convexmix.data import MixtureWeights
from convexmix.errors import ConvexMixError, ConvexMixTypeError, ShapeError

NAMES = ["web", "code", "books", "math", "wiki"]


def recorded(seed: int, t: int = 60, k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Losses, reference losses and an observed mask, (T, K), like a real run's log."""
    rng = np.random.default_rng(seed)
    ref = rng.uniform(1.5, 4.0, size=k)
    loss = ref[None, :] + rng.normal(0.0, 0.6, size=(t, k)) + np.linspace(1.0, 0.0, t)[:, None]
    seen = rng.random((t, k)) < 0.7
    seen[0] = True
    ref_t = ref[None, :] + rng.normal(0.0, 0.05, size=(t, k))
    return loss, ref_t, seen


def doremi_ref(loss, ref, seen, eta, c, w0):  # type: ignore[no-untyped-def]
    """Algorithm 1 of the DoReMi paper, written out with NumPy (float64)."""
    k = loss.shape[1]
    alpha = np.array(w0, dtype=np.float64)
    last = np.zeros(k)
    history = []
    for t in range(loss.shape[0]):
        lam = np.where(seen[t], np.maximum(loss[t] - ref[t], 0.0), last)
        last = lam
        a = alpha * np.exp(eta * lam)
        a = a / a.sum()
        alpha = (1 - c) * a + c / k
        history.append(alpha)
    return alpha, np.mean(history, axis=0)


def as_maps(row: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {n: float(v) for n, v, m in zip(NAMES, row, mask, strict=True) if m}


@pytest.mark.parametrize("smoothing", [0.0, 1e-3, 0.2])
@pytest.mark.parametrize("eta", [1.0, 0.1])
def test_doremi_equals_the_paper_on_recorded_losses(smoothing: float, eta: float) -> None:
    loss, ref, seen = recorded(0)
    w0 = np.array([0.4, 0.1, 0.2, 0.2, 0.1])
    mw = MixtureWeights(NAMES, update="doremi", lr=eta, smoothing=smoothing, init=list(w0))
    for t in range(loss.shape[0]):
        mw.step(as_maps(loss[t], seen[t]), as_maps(ref[t], seen[t]))
    want, want_avg = doremi_ref(loss, ref, seen, eta, smoothing, w0)
    np.testing.assert_allclose(mw.weights.numpy(), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mw.average.numpy(), want_avg, rtol=0, atol=1e-12)
    assert mw.steps == loss.shape[0]
    assert mw.weights.dtype == torch.float64
    # the weights moved: not the start, and toward higher excess loss
    assert np.abs(want - w0).max() > 1e-2


def test_doremi_tensor_form_equals_mapping_form() -> None:
    loss, ref, _ = recorded(1, t=10)
    a = MixtureWeights(NAMES, lr=1.0, smoothing=1e-3)
    b = MixtureWeights(NAMES, lr=1.0, smoothing=1e-3)
    for t in range(10):
        a.step(torch.from_numpy(loss[t]), torch.from_numpy(ref[t]))
        b.step(dict(zip(NAMES, loss[t].tolist(), strict=True)), list(ref[t]))
    assert torch.equal(a.weights, b.weights)
    assert torch.equal(a.average, b.average)


def test_eg_closed_form() -> None:
    loss, _, _ = recorded(2, t=40)
    w0 = np.array([0.1, 0.2, 0.3, 0.25, 0.15])
    mw = MixtureWeights(NAMES, update="eg", lr=0.05, init=w0.tolist())
    for t in range(loss.shape[0]):
        mw.step(torch.from_numpy(loss[t]))
    z = np.log(w0) + 0.05 * loss.sum(axis=0)
    want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(mw.weights.numpy(), want, rtol=0, atol=1e-12)


def test_eg_uses_the_unclipped_excess_and_doremi_the_clipped() -> None:
    ref = {"a": 2.0, "b": 2.0}
    eg = MixtureWeights(["a", "b"], update="eg", lr=1.0)
    dr = MixtureWeights(["a", "b"], update="doremi", lr=1.0)
    for mw in (eg, dr):
        mw.step({"a": 1.0, "b": 2.0}, ref)  # excess -1 and 0
    np.testing.assert_allclose(
        eg.weights.numpy(), [math.exp(-1) / (1 + math.exp(-1)), 1 / (1 + math.exp(-1))], atol=1e-15
    )
    np.testing.assert_allclose(dr.weights.numpy(), [0.5, 0.5], atol=1e-15)  # clipped to 0


def exp3_ref(loss, seen, eta, gamma, w0):  # type: ignore[no-untyped-def]
    k = loss.shape[1]
    s = np.log(w0)
    p = np.array(w0, dtype=np.float64)
    for t in range(loss.shape[0]):
        ghat = np.where(seen[t], loss[t] / p, 0.0)
        s = s + eta * ghat
        e = np.exp(s - s.max())
        p = (1 - gamma) * e / e.sum() + gamma / k
    return p, s


@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_exp3_closed_form(gamma: float) -> None:
    loss, _, seen = recorded(3, t=50)
    seen = np.random.default_rng(4).random(seen.shape) < 0.3  # bandit feedback: few domains
    w0 = np.full(5, 0.2)
    mw = MixtureWeights(NAMES, update="exp3", lr=0.01, smoothing=gamma)
    for t in range(loss.shape[0]):
        mw.step(as_maps(loss[t], seen[t]))
    want, scores = exp3_ref(loss, seen, 0.01, gamma, w0)
    np.testing.assert_allclose(mw.weights.numpy(), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mw.state_dict()["scores"].numpy(), scores, rtol=1e-13)
    if gamma:
        assert mw.weights.min() >= gamma / 5 - 1e-15


def test_exp3_unobserved_domains_get_no_feedback() -> None:
    mw = MixtureWeights(["a", "b", "c"], update="exp3", lr=0.5, smoothing=0.1)
    mw.step({"a": 1.0})
    s = mw.state_dict()["scores"]
    assert s[1] == s[2] == math.log(1 / 3)
    assert s[0] == pytest.approx(math.log(1 / 3) + 0.5 * 1.0 / (1 / 3), rel=1e-15)


def test_unobserved_domain_reuses_its_last_score_in_doremi() -> None:
    mw = MixtureWeights(["a", "b"], lr=1.0)
    mw.step({"a": 3.0, "b": 1.0})  # scores 3, 1
    mw.step({"a": 3.0})  # b reuses 1
    z = np.array([6.0, 2.0])
    np.testing.assert_allclose(mw.weights.numpy(), np.exp(z) / np.exp(z).sum(), atol=1e-15)


@given(
    losses=st.lists(
        st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=3, max_size=3),
        min_size=1,
        max_size=8,
    ),
    update=st.sampled_from(["doremi", "eg", "exp3"]),
    lr=st.floats(1e-3, 100.0),
    smoothing=st.floats(0.0, 1.0),
)
def test_invariants_simplex_bounds_monotone(
    losses: list[list[float]], update: str, lr: float, smoothing: float
) -> None:
    if update == "exp3":
        smoothing = max(smoothing, 1e-3)
    mw = MixtureWeights(3, update=update, lr=lr, smoothing=smoothing)
    for row in losses:
        before = mw.weights
        mw.step(torch.tensor(row))
        w = mw.weights
        assert torch.isfinite(w).all()
        assert abs(w.sum().item() - 1.0) < 1e-12
        assert (w >= smoothing / 3 * (1 - 1e-12)).all()
        # before the mix toward uniform, the domain with the highest loss does not lose
        # weight relative to the lowest one
        hi, lo = int(np.argmax(row)), int(np.argmin(row))
        raw = (w - smoothing / 3) / (1 - smoothing) if smoothing <= 0.5 else None
        if update != "exp3" and raw is not None and before[lo] > 0 and raw[lo] > 1e-6:
            assert raw[hi] / raw[lo] >= before[hi] / before[lo] * (1 - 1e-6)
    a = mw.average
    assert abs(a.sum().item() - 1.0) < 1e-12


def test_huge_losses_give_a_one_hot_not_nan() -> None:
    mw = MixtureWeights(3, update="eg", lr=1.0)
    mw.step(torch.tensor([1e300, 0.0, -1e300], dtype=torch.float64))
    assert mw.weights.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["loss", "reference"])
def test_non_finite_loss_is_an_error_and_leaves_the_weights(bad: float, where: str) -> None:
    mw = MixtureWeights(["a", "b"], lr=1.0, smoothing=0.01)
    mw.step({"a": 2.0, "b": 1.0})
    state = mw.state_dict()
    version = mw.version
    losses, refs = {"a": 1.0, "b": 1.0}, {"a": 0.0, "b": 0.0}
    (losses if where == "loss" else refs)["b"] = bad
    with pytest.raises(ConvexMixError, match=r"finite losses; domains \['b'\].*unchanged"):
        mw.step(losses, refs)
    assert mw.version == version
    after = mw.state_dict()
    for key in ("weights", "average", "scores"):
        assert torch.equal(after[key], state[key])
    assert after["steps"] == state["steps"]


def test_input_errors() -> None:
    mw = MixtureWeights(["a", "b"], lr=1.0)
    with pytest.raises(ConvexMixError, match="unknown domain 'c'"):
        mw.step({"c": 1.0})
    with pytest.raises(ShapeError, match=r"shape \(2,\)"):
        mw.step(torch.ones(3))
    with pytest.raises(ConvexMixError, match=r"must cover every observed domain; missing \['b'\]"):
        mw.step({"a": 1.0, "b": 1.0}, {"a": 0.5})
    with pytest.raises(ConvexMixError, match="counts must be finite and >= 0"):
        mw.step({"a": 1.0}, counts={"a": -1})
    with pytest.raises(ConvexMixTypeError, match="must be a number"):
        mw.step({"a": "x"})
    with pytest.raises(ConvexMixTypeError, match="mapping"):
        mw.step(3.0)  # type: ignore[arg-type]
    assert mw.steps == 0
    with pytest.raises(ConvexMixError, match="update must be one of"):
        MixtureWeights(2, update="dro", lr=1.0)
    with pytest.raises(ConvexMixError, match="lr must be finite and > 0"):
        MixtureWeights(2, lr=0.0)
    with pytest.raises(ConvexMixError, match=r"smoothing must be in \[0, 1\]"):
        MixtureWeights(2, lr=1.0, smoothing=1.5)
    with pytest.raises(ConvexMixError, match="init must be probabilities"):
        MixtureWeights(2, lr=1.0, init=[0.7, 0.7])
    with pytest.raises(
        ConvexMixError, match=r"init must give every domain a weight; missing \['b'\]"
    ):
        MixtureWeights(["a", "b"], lr=1.0, init={"a": 1.0})
    with pytest.raises(ConvexMixError, match="unique"):
        MixtureWeights(["a", "a"], lr=1.0)
    with pytest.raises(ConvexMixError, match="exp3 got feedback for a domain whose weight is 0"):
        MixtureWeights(2, update="exp3", lr=1.0, init=[1.0, 0.0]).step([1.0, 1.0])


def test_counts_zero_marks_unobserved() -> None:
    a = MixtureWeights(["a", "b"], lr=1.0)
    b = MixtureWeights(["a", "b"], lr=1.0)
    a.step({"a": 1.0, "b": 5.0}, counts={"a": 3, "b": 0})
    b.step({"a": 1.0})
    assert torch.equal(a.weights, b.weights)


def test_state_dict_round_trip_and_pickle() -> None:
    loss, ref, seen = recorded(5, t=20)
    mw = MixtureWeights(NAMES, lr=0.5, smoothing=1e-3)
    for t in range(10):
        mw.step(as_maps(loss[t], seen[t]), as_maps(ref[t], seen[t]))
    buf = io.BytesIO()
    torch.save(mw.state_dict(), buf)
    buf.seek(0)
    restored = MixtureWeights(NAMES, lr=9.0)
    restored.load_state_dict(torch.load(buf))
    copies = [restored, pickle.loads(pickle.dumps(mw)), copy.deepcopy(mw)]
    for t in range(10, 20):
        for m in (mw, *copies):
            m.step(as_maps(loss[t], seen[t]), as_maps(ref[t], seen[t]))
    for m in copies:
        assert torch.equal(m.weights, mw.weights)
        assert torch.equal(m.average, mw.average)
        assert m.steps == 20
    with pytest.raises(ConvexMixError, match="the state is for domains"):
        MixtureWeights(["x"], lr=1.0).load_state_dict(mw.state_dict())
    with pytest.raises(ConvexMixError, match="state_dict has keys"):
        mw.load_state_dict({"weights": mw.weights})
    assert "MixtureWeights({'web'" in repr(mw)
