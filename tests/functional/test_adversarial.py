"""The adversarial suite: every public map on hostile inputs, against a float64 reference.

Each case draws a shape (0 to 3 dims, sizes 0 to 6, K = 0 included), a ``dim``, one of
the four floating dtypes, a mask (or none; all-False slices included), a ``total`` (1, a
few ordinary values, tiny and huge ones, and ones the dtype cannot represent), and
values mixing ordinary floats with 0, ties, +-1e4, +-1e30, +-inf and NaN. Then:

* a ``total`` that the output dtype cannot represent is a ``ConvexMixError``;
* a slice with a present NaN is all NaN, and no other slice has a NaN (the NaN policy
  of ``torch.softmax``, the same for every map);
* p >= 0; masked entries are exactly 0; a slice with nothing present is all zeros;
* a slice with ``+inf`` entries puts all its mass on them, shared equally (reference);
* sum == total within ``sum_bound`` (below), and every entry agrees with an independent
  NumPy float64 reference within ``entry_bound``;
* on finite inputs, the gradient is finite.

sparsemax and 1.5-entmax run natively (``_kernels/rows.c``) where the kernels are built
and are also checked on their ATen path (``sparsemax_aten``, ``entmax15_aten``);
``project_auto`` is ``project_simplex``'s default (the native kernel on CPU).

``test_convex_combination_on_hostile_inputs`` does the same for the fused weighted sum, on
each of its three eager paths: inputs and weights (simplex, or free with +-inf and NaN;
``(K,)`` or per-channel) against ``sum_k w_k x_k`` in float64, NaN exactly where the
reference has one, results beyond the dtype's range as the same infinity, and gradients
against the closed form.

The budget is the hypothesis profile's: ``ci`` (the default, sized for a 2-core CI run)
or ``long`` (10^5 cases per map: ``pytest --hypothesis-profile=long``).

The bounds (``eps_o``: the output dtype's epsilon; ``eps_c``: the compute dtype's, float32
for float16/bfloat16 inputs; ``t``: total; ``K``: slice length):

* sum: ``|sum p - t| <= t * K * (eps_o + 2 * eps_c)``;
* entries: ``|p - ref| <= t * (2 * eps_o + 8 * K * eps_c) + K * tiny_o`` (``tiny_o`` the
  smallest normal of the output dtype: outputs below it are subnormal), plus, for
  ``entmax`` by bisection, ``4 * t * K * 2^(-n_iter * min(1, 1 / (alpha - 1)))`` (the
  bracket on the threshold is halved ``n_iter = 50`` times), and for ``stick_breaking``
  ``4 * t * min(1, max|z| * eps_c)``: ``z - log(K-1-i)`` is rounded in the compute dtype,
  so at ``|z| = 1e4`` in float32 the ratios of the weights carry a relative error of
  about 1e-3.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import convexmix as cx
from convexmix.errors import ConvexMixError

F = cx.functional
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECIAL = [0.0, 1.0, -1.0, 1e4, -1e4, 1e30, -1e30, math.inf, -math.inf, math.nan]
TOTALS = [1.0, 0.5, 3.0, 1e-3, 1e-30, 1e-39, 6e4, 1e30, 1e39, 1e300]
N_ITER = 50  # entmax's default

# name -> (call(x, dim, mask, total), alpha for the reference or None for softmax,
#          takes a mask, is stick-breaking)
Call = Callable[[torch.Tensor, int, Any, float], torch.Tensor]


def _entmax(alpha: float) -> Call:
    return lambda x, d, m, t: F.entmax(x, alpha, d, mask=m, total=t)


def _project(method: str) -> Call:
    return lambda x, d, m, t: F.project_simplex(x, d, total=t, method=method)


MAPS: dict[str, tuple[Call, float | None, bool]] = {
    "softmax": (lambda x, d, m, t: F.softmax(x, d, mask=m, total=t), None, True),
    "sparsemax": (lambda x, d, m, t: F.sparsemax(x, d, mask=m, total=t), 2.0, True),
    "entmax15": (lambda x, d, m, t: F.entmax15(x, d, mask=m, total=t), 1.5, True),
    "entmax_1.25": (_entmax(1.25), 1.25, True),
    "entmax_3": (_entmax(3.0), 3.0, True),
    "project_auto": (_project("auto"), 2.0, False),
    "project_sort": (_project("sort"), 2.0, False),
    "project_bisect": (_project("bisect"), 2.0, False),
    "project_condat": (_project("condat"), 2.0, False),
    "stick_breaking": (lambda x, d, m, t: F.stick_breaking(x, d, mask=m, total=t), None, True),
}
#: sparsemax and 1.5-entmax have two eager paths: the native row kernel (the default,
#: where the kernels are built) and the sort-based ATen code; "<map>_aten" forces the
#: second for the whole check (forward and backward).
MAPS["sparsemax_aten"] = MAPS["sparsemax"]
MAPS["entmax15_aten"] = MAPS["entmax15"]


# ------------------------------------------------------------------------- strategy

#: Values at the edges of the ordinary range: zeros of both signs, subnormals, the ends.
EDGES = [0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 20.0, -20.0]


@functools.cache
def binary(n: int) -> st.SearchStrategy[bytes]:
    """Strategies built once: hypothesis validates each new one (a tenth of a case)."""
    return st.binary(min_size=n, max_size=n)


@functools.cache
def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


def draw_values(draw: st.DrawFn, n: int, palette: str = "logits") -> np.ndarray:
    """``n`` float64 values (exact float32 numbers) decoded from ``5 n`` drawn bytes.

    One byte string is one hypothesis choice: drawing element by element cost ~10x the
    checks themselves, and the long profile (10^5 cases per map) needs the cases cheap.
    The bytes still shrink (towards zero bytes) and mutate (hypothesis repeats chunks:
    ties). Each element takes its kind from its first byte and its value from the next
    four. ``palette``:

    * ``"logits"``: a quarter each: ordinary in [-20, 20] (twice; 1 in 64 of them an
      edge value), wide in [-1e4, 1e4], special (0, +-1, +-1e4, +-1e30, +-inf, NaN);
    * ``"simplex"``: a third each: 0, in [0, 1], in [1e-30, 1e-3] (non-negative weights);
    * ``"free"``: half in [-4, 4], half special (0, +-inf, NaN): any weights.
    """
    raw = np.frombuffer(draw(binary(5 * n)), dtype=np.uint8)
    b = raw.reshape(n, 5)
    u = b[:, 1:].astype(np.float64) @ (256.0 ** -np.arange(1, 5))  # in [0, 1)
    kind = b[:, 0]
    if palette == "logits":
        special = np.array(SPECIAL)[b[:, 1] % len(SPECIAL)]
        edge = np.array(EDGES)[b[:, 1] % len(EDGES)]
        ordinary = np.where(kind >= 252, edge, 40.0 * u - 20.0)
        out = np.select([kind % 4 < 2, kind % 4 == 2], [ordinary, 2e4 * u - 1e4], special)
    elif palette == "simplex":
        out = np.select([kind % 3 == 0, kind % 3 == 1], [np.zeros(n), u], 1e-30 + 1e-3 * u)
    else:
        special = np.array([0.0, math.inf, -math.inf, math.nan])[b[:, 1] % 4]
        out = np.where(kind % 2 == 0, 8.0 * u - 4.0, special)
    return out.astype(np.float32).astype(np.float64)


def draw_bools(draw: st.DrawFn, n: int) -> np.ndarray:
    """``n`` booleans from ``n`` drawn bytes (one choice)."""
    raw = draw(binary(n))
    return (np.frombuffer(raw, dtype=np.uint8) & 1).astype(bool)


#: K = 0 one case in ten; short slices (1 to 3) weighted twice.
K_SIZES = st.sampled_from([0, 1, 1, 2, 2, 3, 3, 4, 5, 6])
DTYPE_ST = st.sampled_from(DTYPES)
TOTAL_ST = st.sampled_from(TOTALS)


@st.composite
def cases(draw: st.DrawFn, masked: bool) -> dict[str, Any]:
    ndim = draw(ints(1, 3))
    shape = [draw(ints(0, 4)) for _ in range(ndim)]
    dim = draw(ints(-ndim, ndim - 1))
    shape[dim] = draw(K_SIZES)
    dtype = draw(DTYPE_ST)
    n = math.prod(shape)
    # Mostly one special value at a time, so that the ordinary entries around it matter.
    x = draw_values(draw, n).reshape(shape)
    mask = None
    if masked and draw(st.booleans()):
        mshape = [s if draw(st.booleans()) else 1 for s in shape]
        mshape[dim] = shape[dim]
        mn = math.prod(mshape)
        mask = draw_bools(draw, mn).reshape(mshape)
    total = draw(TOTAL_ST)
    return {"x": x, "dim": dim, "dtype": dtype, "mask": mask, "total": total}


CASES = {True: cases(True), False: cases(False)}


# ------------------------------------------------------------------------ references


def _alpha_ref(z: np.ndarray, alpha: float | None, total: float) -> np.ndarray:
    """Rows of finite-or--inf ``z``, each with a finite entry: softmax (alpha None) or
    alpha-entmax by 100 halvings on the threshold, relative to the row maximum."""
    z = z - z.max(-1, keepdims=True)
    if alpha is None:
        e = np.exp(z)
        return total * e / e.sum(-1, keepdims=True)
    am1 = alpha - 1.0
    # in units of t^(alpha-1), which may overflow: p(z, t) = t p(z / t^(alpha-1), 1)
    info = np.finfo(np.float64)
    z = z * am1 * np.clip(np.exp(-am1 * np.log(total)), info.tiny, info.max)
    lo = np.full((z.shape[0], 1), -1.0)
    hi = np.zeros_like(lo)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        above = (np.clip(z - mid, 0.0, None) ** (1.0 / am1)).sum(-1, keepdims=True) >= 1.0
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    p = np.clip(z - lo, 0.0, None) ** (1.0 / am1)
    return p * (total / p.sum(-1, keepdims=True))


def map_reference(
    x: np.ndarray, present: np.ndarray, alpha: float | None, total: float
) -> np.ndarray:
    """Rows ``(R, K)`` in float64 under the documented policy: NaN in a present entry ->
    the row is NaN; +inf entries share the mass; nothing present -> zeros."""
    out = np.zeros_like(x)
    z = np.where(present, x, -np.inf)
    nan_row = np.isnan(z).any(-1)
    inf = z == np.inf
    inf_row = inf.any(-1) & ~nan_row
    live = (z > -np.inf).any(-1) & ~nan_row & ~inf_row
    out[nan_row] = np.nan
    out[inf_row] = total * inf[inf_row] / inf[inf_row].sum(-1, keepdims=True)
    if live.any():
        out[live] = _alpha_ref(z[live], alpha, total)
    return out


def stick_reference(z: np.ndarray, present: np.ndarray, total: float) -> np.ndarray:
    """Stick-breaking of rows ``(R, K-1)`` to ``(R, K)`` in float64 log space, masked."""
    rows, km1 = z.shape
    u = z - np.log(np.arange(km1, 0, -1, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        log_s = -np.logaddexp(0.0, -u)
        log_rest = np.cumsum(-np.logaddexp(0.0, u), -1)
    log_p = np.zeros((rows, km1 + 1))
    if km1:
        log_p[:, :1] = log_s[:, :1]
        log_p[:, 1:-1] = log_s[:, 1:] + log_rest[:, :-1]
        log_p[:, -1:] = log_rest[:, -1:]
    log_p = np.where(present, log_p, -np.inf)
    out = np.zeros_like(log_p)
    nan_row = np.isnan(log_p).any(-1)
    live = (log_p > -np.inf).any(-1) & ~nan_row
    out[nan_row] = np.nan
    if live.any():
        out[live] = _alpha_ref(log_p[live], None, total)
    return out


# ------------------------------------------------------------------------- the check


def eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_map(name: str, case: dict[str, Any]) -> None:
    call, alpha, takes_mask, stick = *MAPS[name][:3], name == "stick_breaking"
    dtype, dim, total = case["dtype"], case["dim"], case["total"]
    x = torch.tensor(case["x"]).to(dtype)
    ndim = x.dim()
    d = dim % ndim
    k_out = x.shape[d] + (1 if stick else 0)
    out_shape = list(x.shape)
    out_shape[d] = k_out
    mask_np = case["mask"] if takes_mask else None
    mask = None if mask_np is None else torch.from_numpy(mask_np)
    if stick and mask is not None:  # the mask is on the K outputs: one more along dim
        extra = list(mask.shape)
        extra[d] = 1
        mask = torch.cat([mask, torch.ones(extra, dtype=torch.bool)], d)

    info = torch.finfo(dtype)
    if not info.tiny <= total <= info.max:
        with pytest.raises(ConvexMixError, match="cannot be represented"):
            call(x, dim, mask, total)
        return

    xg = x.clone().requires_grad_(x.numel() > 0)
    out = call(xg, dim, mask, total)
    assert out.dtype == dtype
    assert tuple(out.shape) == tuple(out_shape)

    if out.numel() == 0:
        return
    # rows (R, K) in float64, with the present entries
    rows = out.numel() // k_out
    o = out.detach().double().movedim(d, -1).reshape(rows, k_out).numpy()
    xr = x.double().movedim(d, -1).reshape(rows, x.shape[d]).numpy()
    pres = np.ones(out_shape, dtype=bool)
    if mask is not None:
        pres = np.broadcast_to(mask.numpy(), out_shape)
    pres_r = np.moveaxis(pres, d, -1).reshape(rows, k_out)
    ref = stick_reference(xr, pres_r, total) if stick else map_reference(xr, pres_r, alpha, total)

    nan_ref = np.isnan(ref)
    assert (np.isnan(o) == nan_ref).all(), (xr, o, ref)
    nan_row = nan_ref.any(-1)
    assert nan_ref[nan_row].all()  # a NaN fills its slice
    o, ref, pres_r = o[~nan_row], ref[~nan_row], pres_r[~nan_row]
    assert (o >= 0).all()
    assert (o[~pres_r] == 0).all()

    k = max(k_out, 1)
    eps_o, eps_c = eps(dtype), eps(compute(dtype))
    sums = o.sum(-1)
    live = ref.sum(-1) > 0
    assert (sums[~live] == 0).all()
    sum_bound = total * k * (eps_o + 2 * eps_c)
    assert (np.abs(sums[live] - total) <= sum_bound).all(), (sums, total)

    bound = total * (2 * eps_o + 8 * k * eps_c) + k * info.tiny
    if name.startswith("entmax_"):
        assert alpha is not None
        bound += 4 * total * k * 2.0 ** (-N_ITER * min(1.0, 1.0 / (alpha - 1)))
    if stick:
        big = np.abs(xr[np.isfinite(xr)]).max(initial=0.0)
        bound += 4 * total * min(1.0, big * eps_c)
    err = np.abs(o - ref)
    assert (err <= bound).all(), (xr, o, ref, err.max(), bound)

    if xg.requires_grad and torch.isfinite(x).all():
        weight = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape).to(dtype)
        (out * weight).sum().backward()
        assert xg.grad is not None
        assert torch.isfinite(xg.grad).all()


#: ``ADVERSARIAL_LOG=path``: append "map cases failures" to ``path`` every 1000 cases and
#: each failing case as it happens (for long runs, which report only at their end).
_LOG = os.environ.get("ADVERSARIAL_LOG")
_counts: dict[str, list[int]] = {}


def logged(name: str, check: Callable[[], None], problem: dict[str, Any]) -> None:
    """Runs ``check``; with ``ADVERSARIAL_LOG`` set, counts the cases of ``name`` and logs
    each failing one as it happens and the counts every 1000 cases."""
    if not _LOG:
        check()
        return
    count = _counts.setdefault(name, [0, 0])
    count[0] += 1
    try:
        check()
    except BaseException as e:
        count[1] += 1
        with open(_LOG, "a") as f:
            f.write(f"FAIL {name} {problem!r}: {e!r}\n")
        raise
    if count[0] % 1000 == 0:
        with open(_LOG, "a") as f:
            f.write(f"{name} {count[0]} cases {count[1]} failures\n")


@pytest.mark.parametrize("name", list(MAPS))
@given(case=st.data())
def test_map_on_hostile_inputs(name: str, case: st.DataObject) -> None:
    from convexmix._kernels import rows as native

    problem = case.draw(CASES[MAPS[name][2]])
    native.rows_enabled = not name.endswith("_aten")
    try:
        logged(name, lambda: check_map(name, problem), problem)
    finally:
        native.rows_enabled = True


# ----------------------------------------------------------------- convex_combination

#: convex_combination's four eager paths: stack + matrix-vector product (tiny inputs, or
#: small ones with K >= 3, in two layouts), composite ATen (small inputs), the fused
#: kernels behind an autograd.Function (large inputs) and the custom op (torch.compile).
#: Hypothesis draws small inputs, so each path is forced in turn; None lets the call
#: choose (the everyday call's short checks).
COMBINE_PATHS = ["stack", "stack_mid", "composite", "fused", "op", None]


COMBINE_K = st.one_of(st.integers(1, 5), st.just(0))
WEIGHT_KINDS = st.sampled_from(["simplex", "simplex", "free"])
LAYOUTS = st.sampled_from(["list", "stacked"])


@st.composite
def combine_cases(draw: st.DrawFn) -> dict[str, Any]:
    k = draw(COMBINE_K)
    ndim = draw(ints(0, 3))
    shape = [draw(ints(0, 4)) for _ in range(ndim)]
    dtype = draw(DTYPE_ST)
    x = draw_values(draw, k * math.prod(shape)).reshape([k, *shape])
    # weights (K,) or per-channel (K, *S) with S broadcasting to the trailing shape
    j = draw(ints(0, ndim))
    wtail = [s if draw(st.booleans()) else 1 for s in shape[ndim - j :]]
    wn = k * math.prod(wtail)
    kind = draw(WEIGHT_KINDS)
    if kind == "simplex":  # a map's output: non-negative, exact zeros, sums to one
        w = draw_values(draw, wn, "simplex").reshape([k, *wtail])
        s = w.sum(0, keepdims=True)
        w = np.where(s > 0, w / np.where(s > 0, s, 1.0), 1.0 / max(k, 1))
    else:  # any weights (a ScalarMix gamma folded in), specials included
        w = draw_values(draw, wn, "free").reshape([k, *wtail])
    wdtype = [dtype, torch.float32, torch.float64][draw(ints(0, 2))]
    layout = draw(LAYOUTS)
    dim = draw(ints(-ndim - 1, ndim))
    return {"x": x, "w": w, "dtype": dtype, "wdtype": wdtype, "layout": layout, "dim": dim}


COMBINE_CASES = combine_cases()


def check_combine(case: dict[str, Any]) -> None:
    dtype, wdtype = case["dtype"], case["wdtype"]
    x = torch.tensor(case["x"]).to(dtype)  # (K, *shape)
    w = torch.tensor(case["w"]).to(wdtype)
    k = x.shape[0]
    xs = list(x.unbind(0))
    stacked = x.movedim(0, case["dim"]).contiguous()

    def call(weights: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
        if case["layout"] == "list":
            return F.convex_combination(weights, inputs)
        return F.convex_combination(weights, torch.stack(inputs, case["dim"]), dim=case["dim"])

    if k == 0:
        with pytest.raises(ConvexMixError, match=r"non-empty|K >= 1"):
            F.convex_combination(w, [] if case["layout"] == "list" else stacked, dim=case["dim"])
        return

    grads = bool(x.numel()) and dtype in (torch.float32, torch.float64)
    xg = [t.clone().requires_grad_(grads) for t in xs]
    wg = w.clone().requires_grad_(grads)
    out = call(wg, xg)
    assert out.dtype == dtype
    assert tuple(out.shape) == tuple(x.shape[1:])
    if out.numel() == 0:
        return

    # float64 reference from the very values the call saw (inputs and weights as cast)
    acc = torch.promote_types(compute(dtype), wdtype)
    wa = w.to(acc).double().numpy()
    xd = x.double().numpy()
    wb = wa.reshape((k,) + (1,) * (xd.ndim - wa.ndim) + wa.shape[1:])
    with np.errstate(invalid="ignore", over="ignore"):
        terms = wb * xd
        ref = terms.sum(0)
        scale = np.abs(terms).sum(0)
    o = out.detach().double().numpy()
    nan_ref = np.isnan(ref)
    assert (np.isnan(o) == nan_ref).all(), (case, o, ref)
    info = torch.finfo(dtype)
    ok = ~nan_ref
    o, ref, scale = o[ok], ref[ok], scale[ok]
    # results beyond the dtype's range round to +-inf (the same sign)
    big = np.abs(ref) >= info.max * (1 - 2 * eps(dtype))
    assert (np.sign(o[big]) == np.sign(ref[big])).all()
    assert (np.abs(o[big]) >= info.max * (1 - 4 * eps(dtype))).all()
    fin = ~big & np.isfinite(ref)
    assert (o[~fin & ~big] == ref[~fin & ~big]).all()  # +-inf terms: the same infinity
    bound = eps(dtype) * np.abs(ref[fin]) + (k + 1) * eps(acc) * scale[fin] + info.tiny
    err = np.abs(o[fin] - ref[fin])
    assert (err <= bound).all(), (case, o, ref, err.max())

    if grads and torch.isfinite(x).all() and torch.isfinite(w).all():
        g = torch.linspace(-1.0, 1.0, out.numel(), dtype=dtype).reshape(out.shape)
        got = torch.autograd.grad((out * g).sum(), [wg, *xg])
        assert all(torch.isfinite(t).all() for t in got)
        if dtype == torch.float64 and wdtype == torch.float64:
            wx = w.reshape(w.shape[:1] + (1,) * (x.dim() - w.dim()) + w.shape[1:])
            torch.testing.assert_close(got[1:], [g * wx[i].expand_as(g) for i in range(k)])
            # A sum of products: any order is right to (terms + 1) ulps of sum |g x|
            # (1e30 entries cancel, and absorb the rest, differently in each order).
            gw = torch.stack([(g * x[i]).sum_to_size(w.shape[1:]) for i in range(k)])
            size = torch.stack([(g * x[i]).abs().sum_to_size(w.shape[1:]) for i in range(k)])
            terms = x[0].numel() // max(w[0].numel(), 1) + 1
            assert ((got[0] - gw).abs() <= terms * eps(dtype) * size + 1e-300).all()


@pytest.mark.parametrize("path", COMBINE_PATHS)
@given(case=st.data())
def test_convex_combination_on_hostile_inputs(path: str | None, case: st.DataObject) -> None:
    from convexmix.functional import _combine

    problem = case.draw(COMBINE_CASES)
    # "stack_mid": the (K, N) form of the stacked contraction, which the call itself
    # takes for K >= 3 inputs larger than these
    stack_max = _combine.STACK_MAX
    _combine._force = "stack" if path == "stack_mid" else path
    _combine.STACK_MAX = -1 if path == "stack_mid" else stack_max
    try:
        logged(f"combine_{path or 'auto'}", lambda: check_combine(problem), problem)
    finally:
        _combine._force = None
        _combine.STACK_MAX = stack_max


# ------------------------------------------------------------------ the regressions


def test_nan_fills_its_slice_in_every_map() -> None:
    """Issue 14.1: NaN became zeros (with zero gradients) in the sparse maps."""
    x = torch.tensor([[math.nan, 1.0, 2.0], [0.0, 1.0, 2.0]])
    for name, (call, _, _) in MAPS.items():
        out = call(x, -1, None, 1.0)
        assert out[0].isnan().all(), name
        assert out[1].isfinite().all(), name
    p = F.stick_breaking(torch.tensor([math.nan, 1.0, 2.0]))
    assert p.isnan().all()


def test_nan_param_stays_nan_under_projected_sgd() -> None:
    """Issue 14.1: Projected(SGD) after a NaN gradient set the parameter to zeros."""
    w = torch.nn.Parameter(torch.full((3,), 1 / 3))
    opt = cx.optim.Projected(torch.optim.SGD([w], lr=0.1), [w])
    w.grad = torch.tensor([math.nan, 0.0, 0.0])
    opt.step()
    assert w.isnan().all()


def test_positive_inf_takes_all_the_mass() -> None:
    """Issue 14.8: softmax and sparsemax of [inf, 0, 1] gave NaN; entmax15 [nan, 0, 0]."""
    one = torch.tensor([math.inf, 0.0, 1.0])
    two = torch.tensor([math.inf, 0.0, math.inf])
    for name, (call, _, _) in MAPS.items():
        if name == "stick_breaking":
            continue
        assert call(one, -1, None, 1.0).tolist() == [1.0, 0.0, 0.0], name
        assert call(two, -1, None, 2.0).tolist() == [1.0, 0.0, 1.0], name


def test_entmax_bisection_is_shift_invariant() -> None:
    """Issue 14.3: NaN at x + 1e16, wrong values at x + 1e15, NaN at total=1e-17."""
    x = torch.tensor([0.3, -0.2], dtype=torch.float64)
    torch.testing.assert_close(F.entmax(x + 1e16, 2.0), F.sparsemax(x + 1e16))
    torch.testing.assert_close(F.entmax(x + 1e15, 1.5), F.entmax15(x + 1e15))
    torch.testing.assert_close(F.entmax(x + 1e15, 1.5), F.entmax15(x))
    for alpha in (1.5, 2.0):
        p = F.entmax(torch.tensor([0.3, 0.29999999], dtype=torch.float64), alpha, total=1e-17)
        assert p.isfinite().all()
        assert abs(float(p.sum()) - 1e-17) <= 1e-31


@pytest.mark.parametrize("method", ["sort", "bisect", "condat"])
def test_projection_sums_exactly_at_large_logits(method: str) -> None:
    """Issue 14.13: bisect/condat summed to 3.6e-12 off at float64 logits of 2e4."""
    x = torch.randn(64, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = F.project_simplex(x * 2e4, method=method)
    assert (p.sum(-1) - 1).abs().max() <= 4 * 40 * 2.2e-16


@pytest.mark.parametrize("name", ["project_bisect", "project_condat", "entmax_1.25"])
def test_empty_slices_give_empty_outputs(name: str) -> None:
    """Issue 14.12: K = 0 raised from inside torch (bisect, condat, entmax)."""
    out = MAPS[name][0](torch.zeros(3, 0), -1, None, 1.0)
    assert out.shape == (3, 0)


def test_unrepresentable_total_is_a_clear_error() -> None:
    """Issue 14.12: total=1e39 on float32 with bisection raised from inside torch."""
    with pytest.raises(ConvexMixError, match=r"total=1e\+39 cannot be represented.*float32"):
        F.project_simplex(torch.randn(3, 4), total=1e39, method="bisect")
    with pytest.raises(ConvexMixError, match="cannot be represented"):
        F.softmax(torch.randn(3, 4, dtype=torch.float16), total=1e5)


def test_sparse_and_complex_inputs_are_clear_errors() -> None:
    """Issue 14.12: sparse inputs reached torch; complex ones are rejected by dtype."""
    with pytest.raises(ConvexMixError, match="dense"):
        F.sparsemax(torch.eye(3).to_sparse())
    with pytest.raises(ConvexMixError, match="floating-point"):
        F.softmax(torch.zeros(3, dtype=torch.complex64))
