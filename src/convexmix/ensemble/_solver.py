"""The exact solver: Newton steps whose quadratic models are solved on the simplex (private).

Each Newton step minimises the objective's quadratic model over the simplex with a
finite active-set method (primal-dual first, primal as the fallback), then backtracks on
the exact objective. It stops when the Frank-Wolfe gap ``w.g - min_k g_k``, an upper
bound on the distance to the optimal value, is below ``tol``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from convexmix.ensemble._objectives import (
    DataObjective,
    Objective,
    Regularized,
    Wrapping,
    within,
)
from convexmix.errors import ConvexMixError

__all__ = [
    "PRUNE_BELOW",
    "check_start",
    "cv_lambda",
    "fw_gap",
    "ridge",
    "simplex_qp",
    "solve",
    "solve_kkt",
]


def _initial_support(A: Tensor, c: Tensor, v: Tensor) -> Tensor:
    """A first support guess: the coordinates that a diagonal Newton step from ``v``
    keeps positive, ``v_i - (g_i - mu) / A_ii > 0`` with g the gradient at v and mu its
    v-weighted mean. From equal weights it frees the low gradients; from a warm start
    (g close to mu on the support) it keeps the support. Never empty in exact
    arithmetic: the smallest gradient is at most mu."""
    g = torch.addmv(c, A, v)
    return (g - float(v @ g)) <= A.diagonal() * v


def _bordered(A: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The KKT matrix [[A, 1], [1', 0]] and right-hand side [-c, 1] of the simplex's
    equality-constrained problems, from which :func:`_eqp` takes rows and columns."""
    K = c.numel()
    kkt = torch.ones(K + 1, K + 1, dtype=A.dtype)
    kkt[:K, :K] = A
    kkt[K, K] = 0
    return kkt, torch.cat([-c, torch.ones(1, dtype=c.dtype)])


def solve_kkt(kkt: Tensor, rhs: Tensor) -> Tensor:
    """``kkt^-1 rhs``, or the least-squares solution where ``kkt`` is singular to working
    precision: models that give the true class probability 0 (floored at 1e-15) have
    Hessian entries near 1e-29 beside ones near 1, which the ridge cannot lift, and two
    such duplicates leave the factorisation an exact zero pivot."""
    try:
        sol: Tensor = torch.linalg.solve(kkt, rhs)
    except torch.linalg.LinAlgError:  # type: ignore[attr-defined]
        sol = torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return sol


def _eqp(kkt: Tensor, rhs: Tensor, F: Tensor) -> tuple[Tensor, float]:
    """Minimiser x of 1/2 x'A_FF x + c_F'x with sum(x) = 1, and its multiplier mu, from
    :func:`_bordered`'s (kkt, rhs). index_select, not advanced indexing: these problems
    are small, and indexing's fixed cost was most of their time."""
    n = F.numel()
    rows = torch.cat([F, F.new_full((1,), rhs.numel() - 1)])
    sol = solve_kkt(kkt.index_select(0, rows).index_select(1, rows), rhs.index_select(0, rows))
    return sol[:n], -float(sol[n])


def _pdas(A: Tensor, c: Tensor, free: Tensor, kkt: Tensor, rhs: Tensor) -> Tensor | None:
    """Primal-dual active-set iterations (Hintermueller, Ito & Kunisch 2002).

    Each iteration re-guesses the whole support from the signs of the solution and of
    the multipliers, so a support of 5 out of 50 takes a few solves instead of 45. It
    stops only at a point that satisfies the KKT conditions (the exact minimiser), and
    returns None when it does not settle (it can cycle), for the primal method to take over.
    """
    K = c.numel()
    A_abs, c_abs = A.abs(), c.abs()
    for _ in range(25):
        F = free.nonzero().view(-1)
        if F.numel() == 0:
            return None
        x, mu = _eqp(kkt, rhs, F)
        full = torch.zeros(K, dtype=A.dtype).index_copy_(0, F, x)
        lam = torch.addmv(c, A.index_select(1, F), x).sub_(mu)
        # the rounding error of each multiplier: ~1e-13 of the terms it sums
        err = torch.addmv(c_abs, A_abs.index_select(1, F), x.abs()).add_(abs(mu)).mul_(1e-13)
        slack = lam.add_(err)
        new_free = (free & (full > 0)) | (~free & (slack < 0))
        if bool((x >= 0).all()) and bool(((slack >= 0) | free).all()):
            return full
        if bool((new_free == free).all()):
            return None
        free = new_free
    return None


def ridge(H: Tensor) -> Tensor:
    """``H`` with a relative ridge of 1e-12 on each diagonal entry: identical models make
    a Hessian singular, and the ridge makes ties between them harmless.

    The Newton steps take the ridged matrix as their model's Hessian *and* in its linear
    term (``c = g - H w``): then the true gradient alone decides where they stop, and the
    ridge only slows the last steps by a factor of about 1e-12 times the Hessian's
    spread. Added inside the QP instead, the ridge moves the optimum itself: by 1e-8 in
    the gap when one model sits 1e5 off the targets (a diagonal entry of 1e10 beside
    ones of 0.1), a fit that then stops short of ``tol``.
    """
    return H + torch.diag(1e-12 * H.diagonal().abs() + 1e-300)


def simplex_qp(A: Tensor, c: Tensor, v: Tensor) -> Tensor:
    """argmin 1/2 v'Av + c'v over the unit simplex, from a feasible ``v``.

    First a few primal-dual active-set iterations; if they do not settle, a primal
    active-set method: each iteration solves the equality-constrained problem on the free
    coordinates, then either steps to it (and frees the coordinate with the most negative
    multiplier) or stops at the first coordinate that would go negative. It ends in
    finitely many steps at the exact minimiser (A positive definite: pass a Hessian
    through :func:`ridge`).
    """
    K = c.numel()
    v = v.clone()
    kkt, rhs = _bordered(A, c)
    guess = _pdas(A, c, _initial_support(A, c, v), kkt, rhs)
    if guess is not None:
        return guess
    free = v > 0
    for _ in range(20 * K + 20):
        F = free.nonzero().squeeze(1)
        n = F.numel()
        x, mu = _eqp(kkt, rhs, F)
        if bool((x >= 0).all()):
            v.zero_()
            v[F] = x
            if n == K:
                return v
            rest = (~free).nonzero().squeeze(1)
            arf = A[rest][:, F]
            lam = arf @ x + c[rest] - mu
            # the rounding error of each multiplier: ~1e-13 of the terms it sums
            err = 1e-13 * (arf.abs() @ x + c[rest].abs() + abs(mu))
            j = int((lam + err).argmin())
            if float(lam[j] + err[j]) >= 0:
                return v
            free[rest[j]] = True
        else:
            vf = v[F]
            neg = (x < 0).nonzero().squeeze(1)
            ratios = vf[neg] / (vf[neg] - x[neg])
            i = int(ratios.argmin())
            t = float(ratios[i])
            v[F] = vf + t * (x - vf)
            v[F[neg[i]]] = 0.0
            v.clamp_(min=0.0)
            free = v > 0
            free[F[neg[i]]] = False
    return v  # pragma: no cover - the active-set method ends long before this


#: Newton steps at a Frank-Wolfe gap above this (relative to the loss) may use an
#: approximate Hessian (see ``LogLoss.hessian``); below it, the exact one.
APPROX_GAP = 1e-6


def fw_gap(w: Tensor, g: Tensor) -> float:
    """The Frank-Wolfe gap on the simplex, ``w @ (g - min g)``: the form whose terms are
    all >= 0, so that ``sum(w) = 1 + 1e-16`` does not add the gradient's level times
    its rounding (as ``w @ g - min g`` does)."""
    return max(float(w @ (g - g.min())), 0.0)


def check_start(f: float, g: Tensor) -> None:
    """A :class:`ConvexMixError` unless the loss ``f`` and its gradient ``g`` at a solver's
    starting weights are finite (every Newton method starts with this check)."""
    if not (math.isfinite(f) and bool(torch.isfinite(g).all())):
        raise ConvexMixError(
            f"the loss is not finite at the starting weights (loss {f}, gradient "
            f"{'finite' if bool(torch.isfinite(g).all()) else 'not finite'}): check the "
            "predictions and targets for inf or NaN, values too large for the loss (mse "
            "squares them: beyond about 1e150 they overflow float64; rescale them), and that "
            "a callable loss returns finite values."
        )


def line_search(
    obj: Objective,
    w: Tensor,
    f: float,
    target: Tensor,
    slope: float,
    gap: float,
    gap_of: Callable[[Tensor, Tensor], float],
) -> tuple[Tensor, float, Callable[[], Tensor]] | None:
    """Backtracking from ``w`` towards the Newton target: the first step ``t = 1, 1/2,
    ...`` with sufficient decrease (Armijo, ``slope`` the directional derivative), as
    ``(weights, loss, gradient thunk)``; None when none is found down to ``t = 1e-10``.
    ``gap_of(w, g)`` is the feasible set's optimality gap.

    A ``slope`` that is not negative is rounding (the model is flat: a loss near 0 on a
    face of optima, where ``g`` carries 1e-3 of relative rounding): then only the full
    step is tried, and taken if it lowers the gap without raising the loss beyond its
    rounding (the gap bounds the distance to the optimum; the loss may be noise there)."""
    if not slope < 0:
        f_new, grad_new = obj.value(target)
        if f_new <= f + 1e-13 * max(1.0, abs(f)) and gap_of(target, grad_new()) < gap:
            return target, f_new, grad_new
        return None
    d = target - w
    t = 1.0
    while t > 1e-10:
        cand = target if t == 1.0 else w + t * d
        f_new, grad_new = obj.value(cand)
        if math.isnan(f_new):
            raise ConvexMixError(
                f"the loss is NaN at weights {[round(float(v), 6) for v in cand]} (on the "
                "simplex): a callable loss must return a finite number for every blend."
            )
        if f_new <= f + 1e-4 * t * slope:
            return cand, f_new, grad_new
        # Near the optimum the decrease is below the rounding of f (a sum of N terms);
        # the gradient still resolves it: keep a full step that shrinks the gap.
        rounding = t == 1.0 and f_new <= f + 1e-13 * max(1.0, abs(f))
        if rounding and gap_of(cand, grad_new()) < gap:
            return cand, f_new, grad_new
        t *= 0.5
    return None


def _newton(
    obj: Objective,
    tol: float,
    max_iter: int,
    callback: Callable[[int, float, float], None] | None,
    w0: Tensor | None = None,
) -> tuple[Tensor, list[float], int, float, bool]:
    K = obj.K
    w = torch.full((K,), 1.0 / K, dtype=torch.float64) if w0 is None else w0
    f, grad = obj.value(w)
    g = grad()
    check_start(f, g)
    history = [f]
    gap = fw_gap(w, g)
    it = 0
    while it < max_iter and not within(obj, gap, tol, w, g):
        it += 1
        mu = float(w @ g)
        idx = ((w > 0) | (g < mu)).nonzero().squeeze(1)
        # Far from the optimum (the support still changing) a Hessian estimated from a
        # subsample of the rows steers as well; the last steps use the exact one.
        H = ridge(obj.hessian(w, idx, approx=gap > APPROX_GAP * max(1.0, abs(f))))
        w_idx = w.index_select(0, idx)
        v = simplex_qp(H, torch.addmv(g.index_select(0, idx), H, w_idx, alpha=-1), w_idx)
        target = torch.zeros_like(w).index_copy_(0, idx, v)
        d = target - w
        slope = float((g - mu) @ d)  # sum(d) = 0 up to rounding, which (g @ d) would amplify
        step = line_search(obj, w, f, target, slope, gap, fw_gap)
        if step is None:
            break
        w, f, grad = step
        g = grad()
        history.append(f)
        gap = fw_gap(w, g)
        if callback is not None:
            callback(it, f, gap)
    w = w.clamp_min(0)
    return w / w.sum(), history, it, gap, within(obj, gap, tol, w, g)


def stopping_gap(tol: float, scale: float, lam: float) -> float:
    """The gap at which a fit stops: ``tol`` relative to the objective's scale, the data
    loss's (``scale``: the best single model's loss, so no unit of the targets matters)
    or the pull's (``lam``) where that is larger. A pull that outweighs the loss (targets
    of 1e-6 with ``lam = 0.3``) sets the rounding of the gradient, and a gap relative to
    the loss alone would ask for digits that float64 does not have."""
    return tol * max(scale, lam)


#: The cross-validation fits only score the lambdas: they stop at this gap (or ``tol``
#: if larger). A gap of 1e-7 moves a held-out score by about as much, far below the
#: differences between the grid's lambdas; the final fit uses ``tol``.
CV_TOL = 1e-7

#: After convergence, weights below this are tried at exactly 0 (see :func:`solve`).
PRUNE_BELOW = 1e-9


def solve(
    obj: Objective,
    tol: float,
    max_iter: int,
    callback: Callable[[int, float, float], None] | None = None,
    w0: Tensor | None = None,
) -> tuple[Tensor, list[float], int, float, bool]:
    """Newton from equal weights (or ``w0``), then again with the tiny weights set to 0.

    When the optimum is degenerate (a zero loss, or models whose gradient ties with the
    support's), the multipliers of the unused models are at rounding level and the
    solution can keep them at 1e-13 instead of 0. Those weights are dropped and the fit
    resumed; the pruned point is kept when its objective is no worse than rounding.
    """
    w, history, n_iter, gap, converged = _newton(obj, tol, max_iter, callback, w0)
    tiny = (w > 0) & (w < PRUNE_BELOW)
    if not bool(tiny.any()):
        return w, history, n_iter, gap, converged
    pruned = torch.where(tiny, 0.0, w)
    pruned /= pruned.sum()
    w2, history2, n2, gap2, conv2 = _newton(obj, tol, max_iter, None, w0=pruned)
    f, f2 = history[-1], history2[-1]
    if f2 <= f + 1e-12 * max(1.0, abs(f)) and not bool(((w2 > 0) & (w2 < PRUNE_BELOW)).any()):
        return w2, history + history2[1:], n_iter + n2, gap2, conv2
    return w, history, n_iter, gap, converged


#: The fit on the row sample (:func:`sample_start`) stops at this Frank-Wolfe gap: the
#: sample's optimum differs from the full one by far more (at 6k rows, a gap of ~1e-2 on
#: all rows), so a finer fit would not bring the start closer.
SAMPLE_TOL = 1e-6


def sample_start(obj: DataObjective, lam: float, max_iter: int) -> Tensor | None:
    """A start for the fit on all rows: the optimum on a fixed sample of them
    (``obj.sample()``), or None where the objective has no sample.

    Its Newton steps cost a fraction of those on all rows, and from its optimum, near the
    full one and usually on its support, the fit on all rows takes fewer steps than from
    equal weights (3 instead of 5 at K=50, N=100k). The sample is fixed (no random draw)
    and its fit starts from equal weights: the same inputs give the same start. The fit
    on all rows decides convergence, so the answer is the optimum to the same ``tol``
    from any start (where identical models make the optimum a set, any start may split
    their weight differently among them, as before).
    """
    sub = obj.sample()
    if sub is None:
        return None
    inner = Regularized(sub, lam) if lam > 0 else sub
    return _newton(inner, SAMPLE_TOL, max_iter, None)[0]


class _Lagged(Wrapping):
    """A cross-validation fold's training loss whose last Hessian can stand in once.

    Along the lambda path each fit starts at the previous fit's optimum, where the last
    Hessian was computed one Newton step before: close enough for the first step of the
    next fit (the Frank-Wolfe gap still decides convergence, from exact gradients).
    """

    def __init__(self, base: Objective) -> None:
        self.base, self.K = base, base.K
        self.last: tuple[Tensor, Tensor] | None = None
        self.reuse = False

    def value(self, w: Tensor) -> tuple[float, Callable[[], Tensor]]:
        return self.base.value(w)

    def hessian(self, w: Tensor, idx: Tensor, approx: bool = False) -> Tensor:
        reuse, self.reuse = self.reuse, False
        if reuse and self.last is not None:
            old_idx, old_h = self.last
            pos = torch.full((self.K,), -1, dtype=torch.long)
            pos.index_copy_(0, old_idx, torch.arange(old_idx.numel()))
            at = pos.index_select(0, idx)
            if bool((at >= 0).all()):
                return old_h.index_select(0, at).index_select(1, at)
        h = self.base.hessian(w, idx, approx)
        self.last = (idx, h)
        return h


def cv_lambda(
    obj: DataObjective, folds: int, tol: float, max_iter: int, seed: int
) -> tuple[float, Tensor]:
    """The regularisation strength with the lowest cross-validated loss, and the mean of
    the folds' optima at it (the final fit's start: close to the optimum on all rows).

    The first fold's fits go along the grid from the strongest pull (whose optimum is
    near equal weights, the cold start) to none, each warm-started from the previous
    optimum, a secant step along the path in log(lambda). The other folds share 3/5 of
    their training rows with the fold before: each of their fits starts from that
    fold's optimum at the same lambda, with its last Hessian for the first Newton step.
    The scoring fits stop at :data:`CV_TOL` (or ``tol``, relative as in
    :func:`stopping_gap`, if larger).
    """
    n = obj.n_samples
    if n < 2 * folds:
        raise ConvexMixError(
            f"regularization='cv' needs at least {2 * folds} samples for {folds} folds; got {n}."
        )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    # The rows in shuffled order, gathered once: each fold is then a contiguous range,
    # and both subsets of a fold read their rows forward.
    shuffled = obj.subset(order)
    bounds = [0]
    for part in order.chunk(folds):
        bounds.append(bounds[-1] + part.numel())
    grid = [0.0, *(float(x) for x in torch.logspace(-4, 1, 11, dtype=torch.float64))]
    scores = torch.zeros(len(grid), dtype=torch.float64)
    optima = torch.zeros(len(grid), obj.K, dtype=torch.float64)
    before: list[tuple[Tensor, tuple[Tensor, Tensor] | None]] = []
    for i in range(folds):
        a, b = bounds[i], bounds[i + 1]
        held = torch.arange(a, b)
        kept = torch.cat([torch.arange(0, a), torch.arange(b, n)])
        train, test = _Lagged(shuffled.subset(kept)), shuffled.subset(held)
        w: Tensor | None = None
        prev: Tensor | None = None
        here: list[tuple[Tensor, tuple[Tensor, Tensor] | None]] = []
        for j in reversed(range(len(grid))):
            lam = grid[j]
            inner = Regularized(train, lam) if lam > 0 else train
            start: Tensor | None
            if before:
                start, train.last = before[len(here)]
                train.reuse = train.last is not None
                if w is not None:
                    # This fold's shift from the previous fold at the last lambda.
                    start = (start + (w - before[len(here) - 1][0])).clamp_min_(0)
                    start /= start.sum()
            else:
                start = w
                if w is not None and prev is not None and lam > 0:
                    # The grid is even in log(lam): a secant step along the path from
                    # the last two optima, kept on the simplex.
                    start = (2 * w - prev).clamp_min_(0)
                    start /= start.sum()
                train.reuse = w is not None
            prev = w
            stop = stopping_gap(max(tol, CV_TOL), obj.scale, lam)
            w = solve(inner, stop, max_iter, None, start)[0]
            here.append((w, train.last))
            scores[j] += test.value(w)[0] * held.numel() / n
            optima[j] += w
        before = here
    best = int(scores.argmin())
    return grid[best], optima[best] / optima[best].sum()
