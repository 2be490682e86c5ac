r"""Bounded and sparse weights (private module).

* The capped simplex :math:`\{l \le p \le u,\ \sum p = t\}`: the Euclidean projection
  :math:`p = \mathrm{clip}(x - \tau, l, u)` (constrained sparsemax, Malaviya et al. 2018)
  and the KL projection of the softmax, :math:`p = \min(u, c\,e^{x})` (constrained
  softmax, Martins & Kreutzer 2017).
* The k-sparse simplex (Kyrillidis et al. 2013): the projection of the k largest entries.
* The l1 ball: :math:`\mathrm{sign}(x)\,\Pi_{\Delta_r}(|x|)` outside it, ``x`` inside.

The capped projection finds the threshold :math:`\tau` of the non-increasing,
piecewise-linear mass :math:`m(\tau) = \sum_i \mathrm{clip}(x_i - \tau, l_i, u_i)` by a few
halvings of a bracket, then safeguarded Newton steps (Newton from the current partition
into lower / free / upper entries, a halving when it leaves the bracket) until the
partition stops changing; the threshold is then taken exactly, in float64, from the
partition. Each step is O(K), with no sort: the same code runs on CPU and GPU. Eager
float32/64 calls on CPU run the same search row by row in C (``_kernels/capped.c``: one
branch-free pass per step over the entries still inside the bracket, long rows started
from a sample), which also checks the sums; the torch code is the fallback.

Every forward is a ``torch.library`` custom op with a vmap rule wrapped in a staticmethod
``autograd.Function`` whose backward is O(K) from the saved output, as for the other maps.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

from convexmix._kernels import capped as native
from convexmix._validation import any_true, broadcasts_to, check_int, is_number, prepare
from convexmix.errors import ConvexMixError, ConvexMixTypeError, ShapeError
from convexmix.functional._ops import register_map
from convexmix.functional._sparse import SPARSEMAX, sparsemax_vjp

__all__ = [
    "capped_projection",
    "constrained_softmax",
    "project_l1_ball",
    "project_sparse_simplex",
]

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


# ----------------------------------------------------------------------------- bounds


def _as_bound(value: float | Tensor | None, z: Tensor, d: int, name: str, default: float) -> Tensor:
    """A bound as a tensor of ``z``'s dtype and number of dims that broadcasts to ``z``."""
    if value is None:
        return torch.full((1,) * z.dim(), default, dtype=z.dtype, device=z.device)
    if isinstance(value, Tensor):
        b = value.to(device=z.device, dtype=z.dtype)
        if b.dim() > z.dim() or not broadcasts_to(b.shape, z.shape):
            raise ShapeError(
                f"{name} of shape {tuple(value.shape)} does not broadcast to x of shape "
                f"{tuple(z.shape)}."
            )
        return b.reshape((1,) * (z.dim() - b.dim()) + tuple(b.shape))
    if not is_number(value):
        raise ConvexMixTypeError(
            f"{name} must be a number or a tensor; got {type(value).__name__}."
        )
    if math.isnan(value):
        raise ConvexMixError(f"{name} must not be NaN.")
    return torch.full((1,) * z.dim(), float(value), dtype=z.dtype, device=z.device)


def _check_feasible(
    z: Tensor, d: int, lo: Tensor, up: Tensor, total: float, sums: bool = True
) -> None:
    """Raise when a slice with present entries cannot meet its bounds (eager only);
    ``sums=False`` checks the bounds alone (the native kernel checks the sums)."""
    if torch.compiler.is_compiling():
        return
    try:
        if any_true(lo > up):
            raise ConvexMixError(
                "lower must be <= upper everywhere; got an entry with lower > upper."
            )
        if any_true(lo == math.inf) or any_true(up == -math.inf):
            raise ConvexMixError("lower must be < inf and upper > -inf.")
        if not sums:
            return
        present = z > -math.inf
        k = z.shape[d]
        lsum = torch.where(present, lo, 0.0).sum(d) if lo.numel() > 1 else None
        usum = torch.where(present, up, 0.0).sum(d) if up.numel() > 1 else None
        n = present.sum(d).to(z.dtype) if (lsum is None or usum is None) else None
        if lsum is None:
            lsum = n * lo.reshape(()) if n is not None else lo.sum()  # scalar bound
        if usum is None:
            usum = n * up.reshape(()) if n is not None else up.sum()
        any_present = present.any(d) if k > 0 else present.sum(d) > 0
        tol = 1e-12 * max(abs(total), 1.0) * max(k, 1)
        low_bad = any_present & (lsum > total + tol)
        up_bad = any_present & (usum < total - tol)
        if any_true(low_bad):
            idx = int(low_bad.reshape(-1).nonzero()[0])
            raise ConvexMixError(
                f"infeasible bounds: the sum of lower ({float(lsum.reshape(-1)[idx]):.6g}) "
                f"exceeds total ({total:.6g}) in slice {idx} along dim={d}."
            )
        if any_true(up_bad):
            idx = int(up_bad.reshape(-1).nonzero()[0])
            raise ConvexMixError(
                f"infeasible bounds: the sum of upper ({float(usum.reshape(-1)[idx]):.6g}) "
                f"over the present entries is below total ({total:.6g}) in slice {idx} "
                f"along dim={d}."
            )
    except RuntimeError:  # vmap: values cannot be read
        return


def _rows(b: Tensor, shape: torch.Size, d: int) -> Tensor:
    """A bound (same ndim as x) as 2-D rows matching ``x.movedim(d, -1).reshape(-1, K)``:
    ``(1, 1)`` or ``(1, K)`` when it does not vary across rows, else ``(R, K|1)``."""
    bm = b.movedim(d, -1)
    kb = bm.shape[-1]
    if all(s == 1 for s in bm.shape[:-1]):
        return bm.reshape(1, kb)
    full = list(shape)
    full.pop(d)
    return bm.expand(*full, kb).reshape(-1, kb)


# ----------------------------------------------------------------- capped projection


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


def _project_blocks(
    x: Tensor, lower: Tensor, upper: Tensor, dim: int, total: float, n_iter: int
) -> Tensor:
    shape = x.shape
    k = shape[dim]
    rows = x.movedim(dim, -1).reshape(-1, k)
    lo_r = _rows(lower, shape, dim)
    up_r = _rows(upper, shape, dim)
    out_n = None
    if native.capped_applies(x):
        try:
            out_n = native.capped(rows.contiguous(), lo_r, up_r, total)
        except native.InfeasibleError:
            _check_feasible(x, dim, lower, upper, total)  # raises the error that says the sums
    if out_n is not None:
        moved = list(shape)
        moved.append(moved.pop(dim))
        return out_n.reshape(moved).movedim(-1, dim).contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    step = max(1, ROW_BLOCK // max(k, 1))
    for a in range(0, rows.shape[0], step):
        lb = lo_r if lo_r.shape[0] == 1 else lo_r[a : a + step]
        ub = up_r if up_r.shape[0] == 1 else up_r[a : a + step]
        out[a : a + step] = _capped_rows(rows[a : a + step], lb, ub, total, n_iter)
    moved = list(shape)
    moved.append(moved.pop(dim))
    return out.reshape(moved).movedim(-1, dim).contiguous()


def _capped_fwd(
    x: Tensor, lower: Tensor, upper: Tensor, dim: int, total: float, n_iter: int
) -> Tensor:
    return _project_blocks(x, lower, upper, dim, total, n_iter)


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


def capped_projection(
    z: Tensor, d: int, total: float, lower: float | Tensor | None, upper: float | Tensor | None
) -> Tensor:
    """The capped projection of the prepared ``z`` (absent entries -inf) along ``d``."""
    lo = _as_bound(lower, z, d, "lower", 0.0)
    up = _as_bound(upper, z, d, "upper", math.inf)
    # the native kernel checks the sums as it goes (and the error is raised then)
    sums = not native.capped_applies(z)
    _check_feasible(z.detach(), d, lo.detach(), up.detach(), total, sums)
    if any_true(lo.detach() < 0):
        # absent entries (-inf) get bounds 0, so the backward sees them as clamped
        present = z.detach() > -math.inf
        lo = torch.where(present, lo, 0.0)
        up = torch.where(present, up, 0.0)
    return cast(Tensor, _CAPPED.function.apply(z, lo, up, d, total, CAPPED_BISECT_STEPS))


# ---------------------------------------------------------------- constrained softmax


def _csoftmax_fwd(x: Tensor, upper: Tensor, dim: int, total: float) -> Tensor:
    z = x.movedim(dim, -1).to(torch.float64)
    u = upper.movedim(dim, -1).to(torch.float64).expand(z.shape)
    present = z > -math.inf
    top = z.amax(-1, keepdim=True)
    anyp = top > -math.inf
    e = torch.exp(z - torch.where(anyp, top, 0.0))  # absent -> 0
    u = torch.where(present, u, math.inf)
    # Entries are capped in order of e / u: the capped set is a prefix of that order.
    ratio = torch.where(present, z - torch.where(anyp, top, 0.0) - torch.log(u), -math.inf)
    order = torch.sort(ratio, dim=-1, descending=True).indices
    es = e.gather(-1, order)
    us = u.gather(-1, order)
    capped_mass = us.cumsum(-1)  # mass of the first j+1 capped
    rest = es.flip(-1).cumsum(-1).flip(-1)  # sum of e from position j on
    k = z.shape[-1]
    # With the first j capped (j = 0..K-1): c_j = (t - U_j) / S_j; the solution has the
    # smallest j whose next entry is not capped: c_j e_(j) <= u_(j).
    cm_prev = torch.cat(
        [capped_mass.new_zeros((*capped_mass.shape[:-1], 1)), capped_mass[..., :-1]], -1
    )
    c = (total - cm_prev) / rest
    ok = (c * es <= us) | (rest <= 0)
    j = torch.where(ok.any(-1, keepdim=True), ok.to(torch.int8).argmax(-1, keepdim=True), k)
    pos = torch.arange(k, device=z.device).expand(z.shape)
    cap_sorted = pos < j
    capped = torch.zeros_like(cap_sorted).scatter_(-1, order, cap_sorted)
    # Exact finish: the capped mass and the free exponentials retaken by plain sums.
    ucap = torch.where(capped, u, 0.0).sum(-1, keepdim=True)
    efree = torch.where(capped, 0.0, e).sum(-1, keepdim=True)
    scale = (total - ucap).clamp_min(0.0) / torch.where(efree > 0, efree, 1.0)
    p = torch.where(capped, u, e * scale)
    p = torch.where(anyp, p, 0.0)
    return p.to(x.dtype).movedim(-1, dim).contiguous()


def _csoftmax_vjp(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The constrained softmax: ``p (g - <p, g>_F / R)`` on the free entries (``R`` their
    mass), zero on the capped ones; upper gets ``g - <p, g>_F / R`` where capped."""
    y, upper = ctx.saved_tensors
    d = ctx.dim
    capped = y >= upper
    pf = torch.where(capped, 0.0, y).to(grad.dtype)
    mass = pf.sum(d, keepdim=True)
    q = (pf * grad).sum(d, keepdim=True) / torch.where(mass > 0, mass, 1.0)
    dx = pf * (grad - q) if ctx.needs_input_grad[0] else None
    gup = None
    if ctx.needs_input_grad[1]:
        gup = torch.where(capped, grad - q, 0.0).sum_to_size(upper.shape).to(upper.dtype)
    return dx, gup


_CSOFTMAX = register_map(
    "constrained_softmax",
    _csoftmax_fwd,
    _csoftmax_vjp,
    n_diff=2,
    dim_arg=2,
    saved=(1,),
    n_tensors=2,
)


def constrained_softmax(z: Tensor, d: int, total: float, upper: float | Tensor) -> Tensor:
    """The constrained softmax of the prepared, temperature-scaled ``z`` along ``d``."""
    up = _as_bound(upper, z, d, "upper", math.inf)
    if any_true(up.detach() < 0):
        raise ConvexMixError("upper must be >= 0 for the softmax; got a negative entry.")
    _check_feasible(z.detach(), d, z.new_zeros((1,) * z.dim()), up.detach(), total)
    return cast(Tensor, _CSOFTMAX.function.apply(z, up, d, total))


# ------------------------------------------------------------------ k-sparse simplex


def _ksparse_fwd(x: Tensor, dim: int, k: int, total: float) -> Tensor:
    z = x.movedim(dim, -1)
    vals, idx = torch.topk(z, k, dim=-1)
    proj = SPARSEMAX.op(vals, vals.dim() - 1, total)
    out = torch.zeros_like(z).scatter_(-1, idx, proj)
    return out.movedim(-1, dim).contiguous()


# The k-sparse projection's Jacobian is sparsemax's on the support.
_KSPARSE = register_map("project_sparse_simplex", _ksparse_fwd, sparsemax_vjp)


def project_sparse_simplex(x: Tensor, k: int, dim: int = -1, *, total: float = 1.0) -> Tensor:
    r"""Euclidean projection onto the k-sparse simplex {p >= 0, sum p = t, ||p||_0 <= k}.

    The projection keeps the ``k`` largest entries and projects them onto the simplex
    (Kyrillidis et al., 2013); the others are 0. Ties among the k-th largest are broken
    by ``torch.topk``. Differentiable: the sparsemax Jacobian on the support, O(K).

    Args:
        x: any shape; ``dim`` indexes the K entries.
        k: the most non-zeros per slice, an int >= 1 (``k >= K`` is :func:`project_simplex`).
        dim: the dimension that sums to ``total``.
        total: the sum, > 0.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Example:
        >>> import torch, convexmix as cx
        >>> cx.functional.project_sparse_simplex(torch.tensor([0.5, 0.4, 0.3, -1.0]), k=2)
        tensor([0.5500, 0.4500, 0.0000, 0.0000])
    """
    check_int(k, "k", note=" (the most non-zeros)")
    z, d, total = prepare(x, dim, None, total)
    kk = min(k, z.shape[d])
    if kk == 0:
        return x.clone()
    out = cast(Tensor, _KSPARSE.function.apply(z, d, kk, total))
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- l1 ball


def project_l1_ball(x: Tensor, dim: int = -1, *, radius: float = 1.0) -> Tensor:
    r"""Euclidean projection onto the l1 ball :math:`\{p : \|p\|_1 \le r\}` along ``dim``.

    Slices inside the ball are unchanged; the others are
    :math:`\mathrm{sign}(x)\,\Pi_{\Delta_r}(|x|)` (Duchi et al., 2008), with
    :math:`\Pi_{\Delta_r}` the projection onto the simplex of sum ``r``. Differentiable:
    the identity inside, the signed sparsemax Jacobian outside.

    Args:
        x: any shape; ``dim`` indexes the K entries.
        dim: the dimension of the l1 norm.
        radius: ``r > 0``.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Example:
        >>> import torch, convexmix as cx
        >>> cx.functional.project_l1_ball(torch.tensor([0.8, -0.6, 0.1]))
        tensor([ 0.6000, -0.4000,  0.0000])
        >>> cx.functional.project_l1_ball(torch.tensor([0.2, -0.3]))  # inside: unchanged
        tensor([ 0.2000, -0.3000])
    """
    from convexmix.functional._project import project_simplex

    try:
        z, d, r = prepare(x, dim, None, radius)
    except ConvexMixError as err:
        raise ConvexMixError(str(err).replace("total", "radius")) from None
    a = z.abs()
    inside = a.sum(d, keepdim=True) <= r
    proj = torch.sign(z) * project_simplex(a, d, total=r)
    return torch.where(inside, z, proj).to(x.dtype)
