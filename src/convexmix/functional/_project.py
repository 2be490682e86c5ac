"""``project_simplex``: the exact Euclidean projection onto {p >= 0, sum p = total} (private).

Three methods, one backward (the sparsemax Jacobian, O(K) from the output):

* ``"sort"``: sort, prefix sums, threshold (sparsemax's ATen code), O(K log K);
* ``"bisect"``: a few halvings of the bracket [max - t, max - t/K] on the threshold tau,
  then Michelot steps tau <- (sum_{x > tau} x - t) / #{x > tau} (Newton's method on the
  piecewise-linear mass) until tau stops changing, when it is exact. O(K) per step, no
  sort, and the same code on CPU and GPU;
* ``"condat"``: the filter pass of Condat's algorithm (Math. Programming 158, 2016) gives
  a lower bound of tau with every support entry above it, then the same Michelot steps.

``"auto"`` runs the sparsemax op, whose native row kernel (``_kernels/rows.c``) serves
contiguous float32/float64 CPU inputs in O(K) expected per row; elsewhere it picks one of
the three.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from convexmix._kernels import rows as native
from convexmix._validation import PROJECTION_METHODS, check_choice, prepare
from convexmix.functional._capped import capped_projection
from convexmix.functional._ops import register_map
from convexmix.functional._projection import (
    SPARSEMAX,
    clamp_inf,
    finish,
    sparsemax_eager_vjp,
    sparsemax_sort,
    sparsemax_vjp,
)

__all__ = ["project_simplex"]

#: Halvings of the bracket before the exact Michelot steps of ``"bisect"``.
BISECT_STEPS = 8
#: ``"auto"`` on CPU, where the native row kernel does not apply, bisects rows of at
#: least this length when the whole input has at least ``AUTO_BISECT_NUMEL`` entries,
#: where bisection overtakes the sort (the figures are in docs/benchmarks.md), and any
#: row on GPU; it sorts otherwise.
AUTO_BISECT_K = 512
AUTO_BISECT_NUMEL = 1 << 16


#: Rows are projected in blocks of about this many elements, so that the scratch
#: tensors stay small and are reused instead of faulting in fresh pages.
ROW_BLOCK = 1 << 20


def _by_row_blocks(x: Tensor, dim: int, project: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``project`` (2-D rows -> projected rows) to blocks of rows along ``dim``."""
    z = x.movedim(dim, -1)
    shape = z.shape
    rows = z.reshape(-1, shape[-1])
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    step = max(1, ROW_BLOCK // max(shape[-1], 1))
    for a in range(0, rows.shape[0], step):
        out[a : a + step] = project(rows[a : a + step])
    return out.reshape(shape).movedim(-1, dim).contiguous()


def _shift_by_max(z: Tensor) -> tuple[Tensor, Tensor]:
    """(row max, or 0 for rows of only -inf; whether a row has a finite entry)."""
    top = z.amax(-1, keepdim=True)  # NaN for a row with a NaN: its output is all NaN
    present = top != -math.inf
    return torch.where(present, top, 0.0), present


def _bisect_fwd(x: Tensor, dim: int, total: float, n_iter: int) -> Tensor:
    if x.shape[dim] == 0:
        return x.new_empty(x.shape)
    return _by_row_blocks(x, dim, lambda rows: _bisect_rows(rows, total, n_iter))


def _bisect_rows(z: Tensor, total: float, n_iter: int) -> Tensor:
    """Project each row of a 2-D block ``z``."""
    z = clamp_inf(z)
    k = z.shape[-1]
    shift, present = _shift_by_max(z)
    zs = z - shift  # <= 0, in the input dtype; exact near the maximum (Sterbenz)
    # tau relative to the row maximum lies in [-t, -t/K]: at -t the maximum alone has
    # mass t, at -t/K every entry has at most t/K. A few halvings get close, cheaply.
    # The steps only select the support, so they run in the input dtype (no full-size
    # float64 copies); the exact threshold is taken in float64 at the end.
    lo = torch.full(shift.shape, -total, dtype=zs.dtype, device=z.device)
    hi = torch.full(shift.shape, -total / k, dtype=zs.dtype, device=z.device)
    buf = torch.empty_like(zs)  # scratch reused by every step: no fresh pages per step
    zero = zs.new_zeros(())
    for _ in range(n_iter):
        mid = lo + (hi - lo) * 0.5  # (lo + hi) / 2 overflows for totals near the max
        above = torch.sub(zs, mid, out=buf).clamp_min_(0.0).sum(-1, keepdim=True) >= total
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    # Michelot's classic start (sum z - t) / K is a lower bound too, exact when every
    # entry is in the support; start from the larger of the two bounds.
    finite = torch.where(zs > -math.inf, zs, zero, out=buf)
    tau = torch.maximum(lo, (finite.sum(-1, keepdim=True) - total) / k)
    return _michelot(z, zs, shift, present, tau, total, buf)


def _michelot(
    z: Tensor, zs: Tensor, shift: Tensor, present: Tensor, tau: Tensor, total: float, buf: Tensor
) -> Tensor:
    """Michelot steps from a lower bound ``tau`` of the threshold, then the exact output.

    Michelot's step tau <- (sum_{z > tau} z - t) / #{z > tau} is Newton's method on the
    piecewise-linear mass: from the right it lands at or below tau*, from the left it
    rises monotonically and stops at tau*. A stable support means converged.
    """
    k = zs.shape[-1]
    zero = zs.new_zeros(())
    support = torch.empty(zs.shape, dtype=torch.bool, device=z.device)
    count = torch.zeros_like(tau)
    for step in range(1, 2 * k + 5):
        torch.gt(zs, tau, out=support)
        new_count = support.sum(-1, keepdim=True).clamp_min(1).to(zs.dtype)
        tau = (torch.where(support, zs, zero, out=buf).sum(-1, keepdim=True) - total) / new_count
        done = step % 2 == 0 and bool(torch.equal(new_count, count))  # one sync per 2 steps
        count = new_count
        if done:
            break
    # The exact threshold from the support, in float64. float64 inputs: the shifted
    # entries, exact near the maximum (Sterbenz), as the sort does; summing the inputs
    # and subtracting count * max would lose ulp(sum) ~ 4e-12 at logits of 2e4. Other
    # dtypes: the inputs summed in float64 (exact), minus the shift.
    count64 = count.to(torch.float64)
    top64 = shift.to(torch.float64)
    if z.dtype == torch.float64:
        support_sum = torch.where(support, zs, zero, out=buf).sum(-1, keepdim=True)
    else:
        support_sum = torch.where(support, z, zero, out=buf).to(torch.float64).sum(-1, keepdim=True)
        support_sum -= count64 * top64
    tau = (support_sum - total) / count64
    return finish(z, shift.to(torch.float64), tau, present, -1, square=False)


def _condat_fwd(x: Tensor, dim: int, total: float) -> Tensor:
    if x.shape[dim] == 0:
        return x.new_empty(x.shape)
    return _by_row_blocks(x, dim, lambda rows: _condat_rows(rows, total))


#: Blocks of at most this many rows run Condat's filter on Python floats, row by row (a
#: cost per entry); larger blocks step along the rows with tensor operations over all
#: rows at once (a larger cost per position, paid once whatever the rows). The two
#: costs, in docs/benchmarks.md, cross near this many rows.
CONDAT_SCALAR_ROWS = 128


def _condat_filter_scalar(y: list[float], total: float) -> float:
    """Steps 1-2 of Condat's algorithm (Math. Programming 158, 2016, Fig. 2) on one row.

    One pass keeps a running threshold ``rho`` of the candidates ``v``: an entry above
    ``rho`` joins ``v`` (and raises ``rho``), or, when it alone would lift the threshold
    past every candidate, starts a new ``v`` (the old one is set aside in ``vt``); then
    the set-aside entries above ``rho`` are taken back. The result is a lower bound of the
    threshold, and every entry of the support is above it.
    """
    it = iter(v for v in y if v > -math.inf)
    first = next(it, None)
    if first is None:
        return 0.0
    v, vt = [first], []
    rho = first - total
    for yn in it:
        if yn > rho:
            rho += (yn - rho) / (len(v) + 1)
            if rho > yn - total:
                v.append(yn)
            else:
                vt.extend(v)
                v = [yn]
                rho = yn - total
    for yn in vt:
        if yn > rho:
            v.append(yn)
            rho += (yn - rho) / len(v)
    return rho


def _condat_filter_batched(zs: Tensor, total: float) -> Tensor:
    """Step 1 of Condat's algorithm for every row at once, one position at a time.

    The candidates set aside at a restart (Condat's ``vt``) need no bookkeeping here: the
    Michelot steps that follow start from the lower bound ``rho`` and consider every entry
    above it, which includes them.
    """
    rows, k = zs.shape
    rho = torch.full((rows,), -math.inf, dtype=zs.dtype, device=zs.device)
    count = torch.zeros(rows, dtype=zs.dtype, device=zs.device)
    for n in range(k):
        yn = zs[:, n]
        above = yn > rho
        started = count > 0
        lifted = rho + (yn - rho) / (count + 1)
        join = above & started & (lifted > yn - total)
        restart = above & ~join  # also the first finite entry of a row
        rho = torch.where(join, lifted, torch.where(restart, yn - total, rho))
        count = torch.where(join, count + 1, torch.where(restart, 1.0, count))
    return rho.unsqueeze(-1)


def _condat_rows(z: Tensor, total: float) -> Tensor:
    """Project each row of a 2-D block ``z``: Condat's filter, then exact Michelot steps."""
    z = clamp_inf(z)
    shift, present = _shift_by_max(z)
    zs = z - shift
    if zs.shape[0] <= CONDAT_SCALAR_ROWS:
        rho = torch.tensor(
            [[_condat_filter_scalar(row, total)] for row in zs.tolist()],
            dtype=zs.dtype,
            device=zs.device,
        )
    else:
        rho = _condat_filter_batched(zs, total)
    # rho <= tau* in exact arithmetic; a rounding ulp above it would only cost one step
    rho = torch.minimum(rho, torch.full_like(rho, -total / zs.shape[-1]))
    return _michelot(z, zs, shift, present, rho, total, torch.empty_like(zs))


# The projections' backward is sparsemax's.
_SORT = register_map("project_sort", sparsemax_sort, sparsemax_vjp, eager_vjp=sparsemax_eager_vjp)
_CONDAT = register_map("project_condat", _condat_fwd, sparsemax_vjp, eager_vjp=sparsemax_eager_vjp)
_BISECT = register_map("project_bisect", _bisect_fwd, sparsemax_vjp, eager_vjp=sparsemax_eager_vjp)


def project_simplex(
    x: Tensor,
    dim: int = -1,
    *,
    total: float = 1.0,
    lower: float | Tensor | None = None,
    upper: float | Tensor | None = None,
    method: str = "auto",
) -> Tensor:
    r"""Euclidean projection of ``x`` onto :math:`\{p \ge 0, \sum p = t\}` along ``dim``.

    With ``lower`` and/or ``upper``, the projection onto the capped simplex
    :math:`\{l \le p \le u, \sum p = t\}`: :math:`p = \mathrm{clip}(x - \tau, l, u)`,
    exact to float64 rounding (a bracketing search on :math:`\tau`, then the threshold
    taken from the partition into lower / free / upper entries). Its backward is the
    sparsemax Jacobian on the free entries and zero on the clamped ones, O(K). Bounds
    are floats or tensors that broadcast to ``x`` (gradients flow to tensor bounds);
    an infeasible set (sum of ``lower`` > ``total`` or sum of ``upper`` < ``total``) is
    a :class:`~convexmix.ConvexMixError`. ``method`` is not used with bounds.

    :math:`p = [x - \tau]_+`, the closest point of the simplex; exact zeros, ties and
    ``-inf`` entries (which get 0) are handled, and a slice of only ``-inf`` gives zeros.
    Differentiable with the sparsemax Jacobian (O(K) backward, no Jacobian matrix).

    Args:
        x: any shape; ``dim`` indexes the K entries.
        dim: the dimension that sums to ``total``.
        total: the sum, > 0.
        lower: ``None`` (0), a float or a tensor broadcastable to ``x``.
        upper: ``None`` (no cap), a float or a tensor broadcastable to ``x``.
        method: ``"sort"`` (O(K log K)), ``"bisect"`` (O(K) per step, no sort: a few
            halvings of a bracket, then exact Michelot steps), ``"condat"`` (Condat's
            filter pass, O(K) expected, then exact Michelot steps; sequential along a
            row: on Python floats for up to 128 rows, else one tensor step per position
            for all rows at once) or ``"auto"``: on CPU, contiguous float32/float64
            inputs run the native row kernel of :func:`sparsemax` (O(K) expected: the
            entries within ``total`` of the maximum, then Michelot's steps among them);
            otherwise bisect on GPU, and on CPU for rows of 512+ entries in inputs of
            65536+; sort otherwise. All agree to an ulp or two (each takes the threshold
            in float64 from the support, summed in its own order).

    Returns:
        Tensor of the shape and dtype of ``x``.

    Example:
        >>> import torch, convexmix as cx
        >>> cx.functional.project_simplex(torch.tensor([0.5, 1.2, -0.3]))
        tensor([0.1500, 0.8500, 0.0000])
        >>> x = torch.tensor([[3.0], [0.0]])
        >>> cx.functional.project_simplex(x, dim=0, total=2.0, method="bisect")
        tensor([[2.],
                [0.]])
        >>> cx.functional.project_simplex(torch.tensor([2.0, 1.0, 0.0]), upper=0.5)
        tensor([0.5000, 0.5000, 0.0000])
    """
    check_choice(method, PROJECTION_METHODS, "method")
    z, d, total = prepare(x, dim, None, total)
    if lower is not None or upper is not None:
        out = capped_projection(z, d, total, lower, upper)
        return out if out.dtype == x.dtype else out.to(x.dtype)
    if method == "auto":
        if native.rows_apply(z):
            out = SPARSEMAX(z, d, total)
            return out if out.dtype == x.dtype else out.to(x.dtype)
        big = z.shape[d] >= AUTO_BISECT_K and z.numel() >= AUTO_BISECT_NUMEL
        method = "bisect" if big or z.device.type != "cpu" else "sort"
    if method == "sort":
        out = _SORT(z, d, total)
    elif method == "condat":
        out = _CONDAT(z, d, total)
    else:
        out = _BISECT(z, d, total, BISECT_STEPS)
    return out if out.dtype == x.dtype else out.to(x.dtype)
