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
import types

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


# ---------------------------------------------------------------------------------------
# Differential: the step against the class docstring's formulas written out plainly, over
# drawn rules, sizes, step sizes, smoothing, starts and runs with unobserved domains, in
# every input form; and the step's paths (dicts of floats; every other form) against each
# other, bit for bit, errors included.

ULPS = 8  # in units in the last place of the rounding scale (see docstring_run), at least 1
UPDATES = ["doremi", "eg", "exp3"]


def softmax(z: list[float]) -> list[float]:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = sum(e)
    return [v / total for v in e]


def docstring_run(  # type: ignore[no-untyped-def]
    update: str, lr: float, c: float, w0: list[float], steps
) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """Weights, average and scores after ``steps`` of (losses, refs, counts) by domain index
    (refs/counts None when not given), straight from the docstring of MixtureWeights; and
    the scales of their rounding: the largest log-weight for the weights (softmax turns
    its absolute rounding into relative errors of the weights), the size of the terms each
    score sums for the scores."""
    k = len(w0)
    w = list(w0)
    last = [0.0] * k  # doremi / eg: each domain's last score (0 before it is observed)
    s = [math.log(p) if p > 0 else -math.inf for p in w0]  # exp3: S_0 = log w_0
    scale = [abs(v) for v in s] if update == "exp3" else [0.0] * k
    history = []
    top = 1.0
    for losses, refs, counts in steps:
        observed = [i for i in losses if counts is None or counts[i] > 0]
        if update == "exp3":
            for i in observed:
                ghat = (losses[i] - (refs[i] if refs else 0.0)) / w[i]
                s[i] += lr * ghat
                scale[i] += abs(lr * ghat)
            z = list(s)
        else:
            for i in observed:
                g = losses[i] - (refs[i] if refs else 0.0)
                last[i] = max(g, 0.0) if update == "doremi" else g
                scale[i] = abs(last[i])
            logw = [math.log(p) if p > 0 else -math.inf for p in w]
            z = [a + lr * v for a, v in zip(logw, last, strict=True)]
        top = max([top] + [abs(v) for v in z if v > -math.inf])
        w = [(1 - c) * v + c / k for v in softmax(z)]
        history.append(w)
    average = [sum(h[i] for h in history) / len(history) for i in range(k)]
    return w, average, (s if update == "exp3" else last), [top] * k, scale


def assert_ulps(
    got: list[float], want: list[float], what: str, scale: list[float] | None = None
) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        tol = ULPS * math.ulp(max(abs(a), abs(b), 1.0, scale[i] if scale else 0.0))
        assert abs(a - b) <= tol, (
            f"{what}[{i}]: {a!r} vs {b!r} ({abs(a - b) / tol * ULPS:.1f} ulps)"
        )


@st.composite
def runs(draw: st.DrawFn, max_k: int = 10):  # type: ignore[no-untyped-def]
    """A MixtureWeights set-up and a run of steps, by domain index: a random subset of the
    domains observed each step, references for all of them or none, counts or none."""
    update = draw(st.sampled_from(UPDATES))
    k = draw(st.integers(1, max_k))
    lr = draw(st.floats(1e-3, 4.0))
    c = draw(st.floats(1e-3 if update == "exp3" else 0.0, 1.0))
    if draw(st.booleans()):
        raw = draw(st.lists(st.floats(0.05, 1.0), min_size=k, max_size=k))
        w0 = [v / math.fsum(raw) for v in raw]
    else:
        w0 = [1.0 / k] * k
    with_refs = draw(st.booleans())
    with_counts = draw(st.booleans())
    value = st.floats(-3.0, 8.0, allow_nan=False)
    steps = []
    for _ in range(draw(st.integers(1, 25))):
        seen = draw(st.lists(st.integers(0, k - 1), unique=True, max_size=k))
        losses = {i: draw(value) for i in seen}
        refs = {i: draw(value) for i in seen} if with_refs else None
        counts = {i: draw(st.integers(0, 5)) for i in seen} if with_counts else None
        steps.append((losses, refs, counts))
    return update, lr, c, w0, steps


def as_form(values: dict[int, float] | None, names: list[str], form: str, fill: float):  # type: ignore[no-untyped-def]
    """A step input by index in one of the accepted forms; a vector form fills the domains
    a mapping would leave out with ``fill`` (a count of 0 makes them unobserved)."""
    if values is None:
        return None
    if form == "dict":
        return {names[i]: v for i, v in values.items()}
    if form == "mapping":  # a Mapping that is not a dict: the general route
        return types.MappingProxyType({names[i]: v for i, v in values.items()})
    vec = [float(values.get(i, fill)) for i in range(len(names))]
    return torch.tensor(vec, dtype=torch.float64) if form == "tensor" else vec


@given(run=runs(), form=st.sampled_from(["dict", "mapping", "tensor", "list"]))
def test_step_equals_the_docstring_formulas(run, form: str) -> None:  # type: ignore[no-untyped-def]
    update, lr, c, w0, steps = run
    k = len(w0)
    names = [f"d{i}" for i in range(k)]
    mw = MixtureWeights(names, update=update, lr=lr, smoothing=c, init=w0)
    ref_steps = []
    for losses, refs, counts in steps:
        if form in ("tensor", "list"):
            # every domain has a value; the unobserved ones get a count of 0 (and a NaN
            # loss, the mean of an empty group, which a count of 0 makes harmless)
            counts = {i: (counts[i] if counts else 1) if i in losses else 0 for i in range(k)}
            mw.step(
                as_form(losses, names, form, math.nan),
                as_form(refs, names, form, math.nan),
                counts=as_form(counts, names, form, 0.0),
            )
        else:
            mw.step(
                as_form(losses, names, form, 0.0),
                as_form(refs, names, form, 0.0),
                counts=as_form(counts, names, form, 0.0),
            )
        ref_steps.append((losses, refs, counts))
    want_w, want_avg, want_scores, top, scale = docstring_run(update, lr, c, w0, ref_steps)
    assert_ulps(mw.weights.tolist(), want_w, "weights", top)
    assert_ulps(mw.average.tolist(), want_avg, "average", top)
    assert_ulps(mw.state_dict()["scores"].tolist(), want_scores, "scores", scale)
    assert mw.steps == len(steps)


def test_step_equals_the_docstring_formulas_at_64_domains() -> None:
    rng = np.random.default_rng(11)
    k, names = 64, [f"d{i}" for i in range(64)]
    for update in UPDATES:
        steps = []
        for _ in range(30):
            seen = np.flatnonzero(rng.random(k) < 0.8).tolist()
            steps.append(
                (
                    {i: float(rng.normal(2.0, 1.0)) for i in seen},
                    {i: float(rng.normal(1.5, 0.5)) for i in seen},
                    {i: int(rng.integers(0, 40)) for i in seen},
                )
            )
        mw = MixtureWeights(names, update=update, lr=0.3, smoothing=0.01)
        for losses, refs, counts in steps:
            mw.step(
                *(as_form(v, names, "dict", 0.0) for v in (losses, refs)),
                counts=as_form(counts, names, "dict", 0.0),
            )
        want = docstring_run(update, 0.3, 0.01, [1 / k] * k, steps)
        want_w, want_avg, want_scores, top, scale = want
        assert_ulps(mw.weights.tolist(), want_w, f"{update} weights", top)
        assert_ulps(mw.average.tolist(), want_avg, f"{update} average", top)
        assert_ulps(mw.state_dict()["scores"].tolist(), want_scores, f"{update} scores", scale)
        assert (mw.weights - 1 / k).abs().max() > 1e-3  # it moved


def state_of(mw: MixtureWeights) -> tuple[object, ...]:
    s = mw.state_dict()
    return (
        s["weights"].tolist(),
        s["average"].tolist(),
        s["scores"].tolist(),
        mw.steps,
        mw.version,
    )


@given(
    run=runs(),
    spoil=st.sampled_from(["none", "none", "nan", "inf", "unknown", "no_ref", "int", "count"]),
    where=st.integers(0, 100),
)
def test_dict_path_equals_the_general_path_bit_for_bit(run, spoil: str, where: int) -> None:  # type: ignore[no-untyped-def]
    """Dicts of floats take their own path; any other mapping takes the general one. Both
    give the same weights bit for bit, and the same error, with nothing changed, on a
    spoiled step (the dict path hands those to the general one)."""
    update, lr, c, w0, steps = run
    names = [f"d{i}" for i in range(len(w0))]
    fast = MixtureWeights(names, update=update, lr=lr, smoothing=c, init=w0)
    general = MixtureWeights(names, update=update, lr=lr, smoothing=c, init=w0)
    for t, (losses, refs, counts) in enumerate(steps):
        args = [as_form(v, names, "dict", 0.0) for v in (losses, refs, counts)]
        if t == where % len(steps) and spoil != "none" and losses:
            name = names[sorted(losses)[where % len(losses)]]
            if spoil in ("nan", "inf"):
                args[0][name] = math.nan if spoil == "nan" else -math.inf
            elif spoil == "unknown":
                args[0]["not a domain"] = 1.0
            elif spoil == "no_ref" and args[1] is not None:
                del args[1][name]
            elif spoil == "int":  # an int loss: converted, the same value
                args[0][name] = int(args[0][name])
            elif spoil == "count" and args[2] is not None:
                args[2][name] = -1
        outcomes = []
        for mw, wrap in ((fast, dict), (general, types.MappingProxyType)):
            before = state_of(mw)
            try:
                mw.step(
                    *(None if a is None else wrap(a) for a in args[:2]),
                    counts=None if args[2] is None else wrap(args[2]),
                )
                outcomes.append(None)
            except ConvexMixError as err:
                outcomes.append(str(err))
                assert state_of(mw) == before
        assert outcomes[0] == outcomes[1]
        assert state_of(fast) == state_of(general)


def test_dicts_of_floats_take_their_own_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The differential test above compares two paths only if dicts of floats do not end up
    on the general one."""
    mw = MixtureWeights(["a", "b", "c"], lr=1.0, smoothing=1e-3)

    def general(*args: object) -> None:
        raise AssertionError("the general path was taken")

    monkeypatch.setattr(mw, "_step_any", general)
    mw.step({"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 1.5}, counts={"a": 3, "b": 0})
    mw.step({"c": 2.0})
    assert mw.steps == 2
    with pytest.raises(AssertionError, match="general path"):
        mw.step({"a": float("nan")})


def test_every_log_weight_minus_inf_is_the_overflow_error() -> None:
    mw = MixtureWeights(3, update="eg", lr=100.0)
    with pytest.raises(ConvexMixError, match=r"overflowed \(log-weights \[-inf, -inf, -inf\]\)"):
        mw.step([-1e307, -1e307, -1e307])
    assert mw.weights.tolist() == [1 / 3] * 3
    assert mw.steps == 0


@pytest.mark.parametrize("form", ["dict", "tensor"])
def test_a_process_group_without_torch_distributed_is_an_error_after_the_inputs(
    form: str,
) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    mw = MixtureWeights(["a", "b"], lr=1.0, process_group=object())
    good = {"a": 1.0, "b": 2.0} if form == "dict" else torch.tensor([1.0, 2.0])
    with pytest.raises(ConvexMixError, match=r"process_group was given but torch\.distributed"):
        mw.step(good)
    bad = {"a": 1.0, "zz": 2.0} if form == "dict" else torch.ones(3)
    with pytest.raises(ConvexMixError, match=r"unknown domain 'zz'|shape \(2,\)"):
        mw.step(bad)
    assert mw.steps == 0
