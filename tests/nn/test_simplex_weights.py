"""cx.SimplexWeights: initialisation, masks, training, round trips and errors."""

from __future__ import annotations

import pytest
import torch

import convexmix as cx
from tests.conftest import MAP_NAMES, round_trips


@pytest.mark.parametrize("name", MAP_NAMES)
@pytest.mark.parametrize("n", [1, 3, 7])
def test_uniform_init_is_one_over_n(name: str, n: int) -> None:
    w = cx.SimplexWeights(n, map=name)()
    assert w.shape == (n,)
    torch.testing.assert_close(w, torch.full((n,), 1.0 / n), atol=2e-7, rtol=0)


@pytest.mark.parametrize("name", ["softmax", "sparsemax"])
def test_uniform_init_is_exact_for_softmax_and_sparsemax(name: str) -> None:
    for n in (3, 7, 10):
        assert torch.equal(cx.SimplexWeights(n, map=name)(), torch.full((n,), 1.0 / n))
    assert torch.equal(cx.SimplexWeights(3, map=name, total=2.0)(), torch.full((3,), 2.0 / 3))


@pytest.mark.parametrize("name", MAP_NAMES)
def test_probability_init_is_reproduced(name: str) -> None:
    p = [0.6, 0.3, 0.1, 0.0]
    w = cx.SimplexWeights(4, map=name, init=p)()
    torch.testing.assert_close(w, torch.tensor(p), atol=1e-6, rtol=1e-5)
    w2 = cx.SimplexWeights(4, map=name, init=torch.tensor(p) * 2, total=2.0, temperature=0.5)()
    torch.testing.assert_close(w2, torch.tensor(p) * 2, atol=2e-6, rtol=1e-5)


def test_random_init_is_on_the_simplex_and_seeded() -> None:
    torch.manual_seed(1)
    a = cx.SimplexWeights(5, init="random")()
    torch.manual_seed(1)
    b = cx.SimplexWeights(5, init="random")()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.sum(), torch.tensor(1.0))
    assert (a > 0).all()
    assert not torch.allclose(a, torch.full((5,), 0.2))


def test_stick_breaking_has_n_minus_one_free_values() -> None:
    assert cx.SimplexWeights(5, map="stick_breaking").free.shape == (4,)
    assert cx.SimplexWeights(5).free.shape == (5,)


def test_mask_renormalises_over_present() -> None:
    w = cx.SimplexWeights(4, init=[0.4, 0.3, 0.2, 0.1])
    mask = torch.tensor([[True, False, True, False], [False] * 4])
    out = w(mask=mask)
    torch.testing.assert_close(out[0], torch.tensor([2 / 3, 0.0, 1 / 3, 0.0]))
    assert (out[1] == 0).all()
    out.sum().backward()
    assert torch.isfinite(w.free.grad).all()
    with pytest.raises(
        cx.ShapeError, match=r"mask must have shape \(n,\) or \(B, n\) with n=4; got \(3,\)"
    ):
        w(mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("name", MAP_NAMES)
def test_learns_known_weights(name: str) -> None:
    torch.manual_seed(0)
    true = torch.tensor([0.5, 0.3, 0.2, 0.0])
    xs = torch.randn(4, 512)
    y = true @ xs
    w = cx.SimplexWeights(4, map=name)
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        ((w() @ xs - y) ** 2).mean().backward()
        opt.step()
    torch.testing.assert_close(w.weights.detach(), true, atol=2e-2, rtol=0)


def test_roundtrips() -> None:
    w = cx.SimplexWeights(3, map="entmax15", init=[1.0, 1.0, 0.0], total=2.0)
    for clone in round_trips(w):
        torch.testing.assert_close(clone(), w())
        assert repr(clone) == repr(w) == "SimplexWeights(n=3, map='entmax15', total=2.0)"
    fresh = cx.SimplexWeights(3, map="entmax15", total=2.0)
    fresh.load_state_dict(w.state_dict())
    torch.testing.assert_close(fresh(), w())
    assert list(w.state_dict()) == ["free"]


def test_init_errors_never_take_logits() -> None:
    with pytest.raises(
        cx.InvalidProbabilitiesError, match=r"probabilities.*not logits; got \[0.5, 0.6, -0.1\]"
    ):
        cx.SimplexWeights(3, init=[0.5, 0.6, -0.1])
    with pytest.raises(cx.InvalidProbabilitiesError, match=r"must sum to 1.0; got sum 1.2"):
        cx.SimplexWeights(3, init=[0.5, 0.5, 0.2])
    with pytest.raises(cx.InvalidProbabilitiesError, match=r"must sum to 2.0; got sum 1"):
        cx.SimplexWeights(2, init=[0.5, 0.5], total=2.0)
    with pytest.raises(cx.ShapeError, match=r"init must hold 3 probabilities; got shape \(2,\)"):
        cx.SimplexWeights(3, init=[0.5, 0.5])
    with pytest.raises(
        cx.ConvexMixError, match=r"init must be 'uniform', 'random' or a sequence of 3"
    ):
        cx.SimplexWeights(3, init="zeros")
    with pytest.raises(cx.InvalidProbabilitiesError, match=r"finite"):
        cx.SimplexWeights(2, init=[float("nan"), 1.0])
    with pytest.raises(cx.ConvexMixError, match=r"n must be an int >= 1; got 0"):
        cx.SimplexWeights(0)
    with pytest.raises(cx.UnknownMapError, match=r"got 'max'"):
        cx.SimplexWeights(2, map="max")


def test_parameters_follow_the_default_dtype() -> None:
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        for init in ("uniform", "random", [0.5, 0.5, 0.0]):
            assert cx.SimplexWeights(3, init=init).free.dtype == torch.float64
        assert cx.WeightedSum(2, channels=2, init=torch.ones(2, 2) / 2).free.dtype == torch.float64
    finally:
        torch.set_default_dtype(old)
    assert cx.SimplexWeights(3, init=[0.5, 0.5, 0.0]).free.dtype == torch.float32


def test_every_layer_reads_its_weights_as_the_weights_property() -> None:
    """One name for the current weights: ``.weights`` on every layer, with the graph."""
    sw = cx.SimplexWeights(3, init=[0.2, 0.3, 0.5])
    ws = cx.WeightedSum(3, init=[0.2, 0.3, 0.5], upper=0.45)
    mix = cx.ScalarMix(3, init=[0.2, 0.3, 0.5], gamma=2.0)
    lazy = cx.LazyWeightedSum(init=[0.2, 0.3, 0.5])
    lazy([torch.ones(2)] * 3)
    for layer in (sw, ws, mix, lazy):
        w = layer.weights
        assert w.requires_grad, type(layer).__name__
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    assert torch.equal(sw.weights, sw())
    assert torch.equal(mix.weights, mix.mix())
    # WeightedSum's weights are the ones its forward mixes with, cap included
    xs = [torch.eye(3)[k] for k in range(3)]
    assert torch.equal(ws(xs), ws.weights)
    assert float(ws.weights.max()) <= 0.45 + 1e-7


def test_convex_combination_is_top_level() -> None:
    assert cx.convex_combination is cx.functional.convex_combination
    assert "convex_combination" in cx.__all__
