"""Every public op under TorchDispatchModes (make_fx, FakeTensorMode, FlopCounterMode) and
on a wrapper tensor subclass (TwoTensor: no memory of its own, like DTensor).

Native kernels read raw memory behind the dispatcher's back: under ``make_fx`` their
result was recorded as a constant (a graph that ignores its inputs), under
``FakeTensorMode`` they met tensors without values, and on a wrapper subclass they read
address 0 (a segfault). Each case runs forward and backward, at a small size and at the
size where ``convex_combination`` takes its fused kernels, against plain eager calls.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.flop_counter import FlopCounterMode

import convexmix as cx
from convexmix.functional import _combine

two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
F = cx.functional
BIG = _combine.COMPOSITE_MAX  # the fused kernels' size

Fn = Callable[..., torch.Tensor]
CASES: dict[str, tuple[Fn, Callable[[], list[torch.Tensor]]]] = {}


def _case(name: str, fn: Fn, *shapes: tuple[int, ...], weights: int = 0) -> None:
    def make() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        w = [torch.softmax(torch.randn(weights, generator=g), 0)] if weights else []
        return w + [torch.randn(s, generator=g) for s in shapes]

    CASES[name] = (fn, make)


def _combine_list(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.convex_combination(w, list(x.unbind(0)))


_case("combine_tiny", _combine_list, (3, 2, 4), weights=3)
_case("combine_small", _combine_list, (2, 64, 256), weights=2)
_case("combine_fused", _combine_list, (2, BIG), weights=2)
_case("combine_fused_stacked", lambda w, x: F.convex_combination(w, x), (2, BIG), weights=2)
_case("softmax", lambda x: F.softmax(x), (4, 8))
_case("softmax_mask", lambda x: F.softmax(x, mask=x > -0.5), (4, 8))
_case("softmax_upper", lambda x: F.softmax(x, upper=0.3), (4, 8))
_case("sparsemax", lambda x: F.sparsemax(x), (4, 8))
_case("entmax15", lambda x: F.entmax15(x), (4, 8))
_case("entmax", lambda x: F.entmax(x, alpha=1.3), (4, 8))
_case("stick_breaking", lambda x: F.stick_breaking(x), (4, 8))
_case("project_simplex", lambda x: F.project_simplex(x), (4, 8))


def run(fn: Fn, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The output and the gradients of a fixed linear loss, for every argument."""
    args = [a.detach().requires_grad_() for a in args]
    out = fn(*args)
    loss = (out * torch.linspace(0, 1, out.shape[-1], dtype=out.dtype)).sum()
    return (out.detach(), *torch.autograd.grad(loss, args))


def assert_all_close(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    """Values within float32 rounding: the weights' gradient at 2^21 elements is a float32
    GEMV on ATen paths and a double sum in the fused kernel (1e-5 apart); a recorded
    constant or a wrong path is off by O(1)."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[Fn, Callable[[], list[torch.Tensor]]]:
    return CASES[request.param]


def test_make_fx_graph_computes_from_its_inputs(case: tuple[Fn, Callable[..., list]]) -> None:
    fn, make = case
    graph = make_fx(lambda *a: run(fn, list(a)))(*make())
    fresh = [2 * a + 0.25 for a in make()]  # other values: a recorded constant fails
    if fresh[0].dim() == 1 and len(fresh) == 2:
        fresh[0] = torch.softmax(fresh[0], 0)  # weights stay weights
    assert_all_close(graph(*fresh), run(fn, fresh))


def test_fake_tensor_mode_gives_shapes(case: tuple[Fn, Callable[..., list]]) -> None:
    fn, make = case
    args = make()
    want = run(fn, args)
    with FakeTensorMode() as mode:
        got = run(fn, [mode.from_tensor(a) for a in args])
    assert [g.shape for g in got] == [w.shape for w in want]
    assert [g.dtype for g in got] == [w.dtype for w in want]


def test_flop_counter_mode_keeps_values(case: tuple[Fn, Callable[..., list]]) -> None:
    fn, make = case
    with FlopCounterMode(display=False):
        got = run(fn, make())
    assert_all_close(got, run(fn, make()))


def test_wrapper_subclass_runs_aten_code(case: tuple[Fn, Callable[..., list]]) -> None:
    fn, make = case
    args = [two_tensor.TwoTensor(a, a.clone()).requires_grad_() for a in make()]
    out = fn(*args)
    assert type(out) is two_tensor.TwoTensor  # the subclass's ops ran, on both halves
    loss = (out * torch.linspace(0, 1, out.shape[-1])).sum()
    got = (out.detach(), *torch.autograd.grad(loss, args))
    want = run(fn, make())
    assert_all_close(tuple(g.a for g in got), want)
    assert_all_close(tuple(g.b for g in got), want)


def test_out_on_a_wrapper_subclass() -> None:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(BIG, generator=g) for _ in range(2)]
    w = torch.tensor([0.25, 0.75])
    out = two_tensor.TwoTensor(torch.empty(BIG), torch.empty(BIG))
    two = [two_tensor.TwoTensor(x, x.clone()) for x in xs]
    F.convex_combination(two_tensor.TwoTensor(w, w.clone()), two, out=out)
    want = F.convex_combination(w, xs)
    torch.testing.assert_close(out.a, want)
    torch.testing.assert_close(out.b, want)
