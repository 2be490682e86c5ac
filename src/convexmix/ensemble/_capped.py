"""Blend weights under a cap and a model budget (private; used by ``fit_weights``).

* ``max_weight``: the box-constrained problem ``min f(w)`` over
  ``{0 <= w <= u, sum w = 1}``, solved by the same damped Newton method as the plain fit,
  whose steps solve the quadratic model exactly on the capped simplex with a primal
  active-set method that handles both bounds (:func:`box_simplex_qp`). The Frank-Wolfe
  gap over the capped simplex (its linear minimiser fills the lowest gradients up to the
  cap) bounds the distance to the optimum.
* ``max_models``: the best blend with at most k non-zero weights. For K up to
  ``EXACT_MAX_MODELS`` it is exact, by branch and bound on the support: a node fixes some
  models out (their cap is 0) and some in; its convex fit (minus its gap) is a lower
  bound for every support below it, so a node whose bound is not below the best blend
  found is cut; a fit with at most k non-zeros is a feasible leaf. Above that K (or past
  ``MAX_NODES`` nodes) a heuristic: from the best model alone (when the cap lets one model
  carry the total), forward selection by the gradient (the model with the most negative
  gradient at the current fit joins), then swaps (each chosen model against the outside
  models with the lowest gradients) while they lower the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from convexmix.ensemble._objectives import Objective, Regularized, within
from convexmix.ensemble._solver import check_start, line_search, ridge, solve_kkt

__all__: list[str] = []

#: Branch and bound on the support for K up to this many models; a heuristic above.
EXACT_MAX_MODELS = 24
#: Branch and bound gives up (keeping the best blend found, which the heuristic seeded)
#: after this many convex fits.
MAX_NODES = 4000
#: Outside models tried against each chosen one in a swap pass of the heuristic.
SWAP_CANDIDATES = 8


def box_simplex_qp(A: Tensor, c: Tensor, v: Tensor, u: Tensor) -> tuple[Tensor, float | None]:
    """argmin 1/2 x'Ax + c'x over ``{0 <= x <= u, sum x = 1}``, from a feasible ``v``, and
    the multiplier of the sum at it (the level of ``A x + c`` on the free coordinates;
    None when every coordinate is at a bound).

    A primal active-set method: each iteration solves the equality-constrained problem on
    the free coordinates (the others fixed at 0 or at their cap); it steps to that point
    when it is feasible, then frees the fixed coordinate whose multiplier has the wrong
    sign, or stops at the first bound in the way and fixes that coordinate. Finite; exact.
    """
    k = c.numel()
    v = v.clone().clamp_(min=torch.zeros_like(u), max=u)
    tol = 1e-14
    at_lo = v <= tol * u.clamp_min(1.0)
    at_up = (v >= u - tol * u.clamp_min(1.0)) & ~at_lo
    v = torch.where(at_lo, 0.0, torch.where(at_up, u, v))
    mu = math.nan  # the multiplier of the last solve on the free coordinates
    for _ in range(50 * k + 50):
        free = ~(at_lo | at_up)
        F = free.nonzero().squeeze(1)
        n = F.numel()
        rest = 1.0 - float(u[at_up].sum())
        if n > 0:
            kkt = torch.zeros(n + 1, n + 1, dtype=A.dtype)
            kkt[:n, :n] = A[F][:, F]
            kkt[:n, n] = 1
            kkt[n, :n] = 1
            fixed = torch.where(at_up, u, 0.0)
            rhs = torch.cat([-(c[F] + A[F] @ fixed), torch.tensor([rest], dtype=A.dtype)])
            sol = solve_kkt(kkt, rhs)
            x, mu = sol[:n], -float(sol[n])
            uf = u[F]
            if bool((x >= -1e-15).all()) and bool((x <= uf + 1e-15).all()):
                v[F] = x.clamp(min=torch.zeros_like(uf), max=uf)
            else:  # step towards x until the first bound, which becomes fixed
                vf = v[F]
                d = x - vf
                t_lo = torch.where(d < 0, vf / (-d).clamp_min(1e-300), math.inf)
                t_up = torch.where(d > 0, (uf - vf) / d.clamp_min(1e-300), math.inf)
                t = torch.minimum(t_lo, t_up)
                i = int(t.argmin())
                step = min(max(float(t[i]), 0.0), 1.0)
                v[F] = (vf + step * d).clamp(min=torch.zeros_like(uf), max=uf)
                if float(t_lo[i]) <= float(t_up[i]):
                    v[F[i]] = 0.0
                    at_lo[F[i]] = True
                else:
                    v[F[i]] = u[F[i]]
                    at_up[F[i]] = True
                continue
        g = A @ v + c
        if n == 0:
            # no free coordinate: optimal iff the capped gradients are <= the zero ones
            gu = g[at_up].max() if bool(at_up.any()) else None
            gl = g[at_lo & (u > 0)].min() if bool((at_lo & (u > 0)).any()) else None
            if gu is None or gl is None or float(gu) <= float(gl) + 1e-13 * (1 + abs(float(gl))):
                return v, None
            j = int(torch.where(at_up, g, -math.inf).argmax())
            at_up[j] = False
            continue
        err = 1e-13 * (A.abs() @ v.abs() + c.abs() + abs(mu))
        lam = g - mu
        bad_lo = at_lo & (u > 0) & (lam + err < 0)
        bad_up = at_up & (lam - err > 0)
        score = torch.where(bad_lo, -lam, torch.where(bad_up, lam, -math.inf))
        j = int(score.argmax())
        if not bool(score[j] > -math.inf):
            return v, mu
        at_lo[j] = False
        at_up[j] = False
    return v, mu  # pragma: no cover - the active-set method ends long before this


def capped_lmo(g: Tensor, u: Tensor) -> Tensor:
    """argmin g's over ``{0 <= s <= u, sum s = 1}``: the lowest gradients filled to their cap."""
    order = torch.argsort(g)
    us = u[order]
    before = us.cumsum(0) - us
    fill = (1.0 - before).clamp(min=0.0).minimum(us)
    s = torch.zeros_like(g)
    s[order] = fill
    return s


def capped_gap(w: Tensor, g: Tensor, u: Tensor) -> float:
    """The Frank-Wolfe gap over the capped simplex: >= f(w) - min f.

    It is taken as ``(w - s) @ (g - c)``, ``s`` the vertex :func:`capped_lmo` picks and
    ``c`` the gradient of the last model it fills (the free weight's level at an
    optimum): the same number while both sum to 1, but ``w`` and ``s`` sum to 1 only up
    to rounding, which ``w @ g - s @ g`` multiplies by the gradient's level (1e-16 of
    difference at a level of 2e5 read as a gap of 2e-11 on an exact optimum)."""
    s = capped_lmo(g, u)
    filled = s > 0
    level = g[filled].max() if bool(filled.any()) else g.min()
    return max(float((w - s) @ (g - level)), 0.0)


def feasible_start(u: Tensor) -> Tensor:
    """Equal weights over the allowed models, projected onto the capped simplex."""
    from convexmix.functional import project_simplex

    allowed = u > 0
    w = torch.where(allowed, 1.0 / max(int(allowed.sum()), 1), 0.0).to(torch.float64)
    big = torch.where(allowed, w, -math.inf)
    return project_simplex(big, upper=u).clamp_min(0.0)


def newton_capped(
    obj: Objective,
    u: Tensor,
    tol: float,
    max_iter: int,
    callback: Callable[[int, float, float], None] | None = None,
) -> tuple[Tensor, list[float], int, float, bool]:
    """Damped Newton on ``{0 <= w <= u, sum w = 1}``: (w, history, iterations, gap, converged)."""
    w = feasible_start(u)
    idx = (u > 0).nonzero().squeeze(1)
    f, grad = obj.value(w)
    g = grad()
    check_start(f, g)
    history = [f]
    gap = capped_gap(w, g, u)
    allowed = u > 0
    it = 0
    while it < max_iter and not within(obj, gap, tol, w, g, allowed):
        it += 1
        H = ridge(obj.hessian(w, idx))
        v, level = box_simplex_qp(H, g[idx] - H @ w[idx], w[idx], u[idx])
        target = torch.zeros_like(w)
        target[idx] = v
        d = target - w
        # The shift that takes the slope's rounding out (sum(d) = 0 only up to rounding,
        # which g @ d would amplify): the QP's multiplier, the model gradient's level on
        # the free weights, where (g - level) @ d is -d'Hd. w @ g also counts the capped
        # weights, whose g sits below that level, and left a slope of +1e-19 where the
        # true one was -1e-20: the fit stopped at a gap of 1.5e-10.
        mu = float(w @ g) if level is None else level
        slope = float((g - mu) @ d)
        step = line_search(obj, w, f, target, slope, gap, lambda w, g: capped_gap(w, g, u))
        if step is None:
            break
        w, f, grad = step
        g = grad()
        history.append(f)
        gap = capped_gap(w, g, u)
        if callback is not None:
            callback(it, f, gap)
    w = torch.minimum(w.clamp_min(0.0), u)
    return w, history, it, gap, within(obj, gap, tol, w, g, allowed)


Fit = tuple[Tensor, list[float], int, float, bool]


class Search:
    """Fits on restricted supports, cached by the set of allowed models."""

    def __init__(self, obj: Objective, cap: float, tol: float, max_iter: int) -> None:
        self.obj, self.cap, self.tol, self.max_iter = obj, cap, tol, max_iter
        self.K = obj.K
        self.cache: dict[frozenset[int], Fit] = {}
        self.fits = 0
        # The loss from the data, for objectives whose Newton value can round (mse's
        # w'Mw beside a model far off the targets): see value().
        base, self._lam = (obj.base, obj.lam) if isinstance(obj, Regularized) else (obj, 0.0)
        self._loss = getattr(base, "loss", None)
        self._bound = getattr(base, "rounding_bound", None)

    def feasible(self, allowed: frozenset[int]) -> bool:
        return len(allowed) * self.cap >= 1.0 - 1e-12

    def fit(self, allowed: frozenset[int]) -> Fit:
        if allowed not in self.cache:
            u = torch.zeros(self.K, dtype=torch.float64)
            u[list(allowed)] = self.cap
            self.cache[allowed] = newton_capped(self.obj, u, self.tol, self.max_iter)
            self.fits += 1
        return self.cache[allowed]

    def value(self, allowed: frozenset[int]) -> float:
        """The objective of the allowed set's fit. mse's ``w'Mw`` rounds to about
        ``K eps max|M|``: with a model 1e12 off the targets that is far above the
        differences between supports (a fit with a tiny weight on that model read
        9e-18 where its loss was 0.02, and won the branch and bound), so where that
        rounding is not negligible the loss is taken from the data."""
        w, hist = self.fit(allowed)[:2]
        f = hist[-1]
        if self._loss is not None and self._bound is not None and self._bound() > 1e-12 * abs(f):
            d = w - 1.0 / self.K
            f = float(self._loss(w)) + self._lam * float(d @ d)
        return f


def _support(w: Tensor) -> frozenset[int]:
    return frozenset(int(i) for i in (w > 0).nonzero().squeeze(1))


def heuristic_support(search: Search, k: int) -> frozenset[int]:
    """Forward selection by the gradient, then swaps while they lower the loss."""
    everyone = frozenset(range(search.K))
    w0 = feasible_start(torch.full((search.K,), search.cap, dtype=torch.float64))
    g = search.obj.value(w0)[1]()
    # seed: the fewest models that can carry the total under the cap: the best model alone
    # when one can (K fits at a vertex, each one loss evaluation: the result is then never
    # worse than the best single model), else the best-gradient ones
    need = max(1, math.ceil(1.0 / search.cap - 1e-9))
    if need == 1:
        chosen = min((frozenset({j}) for j in range(search.K)), key=search.value)
    else:
        chosen = frozenset(int(i) for i in torch.argsort(g)[:need])
    while len(chosen) < k:
        w, _hist = search.fit(chosen)[:2]
        g = search.obj.value(w)[1]()
        outside = [j for j in torch.argsort(g).tolist() if j not in chosen]
        if not outside:
            break
        chosen = chosen | {outside[0]}
    best = chosen
    best_f = search.value(best)
    improved = True
    while improved:
        improved = False
        w = search.fit(best)[0]
        g = search.obj.value(w)[1]()
        outside = [j for j in torch.argsort(g).tolist() if j not in best][:SWAP_CANDIDATES]
        for i in sorted(best):
            for j in outside:
                trial = (best - {i}) | {j}
                if not search.feasible(trial):
                    continue
                f = search.value(trial)
                if f < best_f - 1e-12 * max(1.0, abs(best_f)):
                    best, best_f, improved = trial, f, True
                    break
            if improved:
                break
    del everyone
    return best


def best_support(search: Search, k: int, exact: bool) -> tuple[frozenset[int], bool]:
    """The allowed set whose fit is the best blend with at most k models, and whether
    that is proven optimal (branch and bound finished)."""
    incumbent = heuristic_support(search, k)
    best_f = search.value(incumbent)
    if not exact:
        return incumbent, False
    everyone = frozenset(range(search.K))
    stack: list[tuple[frozenset[int], frozenset[int]]] = [(frozenset(), frozenset())]
    while stack:
        if search.fits > MAX_NODES:
            return incumbent, False
        inc, exc = stack.pop()
        allowed = inc if len(inc) >= k else everyone - exc
        if not search.feasible(allowed):
            continue
        w, _, _, gap, _ = search.fit(allowed)
        f = search.value(allowed)
        if f - gap >= best_f - 1e-12 * max(1.0, abs(best_f)):
            continue  # no support below this node beats the incumbent
        nz = _support(w)
        if len(nz) <= k:
            # a leaf: its fit is the best over `allowed` (to its gap), and it replaces the
            # incumbent only if it is better. A gap large enough to pass the test above (a
            # far-off model's rounding) once made a worse fit the incumbent.
            if f < best_f:
                incumbent, best_f = allowed, f
            continue
        if len(inc) >= k:  # pragma: no cover - allowed == inc has at most k models
            continue
        cand = [j for j in nz if j not in inc]
        j = max(cand, key=lambda m: float(w[m]))
        stack.append((inc, exc | {j}))  # without j
        stack.append((inc | {j}, exc))  # with j: explored first
    return incumbent, True
