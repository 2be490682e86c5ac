"""convex_combination's eager paths (stack + matrix-vector product, composite ATen, the
fused autograd.Function, the custom op, and the call's own choice), torch.func transforms
and double backward, against naive float64 autograd."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, jacfwd, jacrev, stack_module_state, vmap

import convexmix as cx
from convexmix.functional import _combine, convex_combination

#: "stack_mid" is the (K, N) layout of the stacked contraction (K >= 3, larger inputs).
PATHS = ["stack", "stack_mid", "composite", "fused", "op", None]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str | None]:
    if request.param == "stack_mid":
        monkeypatch.setattr(_combine, "STACK_MAX", -1)
    _combine._force = "stack" if request.param == "stack_mid" else request.param
    try:
        yield request.param
    finally:
        _combine._force = None


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive(w: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    return sum((w[k] * xs[k] for k in range(len(xs))), torch.zeros(()))  # type: ignore[return-value]


@pytest.mark.parametrize("wshape", [(3,), (3, 5), (3, 4, 1)])
@pytest.mark.parametrize("layout", ["list", "stacked"])
def test_every_path_matches_naive(path: str | None, wshape: tuple[int, ...], layout: str) -> None:
    w = rand(*wshape, seed=1).requires_grad_()
    x = rand(3, 4, 5, seed=2).requires_grad_()
    xs = list(x.unbind(0))
    out = convex_combination(w, xs if layout == "list" else x)
    ref = naive(w, xs)
    torch.testing.assert_close(out, ref)
    g = rand(4, 5, seed=3)
    got = torch.autograd.grad((out * g).sum(), [w, x])
    exp = torch.autograd.grad((ref * g).sum(), [w, x])
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_path_keeps_dtype(path: str | None, dtype: torch.dtype) -> None:
    xs = [torch.randn(6, 7).to(dtype) for _ in range(4)]
    w = torch.softmax(torch.randn(4), 0)
    out = convex_combination(w, xs)
    assert out.dtype == dtype
    exact = sum(w[k].double() * xs[k].double() for k in range(4))
    eps = torch.finfo(dtype).eps
    assert ((out.double() - exact).abs() <= eps * exact.abs() + 1e-6).all()


def _chosen(
    n: int,
    k: int,
    *,
    grad_x: bool = False,
    wshape: tuple[int, ...] | None = None,
    stacked: bool = False,
    dtype: torch.dtype = torch.float32,
) -> str:
    w = torch.rand(wshape or (k,), dtype=dtype, requires_grad=True)
    if stacked:
        inputs: object = torch.randn(k, n, dtype=dtype, requires_grad=grad_x)
    else:
        inputs = [torch.randn(n, dtype=dtype, requires_grad=grad_x) for _ in range(k)]
    call = _combine._everyday(w, inputs) or _combine._parse(w, inputs, 0)
    return _combine._choose(call)


@pytest.mark.parametrize("k", [2, 3, 8])
@pytest.mark.parametrize("grad_x", [False, True])
def test_every_threshold_from_both_sides(k: int, grad_x: bool) -> None:
    """The one path choice at each size threshold, just below/at it and just above."""
    c = _combine
    stack_mid = "stack" if k >= 3 else "composite"
    expected = {
        1: "stack",
        c.STACK_MAX: "stack",
        c.STACK_MAX + 1: stack_mid,
        c.STACK_MID_MAX: stack_mid,
        c.STACK_MID_MAX + 1: "composite",
        c.COMPOSITE_MAX - 1: "composite",
        c.COMPOSITE_MAX: "fused",
    }
    got = {n: _chosen(n, k, grad_x=grad_x) for n in expected}
    assert got == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_take_the_fused_kernels_earlier(dtype: torch.dtype) -> None:
    edge = _combine.HALF_FUSED_MIN
    assert _chosen(edge - 1, 2, dtype=dtype) == "composite"
    assert _chosen(edge, 2, dtype=dtype) == "fused"
    assert _chosen(edge, 2, dtype=torch.float32) == "composite"


def test_the_choice_beyond_size() -> None:
    n = _combine.COMPOSITE_MAX
    # per-channel weights: no contraction, the composite code until the fused size
    assert _chosen(8, 3, wshape=(3, 8)) == "composite"
    assert _chosen(n, 3, wshape=(3, 1)) == "fused"
    # weights of another dtype than the inputs: no contraction either
    w = torch.rand(3, dtype=torch.float64)
    call = _combine._parse(w, [torch.randn(8) for _ in range(3)], 0)
    assert _combine._choose(call) == "composite"
    # one stacked tensor: its own contraction below the fused size
    assert _chosen(8, 3, stacked=True) == "stack"
    assert _chosen(n, 3, stacked=True) == "fused"
    # autocast: never the contraction (its GEMV would run in the lower precision)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _chosen(8, 3) == "composite"
    # under a torch.func transform: never the fused kernels
    big = [torch.randn(n) for _ in range(3)]
    seen: list[str] = []
    torch.func.grad(
        lambda w: (
            seen.append(_combine._choose(_combine._parse(w, big, 0)))
            or convex_combination(w, big).sum()
        )
    )(torch.rand(3))
    assert seen == ["composite"]
    # forced paths stay forced where they apply, and fall back where they cannot
    for forced in _combine.PATHS:
        _combine._force = forced
        try:
            assert _chosen(8, 3) == forced
            if forced == "stack":
                assert _chosen(8, 3, wshape=(3, 8)) == "composite"
        finally:
            _combine._force = None


def test_size_picks_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chosen path is the one that runs: a spy on each path's function."""
    calls: list[str] = []
    for name in ("_contract", "_composite", "_fused"):
        real = getattr(_combine, name)
        monkeypatch.setattr(
            _combine, name, lambda *a, name=name, real=real: calls.append(name) or real(*a)
        )
    c = _combine
    w = torch.rand(3, requires_grad=True)
    sizes = (1, c.STACK_MID_MAX, c.STACK_MID_MAX + 1, c.COMPOSITE_MAX)
    for n in sizes:
        convex_combination(w, [torch.randn(n) for _ in range(3)])
    assert calls == ["_contract", "_contract", "_composite", "_fused"]
    calls.clear()
    w2 = torch.rand(2, requires_grad=True)
    for n in (c.STACK_MAX, c.STACK_MAX + 1, c.COMPOSITE_MAX - 1, c.COMPOSITE_MAX):
        convex_combination(w2, tuple(torch.randn(n, requires_grad=True) for _ in range(2)))
    assert calls == ["_contract", "_composite", "_composite", "_fused"]


@pytest.mark.parametrize("wshape", [(3,), (3, 2)])
@pytest.mark.parametrize("path", ["stack", "stack_mid", "composite", "fused"])
def test_double_backward(
    path: str, wshape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "stack_mid":  # the (K, N) layout of the stacked contraction
        monkeypatch.setattr(_combine, "STACK_MAX", -1)
        path = "stack"
    monkeypatch.setattr(_combine, "_force", path)
    w = rand(*wshape, seed=4).requires_grad_()
    xs = [rand(4, 2, seed=5 + k).requires_grad_() for k in range(3)]
    f = lambda w, *xs: convex_combination(w, list(xs)).square()  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (w, *xs))
    # a gradient of a gradient, against naive autograd
    out = convex_combination(w, xs)
    (gw,) = torch.autograd.grad(out.square().sum(), [w], create_graph=True)
    (ggx,) = torch.autograd.grad(gw.sum(), [xs[0]])
    ref = naive(w, xs)
    (rw,) = torch.autograd.grad(ref.square().sum(), [w], create_graph=True)
    (rgx,) = torch.autograd.grad(rw.sum(), [xs[0]])
    torch.testing.assert_close(ggx, rgx)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd"])
def test_torch_func_derivatives(transform: str) -> None:
    w = rand(3, seed=6)
    xs = [rand(2, 3, seed=7 + k) for k in range(3)]

    def f(w: torch.Tensor, impl: object) -> torch.Tensor:
        out = impl(w, xs)  # type: ignore[operator]
        return out.square().sum() if transform == "grad" else out

    t = {"grad": grad, "jacrev": jacrev, "jacfwd": jacfwd}[transform]
    torch.testing.assert_close(
        t(lambda w: f(w, convex_combination))(w), t(lambda w: f(w, naive))(w)
    )
    # with respect to the inputs too (stacked along dim 1)
    x = torch.stack(xs, 1)
    got = t(lambda x: f(w, lambda w, _: convex_combination(w, x, dim=1)))(x)
    exp = t(lambda x: f(w, lambda w, _: naive(w, list(x.unbind(1)))))(x)
    torch.testing.assert_close(got, exp)


def test_vmap_over_weights_and_inputs() -> None:
    ws = torch.softmax(rand(5, 3, seed=8), -1)
    xs = rand(5, 3, 4, seed=9)
    got = vmap(convex_combination)(ws, xs)
    torch.testing.assert_close(got, torch.einsum("bk,bkn->bn", ws, xs))
    # weights batched, inputs shared (a list)
    shared = list(xs[0].unbind(0))
    got = vmap(lambda w: convex_combination(w, shared))(ws)
    torch.testing.assert_close(got, ws @ xs[0])


def test_weighted_sum_under_functional_call_and_grad() -> None:
    fuse = cx.WeightedSum(3, init=[0.2, 0.3, 0.5]).double()
    xs = [rand(4, 5, seed=10 + k) for k in range(3)]
    params = dict(fuse.named_parameters())

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(fuse, (p,), (xs,)).square().sum()

    got = grad(loss)(params)["free"]
    ref = torch.autograd.grad(fuse(xs).square().sum(), [fuse.free])[0]
    torch.testing.assert_close(got, ref)


def test_weighted_sum_model_ensembling_with_vmap() -> None:
    models = [cx.WeightedSum(3, init="random").double() for _ in range(4)]
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    xs = [rand(2, 6, seed=20 + k) for k in range(3)]
    base = cx.WeightedSum(3).double()

    def run(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(base, (p, b), (xs,))

    got = vmap(run)(params, buffers)
    torch.testing.assert_close(got, torch.stack([m(xs) for m in models]).detach())
    # per-model gradients, vmapped
    g = vmap(grad(lambda p, b: run(p, b).sum()))(params, buffers)["free"]
    for i, m in enumerate(models):
        (ref,) = torch.autograd.grad(m(xs).sum(), [m.free])
        torch.testing.assert_close(g[i], ref)


def test_layers_compile_fullgraph_like_eager() -> None:
    xs = [torch.randn(4, 6) for _ in range(3)]
    fuse = cx.WeightedSum(3, init=[0.2, 0.3, 0.5], bias=True)
    mix = cx.ScalarMix(3, init=[0.1, 0.6, 0.3])
    weights = cx.SimplexWeights(5, map="sparsemax", init=[0.1, 0.2, 0.3, 0.4, 0.0])
    for module, args in ((fuse, (xs,)), (mix, (xs,)), (weights, ())):
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(*args), module(*args))


def test_eager_maps_match_the_custom_ops() -> None:
    """The eager Functions run the ops' bodies; torch.func runs the ops: same values and
    gradients."""
    x = rand(4, 7, seed=30)
    f = cx.functional
    for fn in (
        f.sparsemax,
        f.entmax15,
        lambda x: f.entmax(x, 1.3),
        lambda x: f.project_simplex(x, method="bisect"),
        lambda x: f.project_simplex(x, method="condat"),
    ):
        g = rand(4, 7, seed=31)
        xe = x.clone().requires_grad_()
        (ge,) = torch.autograd.grad((fn(xe) * g).sum(), [xe])
        got, vjp = torch.func.vjp(fn, x)
        torch.testing.assert_close(got, fn(x))
        torch.testing.assert_close(vjp(g)[0], ge)


@pytest.mark.parametrize("n", [8, 1000, 1 << 18, _combine.COMPOSITE_MAX])
@pytest.mark.parametrize("layout", ["list", "stacked"])
def test_autocast_keeps_the_inputs_dtype(n: int, layout: str) -> None:
    """Under CPU autocast the stacked contraction's GEMV would run, and return, bfloat16
    (1e-2 off) at some sizes and not others; every size now gives float32, as the seed
    loop does (autocast leaves ``mul`` and ``add`` alone)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, n, generator=g).requires_grad_()
    w = torch.softmax(torch.randn(3, generator=g), 0).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = convex_combination(w, list(x.unbind(0)) if layout == "list" else x)
        gw, gx = torch.autograd.grad(out.sum(), [w, x])
    assert out.dtype == gw.dtype == gx.dtype == torch.float32
    ref = (w.detach().double()[:, None] * x.detach().double()).sum(0)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(gw.double(), x.detach().double().sum(1), rtol=1e-5, atol=1e-3)


def _sizes() -> list[int]:
    c = _combine
    edges = [1, c.STACK_MAX, c.STACK_MID_MAX, c.HALF_FUSED_MIN - 1, c.COMPOSITE_MAX - 1]
    return sorted({n + d for n in edges for d in (0, 1)})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 5),
    n=st.sampled_from(_sizes()),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    wkind=st.sampled_from(["k", "k1", "other_dtype"]),
    layout=st.sampled_from(["list", "tuple", "stacked"]),
    grad_w=st.booleans(),
    grad_x=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_chosen_path_equals_every_forced_path(
    k: int,
    n: int,
    dtype: torch.dtype,
    wkind: str,
    layout: str,
    grad_w: bool,
    grad_x: bool,
    seed: int,
) -> None:
    """Differential: the path each call chooses against every forced path, over drawn
    configurations on both sides of every size threshold: equal values and gradients."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(k, n, generator=gen).to(dtype)
    wdtype = (
        torch.float64
        if wkind == "other_dtype"
        else (torch.float64 if dtype == torch.float64 else torch.float32)
    )
    w = torch.softmax(torch.randn(k, generator=gen), 0).to(wdtype)
    if wkind == "k1":
        w = w[:, None]
    g = torch.randn(n, generator=gen).to(dtype)

    def run(path: str | None) -> list[torch.Tensor]:
        _combine._force = path
        try:
            wl = w.clone().requires_grad_(grad_w)
            xl = x.clone().requires_grad_(grad_x)
            inputs: object = (
                xl
                if layout == "stacked"
                else list(xl.unbind(0))
                if layout == "list"
                else tuple(xl.unbind(0))
            )
            out = convex_combination(wl, inputs)  # type: ignore[arg-type]
            res = [out.detach().double()]
            wanted = [t for t in (wl, xl) if t.requires_grad]
            if wanted:
                res += [t.double() for t in torch.autograd.grad((out * g).sum(), wanted)]
            return res
        finally:
            _combine._force = None

    chosen = run(None)
    eps = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    scale = x.double().abs().amax().item() + 1.0
    for path in _combine.PATHS:
        for a, b in zip(chosen, run(path), strict=True):
            tol = eps * scale * (n if a.numel() == k else 1) ** 0.5
            torch.testing.assert_close(a, b, rtol=eps, atol=tol, msg=f"path {path}")
