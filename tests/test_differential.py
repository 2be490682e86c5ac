"""Differential property tests: every public layer and parametrization entry point that
has more than one path, the path a call takes against each forced path.

Hypothesis draws the configuration (map, temperature, ``upper``, ``total``, channels,
bias, named sources, masks, dtype, the number of inputs and their size on both sides of
each size threshold that the layers' mix goes through: ``convex_combination``'s
``STACK_MAX``, ``STACK_MID_MAX`` and, in the slow test, ``COMPOSITE_MAX``); torch draws
the values from a drawn seed (continuous values: no tie sits on a kink of a sparse or
capped map). Every path must give the same value and the same gradients (free values,
bias, inputs) as the call's own path and as a float64 reference built from the public
maps (``cx.functional``), to the documented rounding:

* values: ``(32 + 8 K) eps`` of ``sum_k |x_k|``, plus one rounding of the output dtype
  (the maps are within ``8 K eps`` of the total, the stacked contraction within about 15
  ulps: see the guide's precision notes);
* input gradients: the same relative to ``|g|``; weight (free-value) gradients: ``2 / T``
  times that bound of ``sum |g| |x_k|`` (the maps' Jacobians have entries of at most
  ``1 / T``);
* a call that one path refuses (``ConvexMixError``, e.g. a mask that leaves too few
  inputs to carry the total under ``upper``) is refused by every path.

``eps`` is that of the weights' dtype (float32 for a float32 module, also with bfloat16
or float64 inputs). Profiles: ``HYPOTHESIS_PROFILE=long`` runs 10^5 cases a property.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

import convexmix as cx
from convexmix.functional import _combine
from tests.conftest import MAP_NAMES

F = cx.functional
CAPPED = ("softmax", "sparsemax")
#: Input sizes on both sides of each threshold of the mix (the slow test adds 2^21).
SIZES = [
    1,
    2,
    _combine.STACK_MAX - 1,
    _combine.STACK_MAX,
    _combine.STACK_MAX + 2,
    _combine.STACK_MID_MAX,
    _combine.STACK_MID_MAX + 2,
]
BIG_SIZES = [_combine.COMPOSITE_MAX - 2, _combine.COMPOSITE_MAX]
DTYPES = {  # name: (module dtype, input dtype)
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "bfloat16 inputs": (torch.float32, torch.bfloat16),
    "float64 inputs": (torch.float32, torch.float64),
}
MAP_FN: dict[str, Callable[..., torch.Tensor]] = {
    "softmax": F.softmax,
    "sparsemax": F.sparsemax,
    "entmax15": F.entmax15,
    "stick_breaking": F.stick_breaking,
}


def reference_map(
    name: str,
    free: torch.Tensor,
    dim: int,
    *,
    temperature: float = 1.0,
    total: float = 1.0,
    upper: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weights from the public map, options passed by hand."""
    z = free / temperature
    kw: dict[str, object] = {"total": total}
    if mask is not None:
        kw["mask"] = mask
    if upper is not None:
        kw["upper"] = upper
    if name == "stick_breaking":
        p = F.stick_breaking(z, dim, total=total)
        if mask is None:
            return p
        m = mask.to(p.dtype)
        s = (p * m).sum(dim, keepdim=True)
        return torch.where(s > 0, p * m * total / s.clamp_min(1e-300), 0.0)
    return MAP_FN[name](z, dim, **kw)


@dataclass
class Outcome:
    """A path's value and gradients, or the error it raised."""

    out: torch.Tensor | None = None
    grads: dict[str, torch.Tensor | None] | None = None
    error: str | None = None


def run(
    call: Callable[[], torch.Tensor],
    leaves: dict[str, torch.Tensor],
    seed: int,
    grad_dtype: torch.dtype | None = None,
) -> Outcome:
    """``call()`` and its gradients for an output gradient drawn from ``seed`` (rounded
    to ``grad_dtype`` first: the reference gets the paths' very values)."""
    for t in leaves.values():
        t.grad = None
    try:
        out = call()
    except cx.ConvexMixError as err:
        return Outcome(error=type(err).__name__)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if grad_dtype is not None:
        g = g.to(grad_dtype)
    names = [n for n, t in leaves.items() if t.requires_grad]
    got = torch.autograd.grad(out, [leaves[n] for n in names], g.to(out.dtype), allow_unused=True)
    return Outcome(out.detach(), dict(zip(names, got, strict=True)))


def assert_close(
    label: str, a: torch.Tensor | None, b: torch.Tensor | None, bound: torch.Tensor | float
) -> None:
    if a is None or b is None:  # an unused leaf: no gradient means zeros
        a, b = (torch.zeros(()) if a is None else a), (torch.zeros(()) if b is None else b)
    diff = (a.double() - b.double()).abs()
    excess = diff - bound
    assert bool((excess <= 0).all()), (
        f"{label}: paths differ by {diff.max().item():.3g} where the documented bound is "
        f"{torch.as_tensor(bound).min().item():.3g}"
    )


# ---------------------------------------------------------------------------- WeightedSum


@dataclass
class WSCase:
    map: str
    n: int
    temperature: float
    upper: float | None
    channels: bool
    bias: bool
    named: bool
    dtype: str
    size: int
    seed: int
    scale: float
    present: list[bool]


@st.composite
def ws_cases(draw: st.DrawFn, sizes: list[int] = SIZES, max_n: int = 6) -> WSCase:
    name = draw(st.sampled_from(MAP_NAMES))
    n = draw(st.integers(1, max_n))
    uppers: list[float | None] = [None]
    if name in CAPPED:  # n * upper > 1 strictly, and never exactly 1 for a subset
        uppers += [u for u in (1.37 / n, 0.61, 0.83) if n * u > 1.0001]
    present = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return WSCase(
        map=name,
        n=n,
        temperature=draw(st.sampled_from([1.0, 0.5, 3.0])),
        upper=draw(st.sampled_from(uppers)),
        channels=draw(st.booleans()),
        bias=draw(st.booleans()),
        named=draw(st.booleans()),
        dtype=draw(st.sampled_from(list(DTYPES))),
        size=draw(st.sampled_from(sizes)),
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(st.sampled_from([0.1, 1.0, 4.0])),
        present=present if any(present) else [True, *present[1:]],
    )


def _shape(size: int) -> tuple[int, int]:
    """(B, C) with B * C == size: C, the channels, the largest of 4, 3, 2, 1 dividing size."""
    c = next(d for d in (4, 3, 2, 1) if size % d == 0)
    return size // c, c


def check_weighted_sum(case: WSCase) -> None:
    mdtype, xdtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(case.seed)
    shape = _shape(case.size)
    channels = shape[1] if case.channels else None
    sources = [f"s{k}" for k in range(case.n)] if case.named else None
    layer = cx.WeightedSum(
        case.n,
        map=case.map,
        temperature=case.temperature,
        upper=case.upper,
        channels=channels,
        bias=case.bias,
        sources=sources,
    ).to(mdtype)
    with torch.no_grad():
        layer.free.copy_(torch.randn(layer.free.shape, generator=gen) * case.scale)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    xs = [torch.randn(shape, generator=gen, dtype=torch.float64).to(xdtype) for _ in range(case.n)]
    xs = [x.requires_grad_() for x in xs]
    leaves: dict[str, torch.Tensor] = {"free": layer.free, **{f"x{k}": x for k, x in enumerate(xs)}}
    if layer.bias is not None:
        leaves["bias"] = layer.bias

    def stacked() -> torch.Tensor:
        return torch.stack(xs)

    full = torch.ones(case.n, dtype=torch.bool)
    part = torch.tensor(case.present)
    rows = shape[0]
    paths: dict[str, Callable[[], torch.Tensor]] = {
        "list (the call's own path)": lambda: layer(xs),
        "tuple": lambda: layer(tuple(xs)),
        "stacked": lambda: layer(stacked()),
        "checked": lambda: layer._forward_checked(xs),
        "functional_call": lambda: torch.func.functional_call(
            layer, {k: p * 1 for k, p in layer.named_parameters()}, (xs,)
        ),
        "mask (n,) all present": lambda: layer(xs, mask=full),
        "mask (B, n) all present": lambda: layer(stacked(), mask=full.expand(rows, case.n)),
    }
    if sources is not None:
        paths["dict"] = lambda: layer(dict(zip(sources, xs, strict=True)))
    masked: dict[str, Callable[[], torch.Tensor]] = {
        "list, mask (n,)": lambda: layer(xs, mask=part),
        "stacked, mask (B, n)": lambda: layer(stacked(), mask=part.expand(rows, case.n)),
        "tuple, mask (B, n)": lambda: layer(tuple(xs), mask=part.expand(rows, case.n)),
    }
    if sources is not None:
        given = {s: x for s, x, p in zip(sources, xs, case.present, strict=True) if p}
        masked["dict, absent keys"] = lambda: layer(given)
        masked["dict, absent keys and mask (n,)"] = lambda: layer(given, mask=full)

    for group, mask in ((paths, None), (masked, part)):
        ref = reference_ws(layer, case, xs, mask)
        bounds = ws_bounds(case, xs, ref, mdtype, xdtype)
        outcomes = {name: run(call, leaves, case.seed) for name, call in group.items()}
        for name, got in outcomes.items():
            label = f"{name} vs the float64 reference ({case})"
            if ref.error is not None or got.error is not None:
                assert got.error == ref.error, label
                continue
            assert got.out is not None
            assert got.grads is not None
            assert ref.out is not None
            assert ref.grads is not None
            assert got.out.dtype == xdtype, label
            assert_close(label + ": value", got.out, ref.out, bounds["out"])
            for leaf, grad in got.grads.items():
                if mask is not None and leaf.startswith("x") and not case.present[int(leaf[1:])]:
                    assert grad is None or bool((grad == 0).all()), label
                    continue
                assert_close(f"{label}: grad {leaf}", grad, ref.grads[leaf], bounds[leaf])


def reference_ws(
    layer: cx.WeightedSum, case: WSCase, xs: list[torch.Tensor], mask: torch.Tensor | None
) -> Outcome:
    """The mix in float64 from the public map and a plain sum (and its gradients)."""
    free = layer.free.detach().double().requires_grad_()
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    bias = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
    m = None if mask is None else (mask if free.dim() == 1 else mask[:, None])
    try:
        w = reference_map(case.map, free, 0, temperature=case.temperature, upper=case.upper, mask=m)
    except cx.ConvexMixError as err:
        return Outcome(error=type(err).__name__)
    out = sum((w[k] * xs64[k] for k in range(case.n)), torch.zeros((), dtype=torch.float64))
    if bias is not None:
        out = out + bias
    leaves = {"free": free, **{f"x{k}": x for k, x in enumerate(xs64)}}
    if bias is not None:
        leaves["bias"] = bias
    return run(lambda: out, leaves, case.seed, DTYPES[case.dtype][1])


def ws_bounds(
    case: WSCase,
    xs: list[torch.Tensor],
    ref: Outcome,
    mdtype: torch.dtype,
    xdtype: torch.dtype,
) -> dict[str, torch.Tensor | float]:
    eps = torch.finfo(mdtype).eps
    eps_out = torch.finfo(xdtype).eps if xdtype != torch.float64 else eps
    c = (32 + 8 * case.n) * eps
    ax = sum(x.detach().double().abs() for x in xs)
    assert isinstance(ax, torch.Tensor)
    g = torch.randn(
        xs[0].shape, generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64
    ).abs()
    out = ref.out.abs() if ref.out is not None else 0.0
    x_bound = c * g + eps_out * g
    bounds: dict[str, torch.Tensor | float] = {
        # the mix and the bias' sum each round once to the output dtype
        "out": c * ax + eps_out * (ax + out) + torch.finfo(xdtype).tiny,
        "free": 2 / case.temperature * c * float((g * ax).sum()) + 1e-30,
        "bias": (c + eps_out) * float(g.sum()) + 1e-30,
    }
    bounds.update({f"x{k}": x_bound for k in range(case.n)})
    return bounds


@given(ws_cases())
def test_weighted_sum_every_path_equal(case: WSCase) -> None:
    check_weighted_sum(case)


@settings(max_examples=max(3, settings.default.max_examples // 20))
@given(ws_cases(sizes=BIG_SIZES, max_n=3))
def test_weighted_sum_every_path_equal_on_the_fused_side(case: WSCase) -> None:
    check_weighted_sum(case)


@pytest.mark.parametrize("source", ["list", "dict"])
def test_weighted_sum_upper_holds_for_every_input_form(source: str) -> None:
    """The cap binds whatever form the inputs come in (one route to the weights)."""
    layer = cx.WeightedSum(4, upper=0.3, sources=list("abcd"))
    with torch.no_grad():
        layer.free.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    xs = [torch.full((2,), float(k == 0)) for k in range(4)]
    inputs = xs if source == "list" else dict(zip("abcd", xs, strict=True))
    torch.testing.assert_close(layer(inputs), torch.full((2,), 0.3))


@given(ws_cases(sizes=[2, 64, 65], max_n=4))
def test_lazy_weighted_sum_equals_weighted_sum(case: WSCase) -> None:
    shape = _shape(case.size)
    opts: dict[str, object] = {"map": case.map, "upper": case.upper, "bias": case.bias}
    opts["temperature"] = case.temperature
    if case.channels:
        opts["channels"] = shape[1]
    eager = cx.WeightedSum(case.n, **opts)  # type: ignore[arg-type]
    lazy = cx.LazyWeightedSum(**opts)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(case.seed)
    xs = [torch.randn(shape, generator=gen) for _ in range(case.n)]
    lazy(xs)
    with torch.no_grad():
        eager.free.copy_(torch.randn(eager.free.shape, generator=gen) * case.scale)
    lazy.load_state_dict(eager.state_dict())
    assert type(lazy) is cx.WeightedSum
    assert torch.equal(lazy(xs), eager(xs))
    assert torch.equal(lazy(torch.stack(xs)), eager(torch.stack(xs)))


# -------------------------------------------------------------- SimplexWeights, Simplex


@given(
    name=st.sampled_from(MAP_NAMES),
    n=st.integers(1, 9),
    temperature=st.sampled_from([1.0, 0.5, 3.0]),
    total=st.sampled_from([1.0, 0.5, 3.0]),
    cap=st.sampled_from([None, 1.37, 2.2]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    present=st.lists(st.booleans(), min_size=9, max_size=9),
    seed=st.integers(0, 2**31 - 1),
)
@example(  # the long profile's find: a bfloat16 quotient by the temperature moved the support
    name="sparsemax",
    n=5,
    temperature=3.0,
    total=1.0,
    cap=1.37,
    dtype=torch.bfloat16,
    present=[False] * 9,
    seed=33807,
)
def test_simplex_weights_every_path_equal(
    name: str,
    n: int,
    temperature: float,
    total: float,
    cap: float | None,
    dtype: torch.dtype,
    present: list[bool],
    seed: int,
) -> None:
    """forward(), .weights, forward(mask=(n,)), forward(mask=(B, n)) and the public map."""
    upper = None if cap is None or name not in CAPPED else cap * total / n
    w = cx.SimplexWeights(n, map=name, temperature=temperature, total=total, upper=upper)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w.free.copy_(torch.randn(w.free.shape, generator=gen) * 2)
    w = w.to(dtype)
    eps = torch.finfo(dtype).eps if dtype != torch.bfloat16 else torch.finfo(torch.float32).eps
    eps_out = torch.finfo(dtype).eps
    bound = total * (2 * eps_out + 8 * (n + 4) * eps)
    free = w.free.detach().double().requires_grad_()
    for mask in (None, torch.ones(n, dtype=torch.bool), torch.tensor(present[:n])):
        try:
            ref = reference_map(
                name, free, -1, temperature=temperature, total=total, upper=upper, mask=mask
            )
        except cx.ConvexMixError:
            with pytest.raises(cx.ConvexMixError):
                w(mask=mask)
            continue
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        (ref_grad,) = torch.autograd.grad(ref, free, g, allow_unused=True)
        m2 = None if mask is None else mask.expand(3, n)
        paths: dict[str, Callable[[], torch.Tensor]] = {
            "forward()": lambda mask=mask: w(mask=mask),
            "rows of mask (B, n)": lambda m2=m2: w(mask=m2)[1] if m2 is not None else w.weights,
        }
        for label, call in paths.items():
            got = call()
            assert got.dtype == dtype, label
            assert_close(f"{label} {mask}", got, ref, bound)
            (gg,) = torch.autograd.grad(got, w.free, g.to(dtype), allow_unused=True)
            gbound = 2 / temperature * bound * float(g.abs().sum()) + 1e-30
            assert_close(f"{label} {mask}: grad", gg, ref_grad, gbound)


@given(
    name=st.sampled_from(MAP_NAMES),
    rows=st.integers(1, 4),
    k=st.integers(2, 7),
    dim=st.sampled_from([0, 1, -1]),
    temperature=st.sampled_from([1.0, 0.5, 3.0]),
    total=st.sampled_from([1.0, 0.5, 3.0]),
    cap=st.sampled_from([None, 1.37, 2.2]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_simplex_every_route_equal(
    name: str,
    rows: int,
    k: int,
    dim: int,
    temperature: float,
    total: float,
    cap: float | None,
    dtype: torch.dtype,
    seed: int,
) -> None:
    """Simplex.forward, torch's register_parametrization, simplex_ and the public map give
    the same weights and gradients; assigning probabilities stores the same free values."""
    shape = (rows, k) if dim != 0 else (k, rows)
    kk = shape[dim]
    upper = None if cap is None or name not in CAPPED else cap * total / kk
    simplex = cx.Simplex(name, dim=dim, total=total, temperature=temperature, upper=upper)
    gen = torch.Generator().manual_seed(seed)
    free = (torch.randn(simplex.free_shape(shape), generator=gen, dtype=torch.float64) * 2).to(
        dtype
    )
    e = torch.empty(shape[1 - (dim % 2)], kk, dtype=torch.float64).exponential_(generator=gen)
    p = (e / e.sum(-1, keepdim=True) * total).movedim(-1, dim).to(dtype)  # Dirichlet(1)
    if upper is not None:
        p = F.project_simplex(p, dim, total=total, upper=upper)

    viaparam = torch.nn.Module()
    viaparam.weight = torch.nn.Parameter(p.clone())
    parametrize.register_parametrization(
        viaparam,
        "weight",
        cx.Simplex(name, dim=dim, total=total, temperature=temperature, upper=upper),
    )
    viaprop = torch.nn.Module()
    viaprop.weight = torch.nn.Parameter(p.clone())
    cx.simplex_(
        viaprop, "weight", map=name, dim=dim, total=total, temperature=temperature, upper=upper
    )
    with torch.no_grad():
        viaparam.parametrizations.weight.original.copy_(free)
        viaprop.weight_free.copy_(free)
    leaf = free.clone().requires_grad_()
    ref_free = free.double().requires_grad_()
    ref = reference_map(name, ref_free, dim, temperature=temperature, total=total, upper=upper)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    (ref_grad,) = torch.autograd.grad(ref, ref_free, g)
    eps = torch.finfo(dtype).eps
    bound = total * (2 + 8 * (kk + 4)) * eps
    routes = {
        "Simplex.forward": (lambda: simplex(leaf), leaf),
        "register_parametrization": (
            lambda: viaparam.weight,
            viaparam.parametrizations.weight.original,
        ),
        "simplex_": (lambda: viaprop.weight, viaprop.weight_free),
    }
    for label, (call, param) in routes.items():
        got = call()
        assert_close(label, got, ref, bound)
        (gg,) = torch.autograd.grad(got, param, g.to(dtype))
        assert_close(label + ": grad", gg, ref_grad, 2 / temperature * bound * float(g.abs().sum()))
    # assignment: both mechanisms store the right inverse of p, which maps back to p
    viaparam.weight = p
    viaprop.weight = p
    stored = simplex.right_inverse(p)
    assert torch.equal(viaparam.parametrizations.weight.original.detach(), stored)
    assert torch.equal(viaprop.weight_free.detach(), stored)
    assert_close("assigned", viaprop.weight, p, bound + 2e-12 * total * (name != "sparsemax"))


# ----------------------------------------------------------------------------- ScalarMix


@given(
    k=st.integers(1, 6),
    layer_norm=st.sampled_from([False, True, "token"]),
    gamma=st.sampled_from([True, False, 0.7]),
    temperature=st.sampled_from([1.0, 0.5]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    dropout=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_scalar_mix_every_input_form_equal(
    k: int,
    layer_norm: bool | str,
    gamma: bool | float,
    temperature: float,
    dtype: torch.dtype,
    dropout: float,
    seed: int,
) -> None:
    """A list, a tuple and a stacked tensor of layers give the same mix and gradients
    (with layer dropout in training mode: the same drawn mask for each)."""
    mix = cx.ScalarMix(
        k, layer_norm=layer_norm, gamma=gamma, temperature=temperature, layer_dropout=dropout
    ).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mix.mix.free.copy_(torch.randn(k, generator=gen) * 2)
    layers = [(torch.randn(2, 5, 8, generator=gen) * (j + 1) + j).to(dtype) for j in range(k)]
    layers = [t.requires_grad_() for t in layers]
    mask = torch.rand(2, 5, generator=gen) > 0.3
    mask[0, 0] = True
    leaves = {"free": mix.mix.free, **{f"h{j}": t for j, t in enumerate(layers)}}
    if mix.gamma is not None:
        leaves["gamma"] = mix.gamma
    kwargs = {"mask": mask} if layer_norm is True else {}
    outcomes = {}
    for form in ("list", "tuple", "stacked"):
        inputs = {"list": layers, "tuple": tuple(layers), "stacked": torch.stack(layers)}[form]
        torch.manual_seed(seed)  # the same dropout mask for every form
        outcomes[form] = run(lambda inputs=inputs: mix(inputs, **kwargs), leaves, seed)
    base = outcomes.pop("list")
    assert base.out is not None
    assert base.grads is not None
    for form, got in outcomes.items():
        assert got.out is not None
        assert got.grads is not None
        assert torch.equal(got.out, base.out), form
        for leaf, grad in got.grads.items():
            assert_close(f"{form}: grad {leaf}", grad, base.grads[leaf], 0.0)
