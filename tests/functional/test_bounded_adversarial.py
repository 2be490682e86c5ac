"""The adversarial suite of the constraints: every entry point that takes ``upper``,
``lower``, ``k`` or ``radius`` (the maps and the optimizers), on drawn hostile inputs,
against independent float64 NumPy references.

Each case draws rows (0 to 3, 9 or 17) of K = 0 to 6 entries along ``dim`` 0 or -1, a
dtype, a mask where the entry point takes one, bounds (none, a float, one per entry, one
per row, or one per entry and row; dyadic values, exact in every dtype, with +inf caps
and a NaN now and then in a tensor bound), and values mixing ordinary floats with 0,
ties, +-1e4 (the documented range of the logits), +-inf and NaN. Then either the call raises
:class:`~convexmix.ConvexMixError`, and the reference says the bounds are infeasible
(or out of order), or:

* a slice with a NaN (in the input, or in a bound of a present entry) is all NaN, and no
  other slice has one (the maps' special-value contract, bounded or not);
* masked and ``-inf`` entries are exactly 0;
* every other entry satisfies its constraint to the dtype's rounding, and the slice sums
  to the total;
* every entry agrees with the reference, in which a ``+inf`` entry is a finite value far
  above the others (the limit the contract names: the ``+inf`` entries take the mass up
  to their caps).

The budget is the hypothesis profile's (``HYPOTHESIS_PROFILE=long``: 10^5 cases per entry
point).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import convexmix as cx
from convexmix.errors import ConvexMixError
from tests.functional.test_adversarial import draw_bools, draw_values, ints, logged

F = cx.functional
inf, nan = math.inf, math.nan
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
UPPERS = [0.0, 0.125, 0.25, 0.5, 1.0, 2.0, inf]
LOWERS = [0.0, -0.5, 0.0625, 0.125, 0.25]
TOTALS = [1.0, 0.5, 3.0]
LIMIT = 1e4
#: how far above the finite entries a +inf entry sits in the references
FAR = {"euclid": 1e6, "kl": 3e3}


class InfeasibleError(Exception):
    """The reference's verdict: the call must raise ConvexMixError."""


# ------------------------------------------------------------------------ references


def _far_row(x: np.ndarray, present: np.ndarray, far: float) -> np.ndarray:
    """``x`` with +inf entries replaced by a value ``far`` above the finite ones."""
    finite = present & np.isfinite(x)
    top = x[finite].max() if finite.any() else 0.0
    return np.where(present, np.where(x == inf, top + far, x), -inf)


def capped_ref(x: np.ndarray, lo: np.ndarray, up: np.ndarray, total: float) -> np.ndarray:
    """The Euclidean projection of the rows of ``x`` (absent: -inf) onto
    {lo <= p <= up, sum p = total}, exact (rationals): the threshold on the linear piece
    of the mass between two breakpoints; raises InfeasibleError."""
    present = x > -inf
    if ((lo > up) & present).any() or (((lo == inf) | (up == -inf)) & present).any():
        raise InfeasibleError
    out = np.zeros_like(x)
    for r in range(x.shape[0]):
        pr = present[r]
        if np.isnan(x[r]).any() or (np.isnan(lo[r]) | np.isnan(up[r]))[pr].any():
            out[r] = nan
            continue
        if not pr.any():
            continue
        lo_r, up_r = lo[r][pr], up[r][pr]
        if lo_r.sum() > total * (1 + 1e-9) or up_r.sum() < total * (1 - 1e-9):
            raise InfeasibleError
        out[r][pr] = _capped_exact(_far_row(x[r], pr, FAR["euclid"])[pr], lo_r, up_r, total)
    return out


def _capped_exact(z: np.ndarray, lo: np.ndarray, up: np.ndarray, total: float) -> np.ndarray:
    zq = [Fraction(float(v)) for v in z]
    lq = [Fraction(float(v)) for v in lo]
    uq = [None if v == inf else Fraction(float(v)) for v in up]
    t = Fraction(total)

    def clip(v: Fraction, i: int) -> Fraction:
        u = uq[i]
        return max(lq[i], v if u is None else min(v, u))

    def mass(tau: Fraction) -> Fraction:
        return sum((clip(zq[i] - tau, i) for i in range(len(zq))), Fraction(0))

    points = sorted(
        {zq[i] - lq[i] for i in range(len(zq))}
        | {zq[i] - u for i, u in enumerate(uq) if u is not None}
    )
    tau = None
    if mass(points[0]) < t:  # below every breakpoint: the uncapped entries are free
        n_free = sum(u is None for u in uq)
        tau = points[0] - (t - mass(points[0])) / n_free
    else:
        for a, b in itertools.pairwise(points):
            ma, mb = mass(a), mass(b)
            if ma >= t >= mb:
                tau = a if ma == mb else a + (ma - t) / (ma - mb) * (b - a)
                break
        if tau is None:
            tau = points[-1]  # every entry at its lower bound (sum lower == total)
    return np.array([float(clip(zq[i] - tau, i)) for i in range(len(zq))])


def csoftmax_ref(z: np.ndarray, up: np.ndarray, total: float) -> np.ndarray:
    """min(up, c exp(z)) per row with sum = total (absent: -inf), by repeated capping
    (Martins & Kreutzer's iteration: the softmax of the free entries times the mass left;
    the entries above their caps are capped; until none is)."""
    present = z > -inf
    if (up < 0).any():
        raise InfeasibleError
    out = np.zeros_like(z)
    for r in range(z.shape[0]):
        pr = present[r]
        if np.isnan(z[r]).any() or np.isnan(up[r])[pr].any():
            out[r] = nan
            continue
        if not pr.any():
            continue
        u = up[r][pr]
        if u.sum() < total * (1 - 1e-9):
            raise InfeasibleError
        s = _far_row(z[r], pr, FAR["kl"])[pr]
        capped = np.zeros(len(s), dtype=bool)
        while True:
            free = ~capped
            rest = max(total - u[capped].sum(), 0.0)
            p = np.where(capped, u, 0.0)
            if free.any():
                e = np.exp(s[free] - s[free].max())
                p[free] = rest * e / e.sum()
            over = free & (p > u)
            if not over.any():
                break
            capped |= over
        out[r][pr] = p
    return out


def simplex_ref(z: np.ndarray, total: float) -> np.ndarray:
    """The projection of one finite row onto the simplex (sort-based, float64)."""
    u = np.sort(z)[::-1]
    css = np.cumsum(u) - total
    ks = np.arange(1, len(z) + 1)
    rho = ks[u - css / ks > 0][-1]
    return np.maximum(z - css[rho - 1] / rho, 0.0)


def ksparse_distance(x: np.ndarray, k: int, total: float) -> float:
    """The smallest squared distance from the finite row ``x`` to the k-sparse simplex."""
    best = inf
    for support in itertools.combinations(range(len(x)), min(k, len(x))):
        s = list(support)
        p = np.zeros(len(x))
        p[s] = simplex_ref(x[s], total)
        best = min(best, float(((p - x) ** 2).sum()))
    return best


# ------------------------------------------------------------------------ strategies


def draw_bound(draw: st.DrawFn, palette: list[float], rows: int, k: int) -> Any:
    """None, a float, or a tensor (K,) / (rows, K) / (rows, 1) of palette values (NaN now
    and then)."""
    kind = draw(ints(0, 4))
    if kind == 0:
        return None
    if kind == 1:
        return draw(st.sampled_from(palette))
    shape = (k,) if kind == 2 or rows == 0 else ((rows, k) if kind == 3 else (rows, 1))
    idx = np.frombuffer(
        draw(st.binary(min_size=math.prod(shape), max_size=math.prod(shape))), np.uint8
    )
    vals = np.array([*palette, nan])[idx % (len(palette) + (idx[:1] % 8 == 0).sum())]
    return vals.reshape(shape)


@st.composite
def cases(draw: st.DrawFn, entry: str) -> dict[str, Any]:
    # 9 and 17 rows: the native kernel searches 8+ rows in lockstep (16 at a time)
    rows = draw(st.sampled_from([0, 1, 2, 3, 3, 9, 17]))
    k = draw(st.sampled_from([0, 1, 2, 2, 3, 3, 4, 5, 6]))
    x = draw_values(draw, rows * k).reshape(rows, k)
    case: dict[str, Any] = {
        # finite values within the maps' documented range, +-1e4 (a cap on an entry at
        # 1e30 that stays free needs a threshold no float holds: x - 1)
        "x": np.where(np.isfinite(x), np.clip(x, -LIMIT, LIMIT), x),
        "dim": draw(st.sampled_from([-1, 0])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "total": draw(st.sampled_from(TOTALS)),
        "mask": draw_bools(draw, rows * k).reshape(rows, k) if draw(st.booleans()) else None,
        "lower": draw_bound(draw, LOWERS, rows, k) if entry in BOTH else None,
        "upper": draw_bound(draw, UPPERS, rows, k) if entry in CAPPED else None,
        "k": draw(ints(1, 7)),
        "radius": draw(st.sampled_from([1.0, 0.5, 3.0])),
        "temperature": draw(st.sampled_from([1.0, 0.5, 1e-3, 10.0])),
        "lr": draw(st.sampled_from([0.1, 1.0, 100.0])),
        "start": draw_values(draw, rows * k, "simplex").reshape(rows, k),
    }
    return case


BOTH = {"project_simplex", "sparsemax", "projected"}
CAPPED = BOTH | {"softmax", "eg"}


# ------------------------------------------------------------------------- the checks


def _t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64).to(dtype)


def _bound(b: Any, dtype: torch.dtype, dim: int) -> Any:
    if not isinstance(b, np.ndarray):
        return b
    t = _t(b, dtype)
    return t.T if dim == 0 and t.dim() == 2 else (t.unsqueeze(-1) if dim == 0 else t)


def _bound_rows(b: Any, default: float, shape: tuple[int, int], dtype: torch.dtype) -> np.ndarray:
    """The bound as the op sees it: rounded to the compute dtype, broadcast to the rows."""
    cdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if b is None:
        b = default
    if isinstance(b, np.ndarray):
        v = _t(b, dtype).to(cdt).double().numpy()
    else:
        v = np.float64(b) if abs(b) <= torch.finfo(cdt).max else math.copysign(inf, b)
    return np.broadcast_to(v, shape).astype(np.float64)


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _run(
    entry: str, case: dict[str, Any]
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """(output rows, reference rows, present, the values the op sees) for one case, or
    InfeasibleError/ConvexMixError."""
    x, dim, dtype, total = case["x"], case["dim"], case["dtype"], case["total"]
    rows, k = x.shape
    cdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    xt = _t(x, dtype)
    xin = xt.T.contiguous() if dim == 0 else xt
    m = case["mask"] if entry in ("sparsemax", "softmax") else None
    mt = None if m is None else (torch.tensor(m).T if dim == 0 else torch.tensor(m))
    xv = xt.to(cdt).double().numpy()  # the values the op sees
    if m is not None:
        xv = np.where(m, xv, -inf)
    lo = _bound_rows(case["lower"], 0.0, (rows, k), dtype)
    up = _bound_rows(case["upper"], inf, (rows, k), dtype)
    low, upp = _bound(case["lower"], dtype, dim), _bound(case["upper"], dtype, dim)

    def out_rows(p: torch.Tensor) -> torch.Tensor:
        return p.T if dim == 0 else p

    if entry in ("project_simplex", "sparsemax"):
        fn = F.project_simplex if entry == "project_simplex" else F.sparsemax
        kw = {"mask": mt} if entry == "sparsemax" else {}
        p = fn(xin, dim, total=total, lower=low, upper=upp, **kw)
        return out_rows(p), capped_ref(xv, lo, up, total), xv > -inf, xv
    if entry == "softmax":
        temp = case["temperature"]
        z = (xt.to(cdt) / temp).double().numpy()
        if m is not None:
            z = np.where(m, z, -inf)
        p = F.softmax(xin, dim, temperature=temp, mask=mt, total=total, upper=upp)
        return out_rows(p), csoftmax_ref(z, up, total), z > -inf, z
    if entry == "project_l1_ball":
        r = case["radius"]
        p = out_rows(F.project_l1_ball(xin, dim, radius=r))
        return p, np.zeros_like(xv), np.ones_like(xv, dtype=bool), xv
    if entry == "project_sparse_simplex":
        p = out_rows(F.project_sparse_simplex(xin, case["k"], dim, total=total))
        return p, np.zeros_like(xv), np.ones_like(xv, dtype=bool), xv
    raise AssertionError(entry)


def check_map(entry: str, case: dict[str, Any]) -> None:
    dtype, total = case["dtype"], case["total"]
    try:
        p, ref, present, xs = _run(entry, case)
    except ConvexMixError as err:
        try:
            _run_reference_only(entry, case)
        except InfeasibleError:
            return
        raise AssertionError(f"raised {err!r} on feasible bounds") from err
    except InfeasibleError:
        raise AssertionError("no ConvexMixError on infeasible bounds") from None
    assert p.dtype == dtype
    assert p.shape == case["x"].shape
    pv = p.double().numpy()
    rows, k = pv.shape
    eo, ec = _eps(dtype), _eps(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    tiny = float(torch.finfo(dtype).tiny)
    if entry == "project_l1_ball":
        return _check_l1(case, pv)
    if entry == "project_sparse_simplex":
        return _check_ksparse(case, pv)
    nan_rows = np.isnan(ref).any(-1)
    for r in range(rows):
        if nan_rows[r]:
            assert np.isnan(pv[r]).all(), f"row {r} should be all NaN: {pv[r]}"
            continue
        assert not np.isnan(pv[r]).any(), f"row {r} has a NaN: {pv[r]}"
        assert (pv[r][~present[r]] == 0).all(), "an absent entry is not 0"
        if not present[r].any():
            continue
        # the threshold sits among the entries: it carries their rounding, ulp(max |x|)
        # (the softmax's logits after the temperature)
        finite = present[r] & np.isfinite(xs[r])
        scale = 4 * k * ec * (np.abs(xs[r][finite]).max() if finite.any() else 0.0)
        tol = total * (4 * eo + 16 * k * ec) + k * tiny + scale
        err = np.abs(pv[r] - ref[r]).max()
        assert err <= tol, f"row {r}: {pv[r]} vs reference {ref[r]} (err {err:.3g} > {tol:.3g})"
        assert abs(pv[r].sum() - total) <= total * k * (eo + 2 * ec) + k * tiny + scale


def _run_reference_only(entry: str, case: dict[str, Any]) -> None:
    """The reference alone (to say whether an error was due)."""
    dtype = case["dtype"]
    cdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = _t(case["x"], dtype).to(cdt).double().numpy()
    m = case["mask"] if entry in ("sparsemax", "softmax") else None
    if m is not None:
        x = np.where(m, x, -inf)
    lo = _bound_rows(case["lower"], 0.0, x.shape, dtype)
    up = _bound_rows(case["upper"], inf, x.shape, dtype)
    if entry == "softmax":
        csoftmax_ref(x, up, case["total"])
    elif entry in ("project_simplex", "sparsemax"):
        capped_ref(x, lo, up, case["total"])


def _check_l1(case: dict[str, Any], pv: np.ndarray) -> None:
    dtype, r = case["dtype"], case["radius"]
    cdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = _t(case["x"], dtype).to(cdt).double().numpy()
    k = x.shape[1]
    tol = r * (4 * _eps(dtype) + 16 * k * _eps(cdt)) + k * float(torch.finfo(dtype).tiny)
    for row, xr in zip(pv, x, strict=True):
        if np.isnan(xr).any():
            assert np.isnan(row).all()
            continue
        assert np.abs(row).sum() <= r + tol * 4
        if np.isinf(xr).any():  # the infinite entries share the radius, with their signs
            n = np.isinf(xr).sum()
            np.testing.assert_allclose(
                row, np.where(np.isinf(xr), np.sign(xr) * r / n, 0), atol=tol
            )
        elif np.abs(xr).sum() <= r:
            np.testing.assert_allclose(row, xr, atol=tol)
        else:
            ref = np.sign(xr) * simplex_ref(np.abs(xr), r)
            np.testing.assert_allclose(row, ref, atol=tol + r * 1e-12 * np.abs(xr).max())


def _check_ksparse(case: dict[str, Any], pv: np.ndarray) -> None:
    dtype, total, kk = case["dtype"], case["total"], case["k"]
    cdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = _t(case["x"], dtype).to(cdt).double().numpy()
    k = x.shape[1]
    tol = total * (4 * _eps(dtype) + 16 * k * _eps(cdt)) + k * float(torch.finfo(dtype).tiny)
    for row, xr in zip(pv, x, strict=True):
        if np.isnan(xr).any():
            assert np.isnan(row).all()
            continue
        assert (row[xr == -inf] == 0).all()
        if not (xr > -inf).any():  # nothing present: zeros
            continue
        assert (row >= 0).all()
        assert (row > 0).sum() <= kk
        assert abs(row.sum() - total) <= tol * 2
        if (xr == inf).any():
            n = min(kk, int((xr == inf).sum()))
            assert ((row > 0) <= (xr == inf)).all()
            np.testing.assert_allclose(row[row > 0], total / n, atol=tol)
        elif np.isfinite(xr).all() and np.abs(xr).max() <= 1e4:
            best = ksparse_distance(xr, kk, total)
            got = float(((row - xr) ** 2).sum())
            assert got <= best + 1e-4 * max(1.0, best) + 8 * tol, (got, best)


MAP_ENTRIES = [
    "project_simplex",
    "sparsemax",
    "softmax",
    "project_sparse_simplex",
    "project_l1_ball",
]


@pytest.mark.parametrize("entry", MAP_ENTRIES)
@given(data=st.data())
def test_constraint_holds_at_every_map(entry: str, data: st.DataObject) -> None:
    case = data.draw(cases(entry))
    logged(entry, lambda: check_map(entry, case), case)


# -------------------------------------------------------------------------- optimizers


def check_optimizer(entry: str, case: dict[str, Any]) -> None:
    dtype = case["dtype"] if case["dtype"] in (torch.float32, torch.float64) else torch.float64
    total, lr = case["total"], case["lr"]
    rows, k = case["x"].shape
    if rows == 0 or k == 0:
        return
    grad = _t(case["x"], dtype)
    up = _bound_rows(case["upper"], inf, (rows, k), dtype)
    lo = _bound_rows(case["lower"], 0.0, (rows, k), dtype)
    upper, lower = _bound(case["upper"], dtype, -1), _bound(case["lower"], dtype, -1)
    if entry == "eg":
        if np.isnan(up).any() or (up.sum(-1) < total).any():
            return  # no start on the capped simplex
        start = F.project_simplex(
            _t(case["start"], torch.float64), total=total, upper=torch.from_numpy(up.copy())
        )
        start = start.to(dtype)
        w = torch.nn.Parameter(start.clone())
        try:
            opt = cx.optim.ExponentiatedGradient([w], lr=lr, total=total, upper=upper)
        except ConvexMixError:
            assert dtype == torch.float32  # only rounding can put the start off the simplex
            return
        w.grad = grad
        if not torch.isfinite(grad).all():
            with pytest.raises(ConvexMixError, match="non-finite gradient"):
                opt.step()
            return
        z = (torch.log(start) - lr * grad).double().numpy()
        ref = csoftmax_ref(z, up, total)
        opt.step()
        pv = w.detach().double().numpy()
        fin = np.isfinite(z)
        tol = total * (4 * _eps(dtype) * k) + 4 * k * _eps(dtype) * np.abs(z[fin]).max(initial=0)
        np.testing.assert_allclose(pv, ref, atol=tol * 8)
        assert (pv <= up + tol).all()
        np.testing.assert_allclose(pv.sum(-1), total, atol=tol * 8)
        return
    w = torch.nn.Parameter(_t(case["start"], dtype) * 3 - 1)
    kw: dict[str, Any] = (
        {"k": case["k"]} if entry == "projected_k" else {"lower": lower, "upper": upper}
    )
    try:
        opt = cx.optim.Projected(torch.optim.SGD([w], lr=lr), [w], total=total, **kw)
    except ConvexMixError:
        if entry == "projected_k":
            raise
        with pytest.raises(InfeasibleError):
            capped_ref(w.detach().double().numpy(), lo, up, total)
        return
    before = w.detach().clone()
    w.grad = grad
    moved = (before - lr * grad).double().numpy()
    try:
        opt.step()
    except ConvexMixError:  # a -inf entry is absent: the rest may not meet the bounds
        assert entry == "projected"
        with pytest.raises(InfeasibleError):
            capped_ref(moved, lo, up, total)
        return
    pv = w.detach().double().numpy()
    fin = np.isfinite(moved)
    tol = total * 16 * k * _eps(dtype) + 4 * k * _eps(dtype) * np.abs(moved[fin]).max(initial=0)
    if entry == "projected_k":
        return _check_ksparse({**case, "x": moved, "dtype": dtype}, pv)
    ref = capped_ref(moved, lo, up, total)
    nan_rows = np.isnan(ref).any(-1)
    assert np.isnan(pv[nan_rows]).all()
    np.testing.assert_allclose(pv[~nan_rows], ref[~nan_rows], atol=tol * 4)


@pytest.mark.parametrize("entry", ["eg", "projected", "projected_k"])
@given(data=st.data())
def test_constraint_holds_at_every_optimizer(entry: str, data: st.DataObject) -> None:
    case = data.draw(cases("eg" if entry == "eg" else "projected"))
    logged(entry, lambda: check_optimizer(entry, case), case)
