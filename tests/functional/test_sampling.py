"""The sampling maps: gumbel_softmax and sample_topk.

References: softmax probabilities (chi-square on hard draws), exact Plackett-Luce
enumeration of top-k inclusion probabilities, float64 gradcheck of the relaxed path, the
special-value contract (hypothesis, every dtype), and the everyday path against the
careful one on the same noise.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import convexmix as cx
from convexmix.functional import _gumbel

F = cx.functional
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECIAL = [0.0, 1.0, -1.0, 1e4, -1e4, math.inf, -math.inf, 3.5, -20.0]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def special_logits(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = draw(st.integers(1, 4))
    k = draw(st.integers(1, 6))
    values = draw(
        st.lists(
            st.one_of(st.sampled_from(SPECIAL), st.floats(-50, 50)),
            min_size=rows * k,
            max_size=rows * k,
        )
    )
    x = torch.tensor(values, dtype=torch.float64).reshape(rows, k)
    mask = None
    if draw(st.booleans()):
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=rows * k, max_size=rows * k)))
        mask = mask.reshape(rows, k)
    return x, mask


def _present(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    present = x != -math.inf
    return present if mask is None else present & mask


@given(
    special_logits(),
    st.sampled_from(DTYPES),
    st.sampled_from([0.0, 5e-324, 1e-300, 1e-45, 1e-20, 0.1, 1.0, 7.0, 1e30, math.inf]),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_gumbel_softmax_special_values(case, dtype, tau, hard, seed):
    x64, mask = case
    x = x64.to(dtype)
    y = F.gumbel_softmax(x, tau, hard=hard, mask=mask, generator=gen(seed))
    assert y.dtype == dtype
    assert y.shape == x.shape
    present = _present(x, mask)
    nan_rows = torch.isnan(x).any(-1)
    assert torch.isnan(y[nan_rows]).all()
    y, present = y[~nan_rows].double(), present[~nan_rows]
    assert torch.isfinite(y).all()
    assert (y >= 0).all()
    assert (y[~present] == 0).all()
    expected = present.any(-1).double()
    tol = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    torch.testing.assert_close(y.sum(-1), expected, atol=tol, rtol=0)
    if hard or tau == 0.0:
        assert set(y.unique().tolist()) <= {0.0, 1.0}
    # +inf entries take all the mass from the finite ones.
    has_inf = ((x[~nan_rows] == math.inf) & present).any(-1)
    finite_present = present & torch.isfinite(x[~nan_rows])
    assert (y[has_inf][finite_present[has_inf]] == 0).all()


@given(
    special_logits(),
    st.sampled_from(DTYPES),
    st.sampled_from([0.0, 5e-324, 1e-300, 1e-45, 1e-20, 0.1, 1.0, 1e30, math.inf]),
    st.booleans(),
    st.integers(1, 6),
    st.integers(0, 2**31),
)
def test_sample_topk_special_values(case, dtype, tau, hard, k, seed):
    x64, mask = case
    x = x64.to(dtype)
    k = min(k, x.shape[-1])
    y = F.sample_topk(x, k, tau, hard=hard, mask=mask, generator=gen(seed))
    present = _present(x, mask)
    nan_rows = torch.isnan(x).any(-1)
    assert torch.isnan(y[nan_rows]).all()
    y, present = y[~nan_rows].double(), present[~nan_rows]
    assert torch.isfinite(y).all()
    assert (y >= 0).all()
    assert (y[~present] == 0).all()
    expected = present.sum(-1).clamp(max=k).double()
    tol = 3e-2 * k if dtype in (torch.float16, torch.bfloat16) else 1e-5 * k
    torch.testing.assert_close(y.sum(-1), expected, atol=tol, rtol=0)
    if hard or tau == 0.0:
        assert set(y.unique().tolist()) <= {0.0, 1.0}


def test_hard_draws_follow_softmax_chi_square():
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0, -0.4])
    n = 200_000
    y = F.gumbel_softmax(logits.expand(n, -1), hard=True, generator=gen(11))
    counts = y.sum(0).double()
    expected = torch.softmax(logits.double(), 0) * n
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def _plackett_luce_inclusion(logits: torch.Tensor, k: int) -> torch.Tensor:
    """P(i in the top-k subset) by enumerating every ordered k-prefix."""
    p = torch.softmax(logits.double(), 0).tolist()
    out = [0.0] * len(p)
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        for i in order:
            out[i] += prob
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(("k", "size"), [(1, 4), (2, 5), (3, 6), (2, 3)])
def test_topk_inclusion_matches_plackett_luce(k, size):
    logits = torch.linspace(-1.0, 1.5, size)
    n = 200_000
    y = F.sample_topk(logits.expand(n, -1), k, hard=True, generator=gen(k + size)).double()
    assert (y.sum(-1) == k).all()
    freq = y.mean(0)
    exact = _plackett_luce_inclusion(logits, k)
    # each inclusion is a Bernoulli(exact): 5 standard errors
    se = (exact * (1 - exact) / n).sqrt()
    assert ((freq - exact).abs() <= 5 * se + 1e-12).all(), (freq, exact)


def test_generator_reproduces_and_tau_zero_is_the_argmax_of_the_same_noise():
    x = torch.randn(7, 5)
    a = F.gumbel_softmax(x, 0.5, generator=gen(3))
    b = F.gumbel_softmax(x, 0.5, generator=gen(3))
    assert torch.equal(a, b)
    hard0 = F.gumbel_softmax(x, 0.0, generator=gen(3))
    assert torch.equal(hard0.argmax(-1), a.argmax(-1))
    assert torch.equal(hard0, F.gumbel_softmax(x, 0.5, hard=True, generator=gen(3)))
    big = torch.tensor([0.0, 100.0, 1.0])
    assert torch.equal(F.gumbel_softmax(big, 0), torch.tensor([0.0, 1.0, 0.0]))
    top = F.sample_topk(x, 2, 0.0, generator=gen(4))
    assert torch.equal(top, F.sample_topk(x, 2, 0.3, hard=True, generator=gen(4)))


@pytest.mark.parametrize("fn", ["gumbel", "topk"])
def test_straight_through_gradient_is_the_relaxed_gradient(fn):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, dtype=torch.float64)

    def run(hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if fn == "gumbel":
            y = F.gumbel_softmax(x, 0.7, hard=hard, generator=gen(5))
        else:
            y = F.sample_topk(x, 2, 0.7, hard=hard, generator=gen(5))
        (grad,) = torch.autograd.grad((y * w).sum(), x)
        return y, grad

    _soft, g_soft = run(False)
    hard, g_hard = run(True)
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(g_hard, g_soft, rtol=0, atol=0)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_relaxed_gradcheck(dim):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 5, generator=gen(1)) > 0.2
    torch.autograd.gradcheck(
        lambda t: F.gumbel_softmax(t, 0.6, dim=dim, mask=mask, generator=gen(2)), (x,)
    )
    torch.autograd.gradcheck(
        lambda t: F.sample_topk(t, 2, 0.6, dim=dim, mask=mask, generator=gen(2)), (x,)
    )


def test_tau_zero_has_zero_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    y = F.gumbel_softmax(x, 0.0, generator=gen(0))
    assert not y.requires_grad or torch.autograd.grad(y.sum(), x, allow_unused=True)[0] is None


@pytest.mark.parametrize("hard", [False, True])
def test_everyday_path_equals_the_careful_path(monkeypatch, hard):
    x = torch.randn(64, 9, dtype=torch.float64) * 3
    fast = F.gumbel_softmax(x, 0.8, hard=hard, generator=gen(9))
    monkeypatch.setattr(_gumbel, "_any_nan", lambda *a: True)
    careful = F.gumbel_softmax(x, 0.8, hard=hard, generator=gen(9))
    torch.testing.assert_close(careful, fast, rtol=1e-14, atol=1e-15)


def test_vmap_matches_eager():
    x = torch.randn(3, 4, 5)
    noise_free = F.gumbel_softmax(x, 0.0, generator=gen(1))  # eager, for the shapes
    out = torch.func.vmap(lambda t: F.gumbel_softmax(t, 0.5), randomness="different")(x)
    assert out.shape == noise_free.shape
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 4))
    hard = torch.func.vmap(lambda t: F.sample_topk(t, 2, 0.0), randomness="different")(x)
    assert torch.equal(hard.sum(-1), torch.full((3, 4), 2.0))


def test_compile_fullgraph():
    fn = torch.compile(lambda t: F.gumbel_softmax(t, 0.5, hard=True), fullgraph=True)
    y = fn(torch.randn(8, 5))
    assert torch.equal(y.sum(-1), torch.ones(8))


def test_errors():
    x = torch.randn(2, 3)
    with pytest.raises(cx.ConvexMixError, match=r"tau must be >= 0"):
        F.gumbel_softmax(x, -1.0)
    with pytest.raises(cx.ConvexMixError, match=r"tau must be >= 0"):
        F.gumbel_softmax(x, math.nan)
    with pytest.raises(cx.ConvexMixTypeError, match=r"tau must be a number"):
        F.gumbel_softmax(x, "1")  # type: ignore[arg-type]
    with pytest.raises(cx.ConvexMixError, match=r"k must be between 0 and K = 3"):
        F.sample_topk(x, 4)
    with pytest.raises(cx.ConvexMixTypeError, match=r"k must be an int"):
        F.sample_topk(x, 1.0)  # type: ignore[arg-type]
    with pytest.raises(cx.ConvexMixTypeError, match=r"hard must be a bool"):
        F.gumbel_softmax(x, hard=None)  # type: ignore[arg-type]
    with pytest.raises(cx.ConvexMixTypeError, match=r"hard must be a bool"):
        F.sample_topk(x, 1, hard=1)  # type: ignore[arg-type]
    with pytest.raises(cx.ConvexMixError, match=r"floating-point"):
        F.gumbel_softmax(torch.ones(3, dtype=torch.long))
    for bad in (42, "seed"):
        with pytest.raises(cx.ConvexMixTypeError, match=r"generator must be None or a torch"):
            F.gumbel_softmax(x, generator=bad)  # type: ignore[arg-type]
        with pytest.raises(cx.ConvexMixTypeError, match=r"generator must be None or a torch"):
            F.sample_topk(x, 0, generator=bad)  # type: ignore[arg-type]


def test_empty_inputs():
    assert F.gumbel_softmax(torch.empty(0, 3)).shape == (0, 3)
    assert F.gumbel_softmax(torch.empty(2, 0)).shape == (2, 0)
    assert F.sample_topk(torch.empty(2, 0), 0).shape == (2, 0)


def test_known_failures_of_torch_gumbel_softmax():
    """The reported NaN/inf cases of torch's gumbel_softmax: large logits in float16 on
    CPU, tau = 0, all logits -inf but one, huge logits."""
    g = gen(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.tensor([[1e4, -1e4, 0.0], [-math.inf, -math.inf, 5.0]], dtype=dtype)
        for tau in (0.0, 1e-8, 0.1, 1.0):
            for hard in (False, True):
                y = F.gumbel_softmax(x.expand(4096, 2, 3), tau, hard=hard, generator=g)
                assert torch.isfinite(y).all()
                assert (y[:, 1, 2] == 1).all()
                assert (y[:, 0, 0] == 1).all()


@pytest.mark.skipif(os.environ.get("CONVEXMIX_LONG") != "1", reason="long: CONVEXMIX_LONG=1")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_long_no_nan_in_1e8_draws(dtype):
    g = gen(123)
    logits = torch.tensor([1e4, -1e4, 0.0, math.inf, -math.inf, 3.0, -3.0, 1e-3], dtype=dtype)
    mask = torch.tensor([True, True, True, False, True, True, True, True])
    rows = 1 << 20
    x = logits.expand(rows, -1)
    for _ in range(100_000_000 // (rows * logits.numel()) + 1):
        for hard in (False, True):
            y = F.gumbel_softmax(x, 0.5, hard=hard, mask=mask, generator=g)
            assert torch.isfinite(y).all()
            z = F.sample_topk(x, 3, 0.5, hard=hard, mask=mask, generator=g)
            assert torch.isfinite(z).all()


def _xie_ermon_reference(x: torch.Tensor, k: int, tau: float, seed: int) -> torch.Tensor:
    """ermongroup/subsets' continuous_topk in float64, on the same noise: the update
    ``w += log(1 - a)`` on the unscaled keys, then ``a = softmax(w / tau)``."""
    u = torch.rand(x.shape, dtype=torch.float64, generator=gen(seed))
    w = x - torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    a, out = torch.zeros_like(w), torch.zeros_like(w)
    for _ in range(k):
        w = w + torch.log((1 - a).clamp_min(1e-300))
        a = torch.softmax(w / tau, -1)
        out = out + a
    return out


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.1, 2.0])
def test_relaxed_topk_matches_xie_ermon_and_tends_to_k_hot(tau):
    x = torch.tensor([[10.0, 0.0, -5.0, -8.0], [0.3, -0.2, 1.0, 0.0]], dtype=torch.float64)
    y = F.sample_topk(x, 2, tau, generator=gen(0))
    torch.testing.assert_close(y, _xie_ermon_reference(x, 2, tau, 0), rtol=1e-9, atol=1e-12)
    cold = F.sample_topk(x, 2, 1e-3, generator=gen(0))
    torch.testing.assert_close(cold, F.sample_topk(x, 2, 0.0, generator=gen(0)), atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [1e-300, 5e-324])
def test_tau_below_the_compute_dtype_is_the_hard_sample(dtype, tau):
    x = torch.tensor([[3.0, 1e4, -1e4, 0.0], [0.5, 0.0, -0.5, 2.0]], dtype=dtype)
    y = F.gumbel_softmax(x, tau, generator=gen(1))
    assert torch.equal(y, F.gumbel_softmax(x, 0.0, generator=gen(1)))
    top = F.sample_topk(x, 2, tau, generator=gen(1))
    assert torch.equal(top, F.sample_topk(x, 2, 0.0, generator=gen(1)))


def test_tau_inf_is_uniform_over_the_present_entries():
    x = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, -math.inf, 1.0, 3.0]])
    mask = torch.tensor([True, False, True, True])
    y = F.gumbel_softmax(x, math.inf, mask=mask, generator=gen(0))
    expected = torch.tensor([[1 / 3, 0, 1 / 3, 1 / 3], [1 / 3, 0, 1 / 3, 1 / 3]])
    torch.testing.assert_close(y, expected)
    top = F.sample_topk(x, 2, math.inf, mask=mask, generator=gen(0))
    torch.testing.assert_close(top, 2 * expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relaxed_topk_takes_every_inf_entry_before_a_finite_one(dtype):
    x = torch.tensor([math.inf, math.inf, 0.0, -1.0], dtype=dtype).expand(64, -1)
    for tau in (1e-6, 1e-4, 1e-2, 0.5):
        y = F.sample_topk(x, 2, tau, generator=gen(3))
        assert (y[:, 2:] <= 1e-30).all(), tau  # the finite entries wait for both +inf ones
        torch.testing.assert_close(y.sum(-1), torch.full((64,), 2.0, dtype=dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_draws_are_finite_and_follow_the_generator(dtype):
    x = torch.tensor([[1e4, -1e4, 0.0, math.inf, -math.inf]], dtype=dtype, device="cuda")
    x = x.expand(4096, -1)
    g = torch.Generator(device="cuda").manual_seed(0)
    for tau in (0.0, 1e-8, 0.5, 1.0):
        for hard in (False, True):
            y = F.gumbel_softmax(x, tau, hard=hard, generator=g)
            assert torch.isfinite(y).all()
            assert (y[:, 3] == 1).all()
            z = F.sample_topk(x, 2, tau, hard=hard, generator=g)
            assert torch.isfinite(z).all()
    a = F.gumbel_softmax(x.float(), 0.5, generator=torch.Generator("cuda").manual_seed(1))
    b = F.gumbel_softmax(x.float(), 0.5, generator=torch.Generator("cuda").manual_seed(1))
    assert torch.equal(a, b)
