"""Caps and sparsity where weights are learned: layers, parametrizations, optimizers."""

from __future__ import annotations

import pickle

import pytest
import torch

import convexmix as cx


def _train(params: list[torch.Tensor], weights: object, opt: torch.optim.Optimizer) -> None:
    target = torch.tensor([0.9, 0.05, 0.03, 0.02])
    for _ in range(150):
        opt.zero_grad()
        w = weights() if callable(weights) else weights
        ((w - target) ** 2).sum().backward()
        opt.step()


@pytest.mark.parametrize("map", ["softmax", "sparsemax"])
def test_layers_keep_the_cap_through_training(map: str) -> None:
    torch.manual_seed(0)
    layer = cx.SimplexWeights(4, map=map, init="random", upper=0.3)
    _train([layer.free], layer, torch.optim.Adam(layer.parameters(), lr=0.1))
    w = layer().detach()
    assert (w <= 0.3 + 1e-6).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    assert w.max() == pytest.approx(0.3, abs=1e-4)  # the cap is active at the optimum
    fuse = cx.WeightedSum(4, map=map, upper=0.3, init=[0.7, 0.1, 0.1, 0.1])
    assert (fuse.weights <= 0.3 + 1e-6).all()
    x = torch.randn(4, 2, 5)
    torch.testing.assert_close(fuse(x), torch.einsum("n,nbc->bc", fuse.weights, x))
    clone = pickle.loads(pickle.dumps(fuse))
    torch.testing.assert_close(clone.weights, fuse.weights)
    assert "upper=0.3" in repr(fuse)


def test_parametrizations_with_a_cap() -> None:
    layer = torch.nn.Linear(5, 3, bias=False)
    with pytest.warns(cx.ConvexMixWarning):
        cx.simplex_(layer, "weight", map="sparsemax", upper=0.4)
    assert (layer.weight <= 0.4 + 1e-6).all()
    torch.testing.assert_close(layer.weight.sum(-1), torch.ones(3))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        layer(torch.randn(8, 5)).pow(2).sum().backward()
        opt.step()
    assert (layer.weight <= 0.4 + 1e-6).all()
    s = cx.Simplex("softmax", upper=0.5)
    p = torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(s(s.right_inverse(p)), p)


def test_cap_errors() -> None:
    with pytest.raises(
        cx.ConvexMixError, match=r"upper= needs map='softmax' .* got map='entmax15'"
    ):
        cx.SimplexWeights(3, map="entmax15", upper=0.5)
    with pytest.raises(cx.ConvexMixError, match=r"upper= needs .* got map='stick_breaking'"):
        cx.WeightedSum(3, map="stick_breaking", upper=0.5)
    with pytest.raises(cx.ConvexMixError, match=r"infeasible cap: 3 weights of at most upper=0.2"):
        cx.SimplexWeights(3, upper=0.2)
    with pytest.raises(cx.ConvexMixError, match=r"upper must be finite and > 0; got -1"):
        cx.Simplex("softmax", upper=-1.0)


def test_projected_keeps_bounds_and_sparsity() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.full((4,), 0.25))
    opt = cx.optim.Projected(torch.optim.SGD([w], lr=0.1), [w], lower=0.05, upper=0.5)
    _train([w], w, opt)
    assert (w >= 0.05 - 1e-7).all()
    assert (w <= 0.5 + 1e-7).all()
    # the constrained optimum of ||w - target||^2: clip(target - tau, 0.05, 0.5)
    ref = cx.functional.project_simplex(
        torch.tensor([0.9, 0.05, 0.03, 0.02]), lower=0.05, upper=0.5
    )
    torch.testing.assert_close(w.data, ref, atol=1e-4, rtol=0)
    v = torch.nn.Parameter(torch.full((6,), 1 / 6))
    sparse = cx.optim.Projected(torch.optim.SGD([v], lr=0.1), [v], k=2)
    for _ in range(50):
        sparse.zero_grad()
        ((v - torch.tensor([0.5, 0.4, 0.3, 0.0, 0.0, 0.0])) ** 2).sum().backward()
        sparse.step()
        assert int((v > 0).sum()) <= 2
    torch.testing.assert_close(v.data.sum(), torch.tensor(1.0))
    state = sparse.state_dict()
    assert state["projected"]["k"] == 2
    assert "k=2" in repr(sparse)
    with pytest.raises(cx.ConvexMixError, match=r"k cannot be combined with lower/upper"):
        cx.optim.Projected(torch.optim.SGD([v], lr=0.1), [v], k=2, upper=0.5)
    with pytest.raises(cx.ConvexMixError, match=r"k must be None or an int >= 1; got 0"):
        cx.optim.Projected(torch.optim.SGD([v], lr=0.1), [v], k=0)


def test_exponentiated_gradient_with_a_cap_is_the_kl_projection() -> None:
    w = torch.nn.Parameter(torch.full((4,), 0.25))
    opt = cx.optim.ExponentiatedGradient([w], lr=0.5, upper=0.4)
    w0 = w.detach().clone()
    opt.zero_grad()
    loss = (w * torch.tensor([-2.0, -1.0, 0.0, 1.0])).sum()
    loss.backward()
    opt.step()
    # one step is the constrained softmax of log w - lr * grad
    z = torch.log(w0) - 0.5 * torch.tensor([-2.0, -1.0, 0.0, 1.0])
    torch.testing.assert_close(w.data, cx.functional.softmax(z, upper=0.4))
    _train([w], w, opt)
    assert (w <= 0.4 + 1e-6).all()
    torch.testing.assert_close(w.data.sum(), torch.tensor(1.0))
    with pytest.raises(cx.ConvexMixError, match=r"at or below upper=0.3"):
        cx.optim.ExponentiatedGradient(
            [torch.nn.Parameter(torch.tensor([0.5, 0.5]))], lr=0.1, upper=0.3
        )
