"""fit_weights under max_weight / max_models against SLSQP and brute force over supports.

    python benchmarks/bench_ensemble_bounds.py

Made data: K models' class probabilities (softmax of noise plus a model-specific signal
on the true class), log-loss. Prints

1. ``max_weight``: convexmix's loss minus the best of 3 SLSQP starts (scipy, bounds and
   the sum constraint), and both times;
2. ``max_models`` for K = 10: branch and bound against brute force over all supports
   (each support fitted exactly), loss difference and number of convex fits;
3. the large-K heuristic (forward selection + swaps, used above K = 24): its loss gap to
   branch and bound (forced on, exact) at K = 16 and 20.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch
from scipy.optimize import minimize

from convexmix.ensemble import _capped, fit_weights
from convexmix.ensemble._factory import make_objective


def problem(k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    strength = torch.rand(k, 1, 1, generator=g, dtype=torch.float64) * 2.5
    noise = torch.randn(k, n, 3, generator=g, dtype=torch.float64) * 1.5
    return (noise + torch.nn.functional.one_hot(y, 3) * strength).softmax(-1), y


def slsqp(p: torch.Tensor, y: torch.Tensor, cap: float) -> float:
    q = p[:, torch.arange(len(y)), y].numpy()
    k = q.shape[0]
    best = np.inf
    for s in range(3):
        x0 = np.random.default_rng(s).dirichlet(np.ones(k))
        x0 = np.minimum(x0, cap)
        x0 += (1 - x0.sum()) * (cap - x0) / (cap - x0).sum()
        r = minimize(
            lambda v: -np.log(np.maximum(v @ q, 1e-15)).mean(),
            x0,
            jac=lambda v: -(q / (v @ q)).mean(1),
            method="SLSQP",
            bounds=[(0, cap)] * k,
            constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}],
            options={"ftol": 1e-15, "maxiter": 500},
        )
        best = min(best, float(-np.log(np.clip(r.x, 0, cap) @ q).mean()))
    return best


def main() -> None:
    print("## max_weight: convexmix vs SLSQP (log-loss, N = 2000)")
    print("| K | cap | convexmix - SLSQP | convexmix ms | SLSQP ms (3 starts) |")
    print("|---|---|---|---|---|")
    for k, cap in [(8, 0.3), (8, 0.2), (20, 0.1), (50, 0.05)]:
        p, y = problem(k, 2000, seed=k)
        t0 = time.perf_counter()
        res = fit_weights(p, y, max_weight=cap)
        t1 = time.perf_counter()
        ref = slsqp(p, y, cap)
        t2 = time.perf_counter()
        print(
            f"| {k} | {cap} | {res.loss - ref:+.1e} | {(t1 - t0) * 1e3:.0f} | "
            f"{(t2 - t1) * 1e3:.0f} |",
            flush=True,
        )
    print("\n## max_models, K = 10: branch and bound vs brute force over all supports")
    print("| k | cap | B&B - brute force | B&B fits | brute-force fits | B&B ms | brute ms |")
    print("|---|---|---|---|---|---|---|")
    p, y = problem(10, 1000, seed=1)
    for k, cap in [(1, 1.0), (2, 1.0), (3, 1.0), (3, 0.4), (5, 0.25)]:
        obj = make_objective(p, y, "log_loss", None, True)
        t0 = time.perf_counter()
        bnb = _capped.Search(obj, cap, 1e-10, 200)
        support, _ = _capped.best_support(bnb, k, True)
        f_bnb = bnb.value(support)
        t1 = time.perf_counter()
        search = _capped.Search(obj, cap, 1e-10, 200)
        best = min(
            search.value(frozenset(s))
            for s in itertools.combinations(range(10), k)
            if k * cap >= 1 - 1e-12
        )
        t2 = time.perf_counter()
        print(
            f"| {k} | {cap} | {f_bnb - best:+.1e} | {bnb.fits} | {search.fits} | "
            f"{(t1 - t0) * 1e3:.0f} | {(t2 - t1) * 1e3:.0f} |",
            flush=True,
        )
    print("\n## the large-K heuristic (forward + swaps) vs exact branch and bound")
    print("| K | k | heuristic - exact | heuristic fits | B&B fits |")
    print("|---|---|---|---|---|")
    for kk, k, seed in [(16, 3, 2), (16, 5, 3), (20, 3, 4), (20, 5, 5)]:
        p, y = problem(kk, 1000, seed=seed)
        obj = make_objective(p, y, "log_loss", None, True)
        heur = _capped.Search(obj, 1.0, 1e-10, 200)
        f_h = heur.value(_capped.heuristic_support(heur, k))
        exact = _capped.Search(obj, 1.0, 1e-10, 200)
        support, proven = _capped.best_support(exact, k, True)
        f_e = exact.value(support)
        flag = "" if proven else " (node limit)"
        print(f"| {kk} | {k} | {f_h - f_e:+.1e}{flag} | {heur.fits} | {exact.fits} |", flush=True)


if __name__ == "__main__":
    main()
