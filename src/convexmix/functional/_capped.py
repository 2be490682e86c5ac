r"""The capped projection: the Euclidean projection onto the capped simplex (private).

:math:`p = \mathrm{clip}(x - \tau, l, u)` onto :math:`\{l \le p \le u,\ \sum p = t\}`
(constrained sparsemax, Malaviya et al. 2018), for ``project_simplex`` and ``sparsemax``
with ``lower``/``upper``.

The threshold :math:`\tau` of the non-increasing, piecewise-linear mass
:math:`m(\tau) = \sum_i \mathrm{clip}(x_i - \tau, l_i, u_i)` is found by a few halvings of
a bracket, then safeguarded Newton steps (Newton from the current partition into lower /
free / upper entries, a halving when it leaves the bracket) until the partition stops
changing; the threshold is then taken exactly, in float64, from the partition. Each step
is O(K), with no sort: the same code runs on CPU and GPU. Eager float32/64 calls on CPU
run the same search in C (``_kernels/capped.c``: row by row, one branch-free pass per step
over the entries still inside the bracket, long rows started from a sample; or, for 8+
rows whose bounds do not vary along the row, 16 rows at a time in lockstep), which also
checks the sums; the torch code is the fallback. Number bounds in an eager call that
needs no gradient go straight to the kernel (``_capped_lean``), which leaves rows
with NaN or +inf and infeasible bounds to the full path.

The forward is a ``torch.library`` custom op with a vmap rule, wrapped in a staticmethod
``autograd.Function`` whose backward is O(K) from the saved output. The checks of the
bounds and the special values (:mod:`._bounds`) run inside the op, on real values: eager
calls, ``torch.compile`` and ``torch.func.vmap`` raise the same errors and give the same
special values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from convexmix._kernels import capped as native
from convexmix._validation import any_true, is_number, traced
from convexmix.functional._bounds import as_bound, check_order, check_sums, rows_of, special_rows
from convexmix.functional._ops import register_map

__all__ = ["capped_projection"]

#: Halvings of the bracket before the safeguarded Newton steps.
CAPPED_BISECT_STEPS = 6
#: The Newton steps stop when the partition is stable; this caps them (each failed
#: Newton step halves the bracket, so 200 steps reach any float's resolution).
CAPPED_MAX_STEPS = 200
#: Blocks of at least this many elements (scalar bounds, rows of ``COMPACT_K``+ entries)
#: gather the entries that can still change state after ``COMPACT_AFTER`` false-position
#: steps, and finish on those.
COMPACT_NUMEL = 1 << 15
COMPACT_AFTER = 2
COMPACT_K = 128
#: Rows are projected in blocks of about this many elements (small reused scratch).
ROW_BLOCK = 1 << 20


def _gather_active(
    z: Tensor, lo: Tensor, hi: Tensor, lv: float, uv: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The entries whose state can change for tau in [lo, hi] (as values and row indices)
    and, per row, the mass of the others: those at the cap for every tau <= hi and those
    at the lower bound for every tau >= lo (strict tests: ties stay active)."""
    capped = (z - hi) > uv if math.isfinite(uv) else torch.zeros_like(z, dtype=torch.bool)
    low = (z - lo) < lv
    const = low.sum(-1).to(z.dtype) * lv
    if math.isfinite(uv):
        const += capped.sum(-1).to(z.dtype) * uv
    active = ~(capped | low)
    rows = active.nonzero()[:, 0]
    return z[active], rows, const


def _exact_compact(
    compact: tuple[Tensor, Tensor, Tensor],
    tau: Tensor,
    lo: Tensor,
    hi: Tensor,
    z: Tensor,
    lv: float,
    uv: float,
    total: float,
) -> Tensor:
    """The threshold from the partition of the gathered entries at ``tau``, in float64
    (the gathered set holds every entry whose state differs anywhere in [lo, hi])."""
    za, ra, const = compact
    rows = z.shape[0]
    f64 = torch.float64
    za64 = za.to(f64)
    t64 = tau.reshape(-1).to(f64)
    counts: tuple[Tensor, Tensor] | None = None
    for _ in range(4):
        d = za64 - t64[ra]
        up = d >= uv
        lw = d <= lv
        free = ~(up | lw)
        n_up = torch.zeros(rows, dtype=f64, device=z.device).index_add_(0, ra, up.to(f64))
        n_lo = torch.zeros(rows, dtype=f64, device=z.device).index_add_(0, ra, lw.to(f64))
        if counts is not None and torch.equal(n_up, counts[0]) and torch.equal(n_lo, counts[1]):
            break
        counts = (n_up, n_lo)
        n_free = torch.zeros(rows, dtype=f64, device=z.device).index_add_(0, ra, free.to(f64))
        s = torch.zeros(rows, dtype=f64, device=z.device).index_add_(
            0, ra, torch.where(free, za64, 0.0)
        )
        s += const.to(f64) + n_lo * lv
        if math.isfinite(uv):
            s += n_up * uv
        t64 = torch.where(n_free > 0, (s - total) / n_free.clamp_min(1.0), t64)
    return t64.unsqueeze(-1)


def _capped_rows(z: Tensor, lo_b: Tensor, up_b: Tensor, total: float, n_iter: int) -> Tensor:
    """Project each row of a 2-D block ``z`` onto ``{l <= p <= u, sum p = total}``."""
    rows, k = z.shape
    dt = z.dtype
    present = z > -math.inf
    has_absent = not bool(present.all())
    if has_absent:  # absent entries are 0 and take no part in the constraint
        lo_b = torch.where(present, lo_b, 0.0)
        up_b = torch.where(present, up_b, 0.0)
    scalar = lo_b.numel() == 1 and up_b.numel() == 1
    inf = z.new_full((), math.inf)
    lv = uv = 0.0
    if scalar:
        lv, uv = float(lo_b), float(up_b)
        if has_absent:
            zmax = z.amax(-1, keepdim=True)
            zmin = torch.where(present, z, inf).amin(-1, keepdim=True)
        else:
            zmin, zmax = torch.aminmax(z, dim=-1, keepdim=True)
        n = present.sum(-1, keepdim=True).to(dt) if has_absent else z.new_full((rows, 1), k)
        # hi: at max - t/n every present entry is <= max(l, t/n): the mass is <= t.
        hi = torch.minimum(zmax - lv, zmax - total / n.clamp_min(1))
        # lo: every entry at u, or (u = inf) the top entry alone carries t - sum l.
        lo = zmin - uv if math.isfinite(uv) else zmax - lv - (total - n * lv)
        lo = torch.minimum(lo, hi)
    else:
        zl = torch.where(present, z - lo_b, -inf)
        hi = zl.amax(-1, keepdim=True)  # every entry at its lower bound
        finite_u = present & (up_b < math.inf)
        lo1 = torch.where(finite_u, z - up_b, inf).amin(-1, keepdim=True)
        slack = total - torch.where(present, lo_b, 0.0).sum(-1, keepdim=True)
        any_inf = (present & ~finite_u).any(-1, keepdim=True)
        lo2 = torch.where(
            any_inf, torch.where(present & ~finite_u, zl, -inf).amax(-1, keepdim=True) - slack, inf
        )
        lo = torch.minimum(torch.minimum(lo1, lo2), hi)
    allabsent = ~present.any(-1, keepdim=True)
    lo = torch.where(allabsent, 0.0, lo)
    hi = torch.where(allabsent, 0.0, hi)

    buf = torch.empty_like(z)
    # Once the bracket is narrow, only the entries that can change state inside it
    # matter: they are gathered (with their row index) and the others are counted.
    compact: tuple[Tensor, Tensor, Tensor] | None = None
    big = scalar and z.numel() >= COMPACT_NUMEL and k >= COMPACT_K

    def excess(tau: Tensor) -> Tensor:  # m(tau) - total, m non-increasing
        if compact is None:
            torch.sub(z, tau, out=buf)
            return buf.clamp_(lo_b, up_b).sum(-1, keepdim=True) - total
        za, ra, const = compact
        d = (za - tau.reshape(-1)[ra]).clamp_(lv, uv)
        return (const + z.new_zeros(rows).index_add_(0, ra, d) - total).unsqueeze(-1)

    for _ in range(n_iter):
        mid = (lo + hi) / 2
        above = excess(mid) >= 0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)

    # Illinois' false position on the bracket: superlinear where m is smooth in the
    # aggregate (many breakpoints), exact in one step once the bracket holds one linear
    # piece; the mass is then within rounding of the total.
    tol = 2 * torch.finfo(dt).eps * max(abs(total), 1.0) * math.log2(k + 2)
    flo = excess(lo).clamp_min_(0.0)
    fhi = excess(hi).clamp_max_(0.0)
    tau = torch.where(flo <= tol, lo, hi)
    done = allabsent | (flo <= tol) | (fhi >= -tol)
    side = torch.zeros_like(tau)
    for step in range(CAPPED_MAX_STEPS):
        if bool(done.all()):
            break
        if big and compact is None and step == COMPACT_AFTER:
            compact = _gather_active(z, lo, hi, lv, uv)
        mid = (lo + hi) / 2
        gap = flo - fhi
        s = lo + flo * (hi - lo) / torch.where(gap > 0, gap, 1.0)
        s = torch.where((s > lo) & (s < hi) & (gap > 0), s, mid)
        s = torch.where(done, tau, s)
        f = excess(s)
        now = ~done & ((f.abs() <= tol) | (mid <= lo) | (mid >= hi))
        tau = torch.where(now, s, tau)
        done = done | now
        pos = f > 0
        fhi = torch.where(pos & (side > 0), fhi * 0.5, fhi)
        flo = torch.where(~pos & (side < 0), flo * 0.5, flo)
        lo = torch.where(pos, s, lo)
        flo = torch.where(pos, f, flo)
        hi = torch.where(pos, hi, s)
        fhi = torch.where(pos, fhi, f)
        side = torch.where(pos, 1.0, -1.0)

    # The exact threshold from the partition at tau, in float64; a stable partition
    # (checked at the new threshold) means exact. One or two rounds at most.
    f64 = torch.float64
    if compact is not None:
        tau64 = _exact_compact(compact, tau, lo, hi, z, lv, uv, total)
        out = torch.empty_like(z)
        torch.sub(z, tau64, out=out)
        return out.clamp_(lv, uv)
    zero = z.new_zeros(())
    upper_mask = torch.empty(z.shape, dtype=torch.bool, device=z.device)
    lower_mask = torch.empty(z.shape, dtype=torch.bool, device=z.device)
    tau64 = tau.to(f64)
    counts = None
    for _ in range(4):
        d64 = z - tau64
        torch.ge(d64, up_b, out=upper_mask)
        torch.le(d64, lo_b, out=lower_mask)
        new_counts = torch.cat(
            [upper_mask.sum(-1, keepdim=True), lower_mask.sum(-1, keepdim=True)], -1
        )
        if counts is not None and torch.equal(new_counts, counts):
            break
        counts = new_counts
        free = ~(upper_mask | lower_mask)
        s64 = torch.where(free, z, zero).to(f64).sum(-1, keepdim=True)
        if scalar:
            uv = float(up_b)
            if math.isfinite(uv):
                s64 += new_counts[:, :1].to(f64) * uv
            s64 += new_counts[:, 1:].to(f64) * float(lo_b)
        else:
            s64 += torch.where(upper_mask, up_b, zero).to(f64).sum(-1, keepdim=True)
            s64 += torch.where(lower_mask, lo_b, zero).to(f64).sum(-1, keepdim=True)
        nf = free.sum(-1, keepdim=True)
        tau64 = torch.where(nf > 0, (s64 - total) / nf.clamp_min(1).to(f64), tau64)
    out = torch.empty_like(z)
    torch.sub(z, tau64, out=out)
    out.clamp_(lo_b, up_b)
    return out


def _capped_fwd(
    x: Tensor, lower: Tensor, upper: Tensor, dim: int, total: float, n_iter: int
) -> Tensor:
    shape = x.shape
    k = shape[dim]
    if x.numel() == 0:
        return x.new_zeros(shape)
    lo_r = rows_of(lower, shape, dim)
    up_r = rows_of(upper, shape, dim)
    rows = x.movedim(dim, -1).reshape(-1, k)
    check_order(rows, lo_r, up_r)
    if bool(((lo_r > up_r) | (lo_r == math.inf) | (up_r == -math.inf)).any()):
        # out of order only at absent entries (checked above): they take no part
        present = rows > -math.inf
        lo_r = torch.where(present, lo_r, 0.0)
        up_r = torch.where(present, up_r, 0.0)
    # a lower bound of -inf (or beyond the dtype) is the dtype's lowest value: the same
    # projection, and the search's bracket stays finite
    lo_r = lo_r.clamp_min(-torch.finfo(x.dtype).max)
    rows, lo_r, up_r, nan_rows = special_rows(rows, lo_r, up_r, total)
    out: Tensor | None = None
    if native.capped_applies(x):
        try:
            out = native.capped(rows.contiguous(), lo_r, up_r, total)
        except native.InfeasibleError:
            check_sums(rows, lo_r, up_r, total, dim)  # raises the error that says the sums
    if out is None:
        check_sums(rows, lo_r, up_r, total, dim)
        out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
        step = max(1, ROW_BLOCK // max(k, 1))
        for a in range(0, rows.shape[0], step):
            lb = lo_r if lo_r.shape[0] == 1 else lo_r[a : a + step]
            ub = up_r if up_r.shape[0] == 1 else up_r[a : a + step]
            out[a : a + step] = _capped_rows(rows[a : a + step], lb, ub, total, n_iter)
    if nan_rows is not None:
        out = out.masked_fill(nan_rows, math.nan)
    moved = list(shape)
    moved.append(moved.pop(dim))
    return out.reshape(moved).movedim(-1, dim).contiguous()


def _bound_grads(
    ctx: Any, grad: Tensor, free: Tensor, at_lo: Tensor, at_up: Tensor, q: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients for the bound tensors: ``1_B (g - q)`` summed to each bound's shape."""
    lower, upper = ctx.saved_tensors[1], ctx.saved_tensors[2]
    glo = gup = None
    if ctx.needs_input_grad[1]:
        glo = torch.where(at_lo, grad - q, 0.0).sum_to_size(lower.shape).to(lower.dtype)
    if ctx.needs_input_grad[2]:
        gup = torch.where(at_up, grad - q, 0.0).sum_to_size(upper.shape).to(upper.dtype)
    return glo, gup


def _capped_vjp(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    """The capped projection: the sparsemax Jacobian on the free entries (strictly between
    their bounds), zero on the clamped ones; O(K) from the output."""
    y, lower, upper = ctx.saved_tensors
    d = ctx.dim
    at_lo = (y <= lower) & (y > -math.inf)
    at_up = y >= upper
    free = ~(at_lo | at_up)
    gd = torch.where(free, grad, 0.0)
    q = gd.sum(d, keepdim=True) / free.sum(d, keepdim=True).clamp_min(1)
    dx = gd.sub_(q).masked_fill_(~free, 0.0) if ctx.needs_input_grad[0] else None
    glo, gup = _bound_grads(ctx, grad, free, at_lo, at_up, q)
    return dx, glo, gup


_CAPPED = register_map(
    "project_capped", _capped_fwd, _capped_vjp, n_diff=3, dim_arg=3, saved=(1, 2), n_tensors=3
)


def _scalar_bound(value: float | Tensor | None, default: float, dtype: torch.dtype) -> float | None:
    """A bound given as None or a number, as the float the op would use (beyond the
    dtype's range: its infinity); None for a tensor or NaN (the full path's business)."""
    if value is None:
        return default
    if not is_number(value):
        return None
    v = float(value)
    if v != v:
        return None
    return math.copysign(math.inf, v) if abs(v) > torch.finfo(dtype).max else v


def _capped_lean(
    z: Tensor, d: int, total: float, lower: float | Tensor | None, upper: float | Tensor | None
) -> Tensor | None:
    """The eager call with number bounds and no gradient, straight to the native kernel:
    no bound tensors, no pass for the special values (the kernel finds NaN and +inf and
    leaves them, and infeasible bounds, to the full path). None where it does not apply."""
    if z.__class__ is not Tensor or not native.capped_applies(z) or z.numel() == 0:
        return None
    if (torch.is_grad_enabled() and z.requires_grad) or traced():
        return None
    lo = _scalar_bound(lower, 0.0, z.dtype)
    up = _scalar_bound(upper, math.inf, z.dtype)
    if lo is None or up is None or not (-math.inf < lo <= up):
        return None  # tensors, NaN, -inf lower, out of order: the full path checks them
    k = z.shape[d]
    last = d == z.dim() - 1
    rows = z.contiguous() if last else z.movedim(d, -1).contiguous()
    try:
        out = native.capped_scalar(rows, k, lo, up, total)
    except native.InfeasibleError:
        return None  # the full path raises the error that says the sums
    if out is None or last:
        return out
    return out.movedim(-1, d).contiguous()


def capped_projection(
    z: Tensor, d: int, total: float, lower: float | Tensor | None, upper: float | Tensor | None
) -> Tensor:
    """The capped projection of the prepared ``z`` (absent entries -inf) along ``d``."""
    lean = _capped_lean(z, d, total, lower, upper)
    if lean is not None:
        return lean
    lo = as_bound(lower, z, "lower", 0.0)
    up = as_bound(upper, z, "upper", math.inf)
    if traced() or any_true(lo.detach() < 0):
        # absent entries (-inf) get bounds 0, so the backward sees them as clamped
        present = z.detach() > -math.inf
        lo = torch.where(present, lo, 0.0)
        up = torch.where(present, up, 0.0)
    return _CAPPED(z, lo, up, d, total, CAPPED_BISECT_STEPS)
