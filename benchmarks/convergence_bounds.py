"""Convergence study under bounds: capped and k-sparse weights, and a small weight.

    python benchmarks/convergence_bounds.py [--steps 1500] [--jobs 4] [--out docs/figures]

Problems (float64):
  (e) capped least squares: a portfolio-style mixture of K = 8 sources whose unconstrained
      optimum puts 0.6 on one source; every weight capped at 0.3;
  (f) capped log-loss blend: K = 10 models' probabilities of the true class, one of them
      much better than the rest, every weight capped at 0.3 (``max_weight``);
  (g) k-sparse least squares: the best 3 of 12 sources;
  (h) a small weight: least squares on K = 3 sources with true weights [0.6, 0.3, 0.1]
      (no bound): the case where a sparse map can lose the 0.1 weight early.
Exact optima from independent solvers, printed with how far each is from the best:
(e) and (h) a brute force over the active sets (each weight at 0, at the cap or free; the
KKT system of each), scipy's SLSQP and projected FISTA (``project_simplex(upper=)``, to a
step of 1e-12); (f) SLSQP, projected FISTA and ``cx.ensemble.fit_weights(max_weight=)``;
(g) a brute force over every support of size <= 3, SLSQP on the best support and
``fit_weights(loss="mse", max_models=3)``. The reference is the best of them.

Methods (each over a grid of learning rates and 3 seeds that set the start): the
constrained softmax (``SimplexWeights(upper=)``) with Adam and SGD; ``sparsemax(upper=)``
with Adam; ``Projected(upper=)`` / ``Projected(k=)`` around Adam and SGD;
``ExponentiatedGradient(upper=)``; the naive baseline, clip + renormalise + clip after each
SGD step (for k-sparse: keep the k largest, renormalise). For (h): softmax, sparsemax and
entmax15 maps with Adam, and projected SGD.

Printed: the table of :mod:`convergence` per problem and method at its best learning rate,
then per method the learning rates at which every run on every problem it applies to
reaches a gap of 1e-6 (the range to document); then the recovery experiment
(:func:`recipe`): sparsemax + Adam at rates too large for it, then projected SGD or a
softmax layer from the weights it reached. ``--jobs`` runs the cells in worker processes.
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

import convexmix as cx

sys.path.insert(0, str(Path(__file__).parent))
from convergence import GAP, Problem, _first_below

torch.set_default_dtype(torch.float64)
LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
SEEDS = [0, 1, 2]
CAP = 0.3


def slsqp(
    loss: Callable[[torch.Tensor], torch.Tensor],
    k: int,
    upper: float = 1.0,
    support: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, float]:
    """The optimum of ``loss`` on {0 <= w <= upper, sum w = 1} (on ``support`` only)."""
    idx = list(range(k)) if support is None else list(support)

    def full(v: np.ndarray) -> torch.Tensor:
        w = torch.zeros(k)
        w[idx] = torch.as_tensor(v)
        return w

    def f(v: np.ndarray) -> tuple[float, np.ndarray]:
        w = full(v).requires_grad_()
        val = loss(w)
        (g,) = torch.autograd.grad(val, w)
        return float(val.detach()), g[idx].numpy()

    x0 = np.full(len(idx), 1.0 / len(idx))
    res = minimize(
        f,
        x0,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, upper)] * len(idx),
        constraints=[
            {"type": "eq", "fun": lambda v: v.sum() - 1.0, "jac": lambda v: np.ones_like(v)}
        ],
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    w = full(np.clip(res.x, 0.0, upper))
    w = w / w.sum()
    return w, float(loss(w))


def make_problems() -> list[tuple[Problem, dict[str, object]]]:
    gen = torch.Generator().manual_seed(4321)
    # (e) capped least squares: the target leans 0.6 on source 0
    xs = torch.randn(8, 2000, generator=gen)
    true = torch.tensor([0.6, 0.1, 0.1, 0.08, 0.05, 0.04, 0.02, 0.01])
    y = true @ xs + 0.05 * torch.randn(2000, generator=gen)

    def capped_ls(w: torch.Tensor, batch: int | None) -> torch.Tensor:
        return ((w @ xs - y) ** 2).mean()

    # (f) capped log-loss: one strong model, nine weaker ones
    n, c = 2000, 5
    labels = torch.randint(c, (n,), generator=gen)
    onehot = torch.nn.functional.one_hot(labels, c).double()
    preds = []
    for k in range(10):
        noise = 1.0 if k == 0 else 2.5 + 0.2 * k
        preds.append(torch.softmax(3.0 * onehot + noise * torch.randn(n, c, generator=gen), -1))
    probs = torch.stack(preds)
    p_true = probs[:, torch.arange(n), labels]

    def capped_ll(w: torch.Tensor, batch: int | None) -> torch.Tensor:
        return -torch.log((w @ p_true).clamp_min(1e-300)).mean()

    # (g) best 3 of 12 sources
    xg = torch.randn(12, 800, generator=gen)
    yg = torch.tensor([0.5, 0.3, 0.2]) @ xg[[1, 5, 9]] + 0.3 * xg[[0, 2]].mean(0)
    yg = yg + 0.05 * torch.randn(800, generator=gen)

    def sparse_ls(w: torch.Tensor, batch: int | None) -> torch.Tensor:
        return ((w @ xg - yg) ** 2).mean()

    # (h) a small weight, plain simplex
    xh = torch.randn(3, 1000, generator=gen)
    yh = torch.tensor([0.6, 0.3, 0.1]) @ xh

    def small(w: torch.Tensor, batch: int | None) -> torch.Tensor:
        return ((w @ xh - yh) ** 2).mean()

    return [
        (
            Problem("(e) capped least squares", 8, capped_ls),
            {"upper": CAP, "ls": ls_terms(xs, y)},
        ),
        (
            Problem("(f) capped log-loss blend", 10, capped_ll),
            {"upper": CAP, "probs": probs, "labels": labels},
        ),
        (
            Problem("(g) best 3 of 12", 12, sparse_ls),
            {"k": 3, "ls": ls_terms(xg, yg), "data": (xg, yg)},
        ),
        (Problem("(h) small weight 0.1", 3, small), {"ls": ls_terms(xh, yh)}),
    ]


def ls_terms(xs: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``mean((w @ xs - y) ** 2) = w'Qw - 2c'w + const``: the (Q, c) of a least squares."""
    n = xs.shape[1]
    return (xs @ xs.T / n).numpy(), (xs @ y / n).numpy()


def active_set(
    q: np.ndarray, c: np.ndarray, upper: float = 1.0, k: int | None = None
) -> torch.Tensor:
    """The exact minimiser of ``w'Qw - 2c'w`` on {0 <= w <= upper, sum w = 1, at most k > 0}.

    Brute force over the active sets: each weight is 0, at ``upper`` or free (free ones
    solve the KKT system of the equality-constrained quadratic); of the feasible
    solutions the one of least objective is the optimum (it is one of them, since the
    optimum is the equality-constrained optimum of its own active set). With ``k``,
    the non-zero weights (at most k) are all free: the brute force over supports.
    """
    n = len(c)
    states = (0, 1) if upper >= 1.0 else (0, 1, 2)  # 0: at zero, 1: free, 2: at upper
    best, best_val = None, math.inf
    for combo in itertools.product(states, repeat=n):
        free = [i for i in range(n) if combo[i] == 1]
        capped = [i for i in range(n) if combo[i] == 2]
        if k is not None and len(free) > k:
            continue
        w = np.zeros(n)
        w[capped] = upper
        rest = 1.0 - upper * len(capped)
        if not free:
            if abs(rest) > 1e-12:
                continue
        else:
            m = len(free)
            kkt = np.zeros((m + 1, m + 1))
            kkt[:m, :m] = 2 * q[np.ix_(free, free)]
            kkt[:m, m] = 1.0
            kkt[m, :m] = 1.0
            rhs = np.concatenate([2 * c[free] - 2 * q[np.ix_(free, capped)] @ w[capped], [rest]])
            try:
                sol = np.linalg.solve(kkt, rhs)
            except np.linalg.LinAlgError:
                continue
            w[free] = sol[:m]
            if (w[free] < -1e-13).any() or (w[free] > upper + 1e-13).any():
                continue
        val = float(w @ q @ w - 2 * c @ w)
        if val < best_val:
            best, best_val = w, val
    assert best is not None
    return torch.as_tensor(np.clip(best, 0.0, upper))


def fista(
    loss: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    upper: float | None = None,
    tol: float = 1e-12,
    steps: int = 20000,
) -> torch.Tensor:
    """Projected FISTA with backtracking onto the capped simplex, to a step of ``tol``.

    The projection is ``cx.functional.project_simplex(upper=)``; it stops when the
    gradient-mapping step moves no weight by more than ``tol``.
    """

    def proj(v: torch.Tensor) -> torch.Tensor:
        return cx.functional.project_simplex(v, upper=upper)

    def f_and_g(v: torch.Tensor) -> tuple[float, torch.Tensor]:
        v = v.detach().requires_grad_()
        val = loss(v)
        (g,) = torch.autograd.grad(val, v)
        return float(val.detach()), g

    w = proj(start)
    z, t, step = w.clone(), 1.0, 1.0
    for _ in range(steps):
        fz, gz = f_and_g(z)
        for _ in range(100):
            cand = proj(z - step * gz)
            d = cand - z
            fc = float(loss(cand))
            if math.isfinite(fc) and fc <= fz + float(gz @ d) + float(d @ d) / (2 * step) + 1e-16:
                break
            step /= 2
        if float((cand - w).abs().max()) < tol and float(d.abs().max()) < tol:
            return cand
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = proj(cand + (t - 1) / t_next * (cand - w))
        w, t = cand, t_next
        step = min(step * 1.1, 1e6)
    return w


def references(problem: Problem, opts: dict[str, object]) -> dict[str, torch.Tensor]:
    """Each independent solver's optimum of ``problem`` (every one a feasible point)."""
    full = lambda w: problem.loss(w, None)  # noqa: E731
    upper = float(opts.get("upper", 1.0))  # type: ignore[arg-type]
    out: dict[str, torch.Tensor] = {}
    if "k" in opts:
        kk = int(opts["k"])  # type: ignore[call-overload]
        q, c = opts["ls"]  # type: ignore[misc]
        out["brute force over supports"] = active_set(q, c, k=kk)
        # SLSQP on the best support, and FISTA on it: the optimum within that support
        support = tuple(int(i) for i in out["brute force over supports"].nonzero().flatten())
        out["SLSQP on its support"] = slsqp(full, problem.k, support=support)[0]
        xs, y = opts["data"]  # type: ignore[misc]
        fit = cx.ensemble.fit_weights(xs, y, loss="mse", max_models=kk)
        out["fit_weights(max_models)"] = torch.as_tensor(np.asarray(fit.weights))
        return out
    if "ls" in opts:
        q, c = opts["ls"]  # type: ignore[misc]
        out["active-set brute force"] = active_set(q, c, upper)
    out["SLSQP"] = slsqp(full, problem.k, upper)[0]
    out["projected FISTA"] = fista(full, torch.full((problem.k,), 1.0 / problem.k), upper)
    if "probs" in opts:
        fit = cx.ensemble.fit_weights(
            opts["probs"], opts["labels"], max_weight=upper, validate=False
        )
        out["fit_weights(max_weight)"] = torch.as_tensor(np.asarray(fit.weights))
    return out


_SOLVED: dict[str, tuple[torch.Tensor, float]] = {}


def solve(problem: Problem, opts: dict[str, object]) -> None:
    """Set ``problem.optimum`` and ``problem.best``: the best of the independent solvers.

    Prints each solver's loss above the best and weight distance from it: they agree to
    about 1e-12 or better, so a gap of 1e-6 is far above the reference's error.
    """
    if problem.name in _SOLVED:
        problem.optimum, problem.best = _SOLVED[problem.name]
        return
    full = lambda w: problem.loss(w, None)  # noqa: E731
    refs = references(problem, opts)
    vals = {name: float(full(w)) for name, w in refs.items()}
    # the exact brute force (listed first) wins ties at rounding level
    name = next(n for n in refs if vals[n] <= min(vals.values()) + 1e-15)
    problem.optimum, problem.best = refs[name], vals[name]
    _SOLVED[problem.name] = (problem.optimum, problem.best)
    for other, w in refs.items():
        print(
            f"  {other}: loss {vals[other] - problem.best:+.1e} above the best, "
            f"weights {float((w - problem.optimum).abs().max()):.1e} from it",
            flush=True,
        )


def methods_for(opts: dict[str, object]) -> list[str]:
    if "k" in opts:
        return ["projected(k) Adam", "projected(k) SGD", "top-k + renormalise"]
    if "upper" in opts:
        return [
            "constrained softmax Adam",
            "constrained softmax SGD",
            "sparsemax(upper) Adam",
            "projected(upper) Adam",
            "projected(upper) SGD",
            "exponentiated gradient(upper)",
            "clip + renormalise + clip",
        ]
    return ["softmax Adam", "sparsemax Adam", "entmax15 Adam", "projected SGD"]


def run(
    problem: Problem, opts: dict[str, object], method: str, lr: float, seed: int, steps: int
) -> tuple[list[float], torch.Tensor, float]:
    k = problem.k
    gen = torch.Generator().manual_seed(seed)
    e = torch.empty(k).exponential_(generator=gen)
    start = e / e.sum()
    upper = opts.get("upper")
    kk = opts.get("k")
    if upper is not None:  # a feasible start: the projection onto the capped simplex
        start = cx.functional.project_simplex(start, upper=float(upper))  # type: ignore[arg-type]
    if kk is not None:
        start = cx.functional.project_sparse_simplex(start, int(kk))  # type: ignore[call-overload]
    post: Callable[[], None] = lambda: None  # noqa: E731
    if method.split()[0] in ("softmax", "sparsemax", "entmax15", "constrained", "sparsemax(upper)"):
        map_name = "sparsemax" if method.startswith("sparsemax") else method.split()[0]
        map_name = "softmax" if map_name == "constrained" else map_name
        layer = cx.SimplexWeights(k, map=map_name, init=start, upper=upper)  # type: ignore[arg-type]
        params = list(layer.parameters())
        opt: torch.optim.Optimizer = (
            torch.optim.SGD(params, lr=lr)
            if method.endswith("SGD")
            else torch.optim.Adam(params, lr=lr)
        )
        weights: Callable[[], torch.Tensor] = layer
    else:
        w = torch.nn.Parameter(start.clone())
        params = [w]
        inner = (
            torch.optim.Adam(params, lr=lr) if "Adam" in method else torch.optim.SGD(params, lr=lr)
        )
        if method.startswith("projected"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", cx.ConvexMixWarning)
                opt = cx.optim.Projected(inner, params, upper=upper, k=kk)  # type: ignore[arg-type]
        elif method.startswith("exponentiated"):
            opt = cx.optim.ExponentiatedGradient(params, lr=lr, upper=upper)  # type: ignore[arg-type]
        else:
            opt = inner

            def post() -> None:
                with torch.no_grad():
                    if kk is not None:  # keep the k largest, renormalise
                        drop = w.argsort(descending=True)[int(kk) :]  # type: ignore[call-overload]
                        w[drop] = 0
                        w.clamp_(min=0)
                    else:
                        w.clamp_(0, float(upper))  # type: ignore[arg-type]
                    s = w.sum()
                    w.div_(s if s > 0 else 1.0)
                    if kk is None:
                        w.clamp_(max=float(upper))  # type: ignore[arg-type]

        weights = lambda: w  # noqa: E731

    def gap(cur: torch.Tensor, value: float) -> float:
        """The loss gap of the point ``cur`` (inf when it is not feasible)."""
        ok = bool((cur >= -1e-12).all()) and abs(float(cur.sum()) - 1) < 1e-9
        if upper is not None:
            ok = ok and bool((cur <= float(upper) + 1e-12).all())  # type: ignore[arg-type]
        if kk is not None:
            ok = ok and int((cur > 0).sum()) <= int(kk)  # type: ignore[call-overload]
        # an infeasible point has no gap: it is not an answer to the problem
        return value - problem.best if ok else math.inf

    # The gap after step i is measured by the forward pass of step i + 1 (same weights),
    # so each step costs one loss evaluation; the time counts the step only.
    gaps, elapsed = [], 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        cur = weights()
        loss = problem.loss(cur, None)
        t1 = time.perf_counter()
        if i:
            gaps.append(gap(cur.detach(), float(loss.detach())))
        if i == steps:
            break
        t2 = time.perf_counter()
        loss.backward()
        opt.step()
        post()
        elapsed += time.perf_counter() - t2 + t1 - t0
    return gaps, weights().detach(), elapsed


Cell = tuple[str, str, list[tuple[float, list[bool]]], list[float]]


def cell(task: tuple[int, str, int]) -> Cell:
    """One problem and method over every learning rate and seed: its table row, whether
    each (lr, seed) run reached the gap, and the median gap curve at the best lr."""
    index, method, steps = task
    problem, opts = make_problems()[index]
    solve(problem, opts)
    assert problem.optimum is not None
    results = {lr: [run(problem, opts, method, lr, s, steps) for s in SEEDS] for lr in LRS}
    reach = [
        (lr, [_first_below(g, GAP) is not None for g, _, _ in res]) for lr, res in results.items()
    ]
    finals = {
        lr: statistics.median(r[0][-1] if math.isfinite(r[0][-1]) else math.inf for r in res)
        for lr, res in results.items()
    }
    best_lr = min(finals, key=lambda lr: finals[lr])
    best = results[best_lr]
    hits = [_first_below(g, GAP) for g, _, _ in best]
    reached = [h for h in hits if h is not None]
    steps_to = statistics.median(reached) if len(reached) >= 2 else None
    secs_to = (
        statistics.median(h * t / steps for h, (_, _, t) in zip(hits, best, strict=True) if h)
        if steps_to
        else None
    )
    all_runs = [r for res in results.values() for r in res]
    share = sum(_first_below(g, GAP) is not None for g, _, _ in all_runs) / len(all_runs)
    bad = sum(not math.isfinite(g[-1]) or g[-1] > g[0] for g, _, _ in all_runs) / len(all_runs)
    err = statistics.median(float((w - problem.optimum).abs().max()) for _, w, _ in best)
    final = finals[best_lr]
    row = (
        f"| {problem.name} | {method} | {best_lr:g} | "
        f"{'-' if steps_to is None else int(steps_to)} | "
        f"{'-' if secs_to is None else f'{secs_to:.3f}'} | "
        f"{'infeasible' if not math.isfinite(final) else f'{final:.1e}'} | "
        f"{err:.1e} | {share:.0%} | {bad:.0%} |"
    )
    print(row, flush=True)
    curve = [
        statistics.median(min(max(g[i], 1e-16), 1e3) for g, _, _ in best) for i in range(steps)
    ]
    return problem.name, row, reach, curve


def study(
    steps: int, pool: Pool | None = None
) -> tuple[list[str], list[str], dict[str, dict[str, list[float]]]]:
    """Every problem and method (in ``pool`` when given); the rows, lr rows and curves."""
    tasks = []
    for index, (problem, opts) in enumerate(make_problems()):
        solve(problem, opts)  # before the pool forks: the workers inherit the optima
        assert problem.optimum is not None
        print(
            f"{problem.name}: optimum {problem.optimum.numpy().round(4)}, loss {problem.best:.12f}",
            flush=True,
        )
        tasks += [(index, method, steps) for method in methods_for(opts)]
    cells = pool.map(cell, tasks, chunksize=1) if pool else [cell(t) for t in tasks]
    rows: list[str] = []
    ranges: dict[str, dict[float, list[bool]]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for (_, method, _), (name, row, reach, curve) in zip(tasks, cells, strict=True):
        rows.append(row)
        for lr, ok in reach:
            ranges.setdefault(method, {}).setdefault(lr, []).extend(ok)
        curves.setdefault(name, {})[method] = curve
    lr_rows = []
    for method, by_lr in ranges.items():
        good = [lr for lr in LRS if by_lr[lr] and all(by_lr[lr])]
        cells_ = " | ".join(f"{sum(by_lr[lr])}/{len(by_lr[lr])}" for lr in LRS)
        lr_rows.append(f"| {method} | {cells_} | {', '.join(f'{lr:g}' for lr in good) or 'none'} |")
    return rows, lr_rows, curves


RECIPE_LRS = [0.05, 0.1, 0.3, 1.0]
RECIPE_SGD_LR = 0.1


def recipe_run(task: tuple[int, float, int, int]) -> str:
    """One row of :func:`recipe`: problem ``index``, Adam rate ``lr``, ``seed``."""
    index, lr, seed, steps = task
    problem, opts = make_problems()[index]
    solve(problem, opts)
    assert problem.optimum is not None
    upper = opts.get("upper")
    gaps, w1, _ = run(problem, opts, "sparsemax Adam", lr, seed, steps)
    lost = int(((w1 == 0) & (problem.optimum > 1e-9)).sum())
    control = run(problem, opts, "sparsemax Adam", lr, seed, 2 * steps)[0][-1]
    cells = []
    for method, lr2 in (("projected SGD", RECIPE_SGD_LR), ("softmax Adam", 0.01)):
        start = w1.clone()
        if method == "softmax Adam":
            # the softmax's right inverse smooths zeros, which takes the start a little
            # off the point: that is the point, a lost weight can come back
            layer = cx.SimplexWeights(problem.k, init=start, upper=upper)  # type: ignore[arg-type]
            opt: torch.optim.Optimizer = torch.optim.Adam(layer.parameters(), lr=lr2)
            weights: Callable[[], torch.Tensor] = layer
        else:
            w = torch.nn.Parameter(start)
            opt = cx.optim.Projected(torch.optim.SGD([w], lr=lr2), [w], upper=upper)  # type: ignore[arg-type]
            weights = lambda w=w: w  # type: ignore[misc]  # noqa: E731
        for _ in range(steps):
            opt.zero_grad()
            problem.loss(weights(), None).backward()
            opt.step()
        with torch.no_grad():
            cells.append(float(problem.loss(weights(), None)) - problem.best)
    row = (
        f"| {problem.name} | {lr:g} | {seed} | {gaps[-1]:.1e} | {lost} | "
        f"{control:.1e} | {cells[0]:.1e} | {cells[1]:.1e} |"
    )
    print(row, flush=True)
    return row


def recipe(steps: int, pool: Pool | None = None) -> list[str]:
    """Recover from a lost weight: sparsemax + Adam at large rates, then a second phase.

    Phase one: ``steps`` of sparsemax (``upper=`` where the problem has a cap) + Adam at
    each rate of ``RECIPE_LRS``. Phase two, from its weights, ``steps`` more of: the
    same (the control); ``Projected`` SGD at ``RECIPE_SGD_LR`` on the weights; or a
    softmax layer initialised at the weights + Adam at 0.01. Rows: the gap after
    phase one, how many weights the optimum has that phase one zeroed, and each
    phase two's gap.
    """
    tasks = [
        (index, lr, seed, steps)
        for index, (_, opts) in enumerate(make_problems())
        if "k" not in opts
        for lr, seed in itertools.product(RECIPE_LRS, SEEDS)
    ]
    return pool.map(recipe_run, tasks, chunksize=1) if pool else [recipe_run(t) for t in tasks]


def plot(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    for ax, (name, by_method) in zip(axes, curves.items(), strict=True):
        for method, gaps in by_method.items():
            style = "--" if "SGD" in method or "clip" in method or "top-k" in method else "-"
            ax.semilogy(range(1, len(gaps) + 1), gaps, style, label=method)
        ax.axhline(GAP, color="grey", lw=0.8, ls=":")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss - optimum (median of 3 seeds, best lr)")
        ax.set_ylim(1e-16, 1e3)
        ax.legend(fontsize="x-small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default=None, help="folder for convergence_bounds.png")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (fork)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    for problem, opts in make_problems():  # the optima, once, before any worker forks
        solve(problem, opts)
    pool = multiprocessing.get_context("fork").Pool(args.jobs) if args.jobs > 1 else None
    rows, lr_rows, curves = study(args.steps, pool)
    print(
        f"\n{args.steps} steps per run, lr in {LRS}, seeds {SEEDS}, float64; "
        f"{time.perf_counter() - t0:.0f} s\n"
    )
    print(
        "| problem | method | best lr | steps to 1e-6 | s to 1e-6 | final gap "
        "| max weight error | runs reaching 1e-6 | runs ending worse |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nRuns reaching 1e-6, per learning rate (all problems the method applies to):\n")
    print("| method | " + " | ".join(f"{lr:g}" for lr in LRS) + " | every run reaches |")
    print("|---|" + "---|" * len(LRS) + "---|")
    print("\n".join(lr_rows))
    if args.out:
        plot(curves, Path(args.out) / "convergence_bounds.png")
    half = max(args.steps // 3, 1)
    print(
        f"\nRecovering from a lost weight: {half} steps of sparsemax + Adam, then {half} more "
        f"of each phase two (projected SGD at lr {RECIPE_SGD_LR:g}, softmax + Adam at 0.01):\n"
    )
    print(
        "| problem | Adam lr | seed | gap after phase one | optimum's weights lost "
        "| sparsemax + Adam on | projected SGD | softmax + Adam |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = recipe(half, pool)
    print("\n".join(["", "(in order)", *rows]))
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
