"""ExponentiatedGradient and Projected: on the simplex after every step, known optima."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import convexmix as cx
from tests.reference import projection_bruteforce


def quadratic(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((p - target) ** 2).sum()


def on_simplex_error(p: torch.Tensor, dim: int, total: float) -> float:
    return max((p.sum(dim) - total).abs().max().item(), (-p).clamp_min(0).max().item())


def test_eg_stays_on_simplex_and_reaches_interior_optimum() -> None:
    target = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.2, 1.0]], dtype=torch.float64)  # (2, 3)
    p = torch.nn.Parameter(torch.full((2, 3), 1.0, dtype=torch.float64))  # columns sum to 2
    opt = cx.optim.ExponentiatedGradient([p], lr=0.5, dim=0, total=2.0)
    for _ in range(300):
        opt.zero_grad()
        quadratic(p, target).backward()
        opt.step()
        assert on_simplex_error(p.detach(), 0, 2.0) <= 1e-9
    expected = np.stack([projection_bruteforce(c, 2.0) for c in target.T.numpy()]).T
    np.testing.assert_allclose(p.detach().numpy(), expected, atol=1e-9)


def test_eg_zeros_stay_zero_and_off_simplex_is_an_error() -> None:
    p = torch.nn.Parameter(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    opt = cx.optim.ExponentiatedGradient([p], lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        quadratic(p, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)).backward()
        opt.step()
    assert p[2].item() == 0.0
    torch.testing.assert_close(p.detach().sum(), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(cx.ConvexMixError, match=r"needs parameters on the simplex .* shape \(3,\)"):
        cx.optim.ExponentiatedGradient([torch.nn.Parameter(torch.tensor([0.5, 0.6, 0.1]))], lr=0.1)
    with pytest.raises(cx.ConvexMixError, match=r"lr must be a finite number > 0; got 0"):
        cx.optim.ExponentiatedGradient([p], lr=0)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_projected_stays_on_simplex_and_sgd_reaches_the_optimum(inner: str) -> None:
    target = torch.tensor([0.9, 0.3, -0.2, 0.05], dtype=torch.float64)
    w = torch.nn.Parameter(torch.full((4,), 0.25, dtype=torch.float64))
    base = torch.optim.SGD([w], lr=0.1) if inner == "sgd" else torch.optim.Adam([w], lr=0.02)
    if inner == "sgd":
        opt = cx.optim.Projected(base, [w])
    else:
        with pytest.warns(cx.ConvexMixWarning, match=r"Projected\(Adam\).*can stall"):
            opt = cx.optim.Projected(base, [w])
    start = quadratic(w, target).item()
    for _ in range(1000):
        opt.zero_grad()
        quadratic(w, target).backward()
        opt.step()
        assert on_simplex_error(w.detach(), -1, 1.0) <= 1e-9
    expected = projection_bruteforce(target.numpy())
    if inner == "sgd":  # projected gradient descent converges to the constrained optimum
        np.testing.assert_allclose(w.detach().numpy(), expected, atol=1e-9)
        assert w[2].item() == 0.0
        assert w[3].item() == 0.0
    else:
        # Adam's per-coordinate scaling then a Euclidean projection has fixed points that
        # are not the constrained optimum (documented); it still improves on the start.
        assert quadratic(w, target).item() < 0.5 * start


def test_projected_projects_at_construction_and_only_the_chosen() -> None:
    w = torch.nn.Parameter(torch.tensor([2.0, 0.0]))
    free = torch.nn.Parameter(torch.tensor([5.0]))
    opt = cx.optim.Projected(torch.optim.SGD([w, free], lr=0.1), [w])
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, 0.0]))
    assert free.item() == 5.0
    assert repr(opt) == "Projected(SGD, 1 parameter(s), dim=-1, total=1.0, method='auto')"
    with pytest.raises(
        cx.ConvexMixError, match=r"params\[0\] \(shape \(3,\)\) is not optimised by the wrapped SGD"
    ):
        cx.optim.Projected(torch.optim.SGD([w], lr=0.1), [torch.nn.Parameter(torch.zeros(3))])


def test_projected_state_dict_round_trip_and_scheduler() -> None:
    def make() -> tuple[torch.nn.Parameter, cx.optim.Projected]:
        w = torch.nn.Parameter(torch.full((3,), 1 / 3, dtype=torch.float64))
        with pytest.warns(cx.ConvexMixWarning, match="Prefer torch.optim.SGD"):
            return w, cx.optim.Projected(torch.optim.Adam([w], lr=0.05), [w], method="sort")

    target = torch.tensor([0.7, 0.5, -0.4], dtype=torch.float64)
    w1, opt1 = make()
    sched = torch.optim.lr_scheduler.StepLR(opt1, step_size=2, gamma=0.5)
    for _ in range(5):
        opt1.zero_grad()
        quadratic(w1, target).backward()
        opt1.step()
        sched.step()
    state = copy.deepcopy(opt1.state_dict())
    assert state["projected"] == {"dim": -1, "total": 1.0, "method": "sort"}
    w2, opt2 = make()
    with torch.no_grad():
        w2.copy_(w1)
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == opt1.param_groups[0]["lr"] == 0.05 * 0.25
    for w, opt in ((w1, opt1), (w2, opt2)):
        opt.zero_grad()
        quadratic(w, target).backward()
        opt.step()
    torch.testing.assert_close(w1.detach(), w2.detach())


def test_projected_warns_only_for_adaptive_optimizers() -> None:
    import warnings

    w = torch.nn.Parameter(torch.full((3,), 1 / 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.optim.Projected(torch.optim.SGD([w], lr=0.1, momentum=0.9), [w])
    for cls in (torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        with pytest.warns(cx.ConvexMixWarning, match=cls.__name__):
            cx.optim.Projected(cls([w], lr=0.1), [w])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exponentiated_gradient_accepts_half_precision_simplex(dtype: torch.dtype) -> None:
    """Issue 14.10: the on-simplex tolerance came from float32, not the parameter's dtype."""
    w = torch.nn.Parameter(torch.full((3,), 1 / 3, dtype=dtype))
    assert float(w.double().sum()) != 1.0  # 1/3 rounded three times
    opt = cx.optim.ExponentiatedGradient([w], lr=0.5)
    w.grad = torch.tensor([1.0, 0.0, -1.0], dtype=dtype)
    opt.step()
    assert w.dtype == dtype
    assert abs(float(w.double().sum()) - 1.0) <= 3 * torch.finfo(dtype).eps
    with pytest.raises(cx.ConvexMixError, match="needs parameters on the simplex"):
        cx.optim.ExponentiatedGradient(
            [torch.nn.Parameter(torch.tensor([0.5, 0.7], dtype=dtype))], lr=1.0
        )


@pytest.mark.parametrize("bad", [-math.inf, math.inf, math.nan])
def test_exponentiated_gradient_rejects_non_finite_gradients(bad: float) -> None:
    """Issue 14.10: a -inf gradient made the parameter NaN silently."""
    w = torch.nn.Parameter(torch.full((3,), 1 / 3))
    opt = cx.optim.ExponentiatedGradient([w], lr=0.5)
    w.grad = torch.tensor([bad, 0.0, 0.0])
    with pytest.raises(cx.ConvexMixError, match=r"non-finite gradient \(inf or NaN\)"):
        opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), 1 / 3))
