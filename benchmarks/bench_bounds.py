"""The capped-simplex projection against a plain torch bisection, jaxopt, optax and cvxpylayers.

    python benchmarks/bench_bounds.py [--rounds 5]

One run, float64, forward only, the projection onto {0 <= p <= u, sum p = 1} with
u = 1.5 / K (about a third of the entries capped) at (rows, K) = (1, 1e6), (1000, 1000)
and (10000, 10). Every implementation is timed in interleaved rounds (best of
``--rounds``); the ratio column is that time over convexmix's (> 1: convexmix is faster).
The max error is against an independent float64 reference: 200 bisections on the
threshold. Peers that are not installed are skipped:

* plain torch: 60 bisections on the threshold, vectorised over the rows (the code that
  floats around);
* ``jaxopt.projection.projection_box_section`` (JAX on CPU, vmapped over rows, jitted,
  warmed up);
* ``optax.projections.projection_simplex`` (no cap: the unbounded problem, for scale);
* cvxpylayers (a ``CvxpyLayer`` of the QP, batched): on the first rows of the small cases
  only, its time scaled to all rows (it is linear in the rows).

Also the unbounded ``project_simplex`` on the same input, for the 1.5x target at K = 1e6.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

import convexmix as cx

CASES = [(1, 1_000_000), (1000, 1000), (10000, 10)]


def reference(x: torch.Tensor, upper: float) -> torch.Tensor:
    """200 bisections on tau of sum(clip(x - tau, 0, u)) = 1, float64, every row at once."""
    lo = x.amin(-1, keepdim=True) - upper - 1.0
    hi = x.amax(-1, keepdim=True)
    for _ in range(200):
        mid = (lo + hi) / 2
        above = (x - mid).clamp(0.0, upper).sum(-1, keepdim=True) >= 1.0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return (x - (lo + hi) / 2).clamp(0.0, upper)


def plain_bisection(x: torch.Tensor, upper: float, steps: int = 60) -> torch.Tensor:
    lo = x.amin(-1, keepdim=True) - upper
    hi = x.amax(-1, keepdim=True)
    for _ in range(steps):
        mid = (lo + hi) / 2
        above = (x - mid).clamp(0.0, upper).sum(-1, keepdim=True) >= 1.0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return (x - (lo + hi) / 2).clamp(0.0, upper)


def jax_peers(upper: float) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    try:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
    except ImportError:
        return out
    try:
        from jaxopt.projection import projection_box_section

        def one(row: jax.Array) -> jax.Array:
            k = row.shape[0]
            hp = (jnp.zeros(k), jnp.full(k, upper), jnp.ones(k), 1.0)
            return projection_box_section(row, hp)

        f = jax.jit(jax.vmap(one))
        out["jaxopt box_section"] = lambda a: np.asarray(f(a).block_until_ready())
    except ImportError:
        pass
    try:
        from optax.projections import projection_simplex

        g = jax.jit(jax.vmap(projection_simplex))
        out["optax simplex (no cap)"] = lambda a: np.asarray(g(a).block_until_ready())
    except ImportError:
        pass
    return out


def cvxpy_peer(k: int, upper: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer
    except ImportError:
        return None
    y = cp.Parameter(k)
    p = cp.Variable(k)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(p - y)), [p >= 0, p <= upper, cp.sum(p) == 1])
    layer = CvxpyLayer(problem, parameters=[y], variables=[p])
    return lambda x: layer(x)[0]


def best_times(
    fns: dict[str, Callable[[], object]], rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Best wall time and best CPU time (all threads of the process) of each function."""
    for f in fns.values():
        f()
    best = dict.fromkeys(fns, float("inf"))
    cpu = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, f in fns.items():
            c0 = time.process_time()
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    return best, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cvxpy-rows", type=int, default=20)
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {load:.2f}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, float64, "
        f"forward only, best of {args.rounds} rounds"
    )
    print(
        "| rows x K | impl | wall ms | wall / convexmix | CPU ms | CPU / convexmix "
        "| max error vs reference |"
    )
    print("|---|---|---|---|---|---|---|")
    for rows, k in CASES:
        torch.manual_seed(0)
        x = torch.randn(rows, k, dtype=torch.float64)
        upper = 1.5 / k
        ref = reference(x, upper)
        xn = x.numpy()
        fns: dict[str, Callable[[], object]] = {
            "convexmix capped": lambda x=x, u=upper: cx.functional.project_simplex(x, upper=u),
            "convexmix unbounded": lambda x=x: cx.functional.project_simplex(x),
            "plain torch bisection": lambda x=x, u=upper: plain_bisection(x, u),
        }
        outs: dict[str, object] = {}
        for name, f in jax_peers(upper).items():
            fns[name] = lambda f=f, a=xn: f(a)
        times, cpu = best_times(fns, args.rounds)
        for name, f in fns.items():
            outs[name] = f()
        cvx = cvxpy_peer(k, upper) if k <= 1000 else None
        if cvx is not None:
            n = min(rows, args.cvxpy_rows)
            sub = x[:n]
            t0 = time.perf_counter()
            outs["cvxpylayers"] = cvx(sub)
            times["cvxpylayers"] = (time.perf_counter() - t0) * rows / n
            cpu["cvxpylayers"] = float("nan")
        base = times["convexmix capped"]
        cbase = cpu["convexmix capped"]
        for name, t in times.items():
            out = torch.as_tensor(np.array(outs[name]))
            if name == "optax simplex (no cap)" or name == "convexmix unbounded":
                err = "(no cap)"
            else:
                err = f"{(out - ref[: out.shape[0]]).abs().max().item():.1e}"
            note = f" ({min(rows, args.cvxpy_rows)} rows, scaled)" if name == "cvxpylayers" else ""
            c = cpu[name]
            print(
                f"| {rows} x {k:.0e} | {name}{note} | {t * 1e3:.2f} | {t / base:.2f} "
                f"| {c * 1e3:.2f} | {c / cbase:.2f} | {err} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
