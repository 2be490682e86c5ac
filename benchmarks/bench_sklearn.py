"""ConvexBlendRegressor against scikit-lego's ProbWeightRegression (cvxpy), side by side.

    python benchmarks/bench_sklearn.py [--n 100000] [--k 20] [--rounds 3] [--seed 0]

Both solve least squares on the simplex, ``min_w ||X w - y||^2`` subject to ``w >= 0``,
``sum w = 1``: scikit-lego's ``ProbWeightRegression`` states it as a cvxpy program and
calls ``problem.solve()`` (cvxpy's default solver for it: OSQP);
``convexmix.sklearn.ConvexBlendRegressor`` calls ``convexmix.ensemble.fit_weights``
(``loss="mse"``). Two problems of N rows and K columns, float64:

* "independent": iid normal columns, ``y = X @ w* + noise`` with ``w*`` random on the
  simplex (well conditioned);
* "models": K predictors of y with noise of different sizes, biases and a shared error
  term, as models of one data set are (correlated columns, the case of blending).

Each estimator's ``fit(X, y)`` is timed whole (input checks included), in interleaved
rounds, best of ``--rounds``. Where ``ProbWeightRegression`` fails (cvxpy's default
solver reports the problem "infeasible"), the same cvxpy program is also solved with
Clarabel (``problem.solve(solver="CLARABEL")``), as a user would have to, and timed.
It prints the times, their ratios, each objective (the mean squared error), the relative
difference to convexmix's, the largest weight difference, and the machine's load.

scikit-lego and cvxpy are not convexmix dependencies: ``pip install scikit-lego cvxpy``
in the environment that runs this script.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from convexmix.sklearn import ConvexBlendRegressor


def make_problem(kind: str, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "independent":
        X = rng.normal(size=(n, k))
        return X, X @ rng.dirichlet(np.ones(k)) + rng.normal(size=n)
    y = rng.normal(size=n)
    noise = rng.uniform(0.3, 3.0, size=k)
    bias = rng.normal(0.0, 0.3, size=k)
    shared = rng.normal(size=(n, 1))  # correlated errors, as models of one data set have
    X = y[:, None] + noise * (0.6 * rng.normal(size=(n, k)) + 0.4 * shared) + bias
    return X, y


class _Clarabel:
    """ProbWeightRegression's cvxpy program, solved by Clarabel."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> _Clarabel:
        import cvxpy as cp

        beta = cp.Variable(X.shape[1])
        problem = cp.Problem(
            cp.Minimize(cp.sum_squares(X @ beta - y)), [cp.sum(beta) == 1, beta >= 0]
        )
        problem.solve(solver="CLARABEL")
        if beta.value is None:
            raise ValueError(f"Clarabel: {problem.status}")
        self.coef_ = np.asarray(beta.value)
        return self


def load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import cvxpy
    import sklego
    from sklego.linear_model import ProbWeightRegression

    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, load at start {load()}")
    print(
        f"# scikit-lego {sklego.__version__}, cvxpy {cvxpy.__version__} "
        f"(solvers: {', '.join(cvxpy.installed_solvers())})"
    )
    print(f"# N = {args.n}, K = {args.k}, fit() best of {args.rounds} interleaved rounds")
    makers = {
        "ConvexBlendRegressor": ConvexBlendRegressor,
        "ProbWeightRegression": ProbWeightRegression,
        "same program, Clarabel": _Clarabel,
    }
    for kind in ("independent", "models"):
        X, y = make_problem(kind, args.n, args.k, args.seed)
        times: dict[str, list[float]] = {name: [] for name in makers}
        fits: dict[str, np.ndarray | str] = {}
        for _ in range(args.rounds):
            for name, make in makers.items():
                if name == "same program, Clarabel" and not isinstance(
                    fits.get("ProbWeightRegression"), str
                ):
                    continue  # only where scikit-lego's own call fails
                t0 = time.perf_counter()
                try:
                    coef = np.asarray(make().fit(X, y).coef_, dtype=np.float64)
                except ValueError as err:
                    fits[name] = str(err).splitlines()[0]
                    continue
                times[name].append(time.perf_counter() - t0)
                fits[name] = coef

        def mse(w: np.ndarray, X: np.ndarray = X, y: np.ndarray = y) -> float:
            return float(np.mean((X @ w - y) ** 2))

        ours = fits["ConvexBlendRegressor"]
        assert isinstance(ours, np.ndarray)
        t_ours = min(times["ConvexBlendRegressor"])
        print(f"\n## {kind} (load {load()})")
        print(
            f"{'':<24}{'fit time':>11}{'ratio':>9}{'MSE':>20}{'rel. to ours':>14}{'max |dw|':>10}"
        )
        for name, coef in fits.items():
            if isinstance(coef, str):
                print(f"{name:<24}  failed: {coef}")
                continue
            t = min(times[name])
            rel = (mse(coef) - mse(ours)) / mse(ours)
            print(
                f"{name:<24}{t * 1e3:>9.1f}ms{t / t_ours:>8.1f}x{mse(coef):>20.14f}"
                f"{rel:>+14.2e}{np.abs(coef - ours).max():>10.1e}"
            )


if __name__ == "__main__":
    main()
