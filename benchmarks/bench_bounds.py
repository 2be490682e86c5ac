"""The capped-simplex projection against jaxopt, a plain torch bisection, optax and cvxpylayers.

    python benchmarks/bench_bounds.py [--rounds 7] [--threads 1] [--dtypes float32,float64]

One run, forward only, the projection onto {0 <= p <= u, sum p = 1} with u = 1.5 / K
(about a third of the entries capped) on the grid (rows, K) = (1000, 10), (10000, 10),
(100, 1000) and (1, 1e6), in float32 and float64. Every implementation is timed in
interleaved rounds (best of ``--rounds``; the small cases repeat each call within a round
so that a timing spans about 10^6 entries), in wall time and in CPU time of this process
(all its threads). ``--threads 1`` runs torch and XLA on one thread each (XLA's flags are
set before jax is imported), which makes the CPU time the one-thread cost. The max error
is against an independent float64 reference on the same values (the input and the cap
rounded to the dtype): 200 bisections on the threshold.

Two tables: convexmix against jaxopt per cell (the ratio is convexmix's time over
jaxopt's: <= 1 is convexmix as fast or faster), then every implementation (the ratio is its
time over convexmix's). Peers that are not installed are skipped:

* ``jaxopt.projection.projection_box_section`` (JAX on CPU, vmapped over the rows, jitted,
  warmed up, the input already a JAX array of the dtype, the output block_until_ready'd);
* plain torch: 60 bisections on the threshold, vectorised over the rows (the code that
  floats around);
* ``optax.projections.projection_simplex`` (no cap: the unbounded problem, for scale);
* cvxpylayers (a ``CvxpyLayer`` of the QP, batched; float64, K <= 1000): on the first
  rows only, its time scaled to all rows (it is linear in the rows).

Also convexmix's unbounded ``project_simplex`` on the same input, for scale.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import convexmix as cx

CASES = [(1000, 10), (10000, 10), (100, 1000), (1, 1_000_000)]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Entries a timing spans at least (small cases repeat the call within a round).
SPAN = 1_000_000


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


def import_jax(threads: int) -> Any:
    """jax on CPU (float64 enabled), on one thread where ``threads`` is 1; None if absent."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if threads == 1 and "jax" not in sys.modules:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    try:
        import jax
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)
    return jax


def jax_peers(
    jax: Any, xn: np.ndarray, upper: float
) -> dict[str, tuple[Callable[[], Any], Callable[[Any], np.ndarray]]]:
    """name -> (the timed call on a JAX array already made, its output as numpy)."""
    out: dict[str, tuple[Callable[[], Any], Callable[[Any], np.ndarray]]] = {}
    if jax is None:
        return out
    import jax.numpy as jnp

    xj = jnp.asarray(xn)
    dt = xj.dtype
    to_np: Callable[[Any], np.ndarray] = np.asarray
    try:
        from jaxopt.projection import projection_box_section

        def one(row: Any) -> Any:
            k = row.shape[0]
            hp = (jnp.zeros(k, dt), jnp.full(k, upper, dt), jnp.ones(k, dt), 1.0)
            return projection_box_section(row, hp)

        f = jax.jit(jax.vmap(one))
        out["jaxopt box_section"] = (lambda f=f: f(xj).block_until_ready(), to_np)
    except ImportError:
        pass
    try:
        from optax.projections import projection_simplex

        g = jax.jit(jax.vmap(projection_simplex))
        out["optax simplex (no cap)"] = (lambda: g(xj).block_until_ready(), to_np)
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
    fns: dict[str, Callable[[], object]], rounds: int, repeat: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Best wall time and best CPU time (all threads of the process) a call, in
    interleaved rounds of ``repeat`` back-to-back calls each."""
    for f in fns.values():
        f()
        f()
    best = dict.fromkeys(fns, float("inf"))
    cpu = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, f in fns.items():
            c0 = time.process_time()
            t0 = time.perf_counter()
            for _ in range(repeat):
                f()
            best[name] = min(best[name], (time.perf_counter() - t0) / repeat)
            cpu[name] = min(cpu[name], (time.process_time() - c0) / repeat)
    return best, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch and XLA threads")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--cvxpy-rows", type=int, default=20)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    jax = import_jax(torch.get_num_threads())
    dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    versions = f"torch {torch.__version__}"
    if jax is not None:
        versions += f", jax {jax.__version__}"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {load:.2f}, "
        f"{torch.get_num_threads()} torch threads, {versions}, forward only, "
        f"best of {args.rounds} rounds"
    )
    summary: list[str] = []
    detail: list[str] = []
    for rows, k in CASES:
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            torch.manual_seed(0)
            x = torch.randn(rows, k, dtype=torch.float64).to(dtype)
            upper = 1.5 / k
            u_dt = float(torch.tensor(upper, dtype=dtype))  # the cap as the dtype holds it
            ref = reference(x.double(), u_dt)
            outs: dict[str, Any] = {}
            convert: dict[str, Callable[[Any], np.ndarray]] = {}
            fns: dict[str, Callable[[], object]] = {
                "convexmix capped": lambda x=x, u=upper: cx.functional.project_simplex(x, upper=u),
                "convexmix unbounded": lambda x=x: cx.functional.project_simplex(x),
                "plain torch bisection": lambda x=x, u=upper: plain_bisection(x, u),
            }
            for peer, (call, conv) in jax_peers(jax, x.numpy(), upper).items():
                fns[peer] = call
                convert[peer] = conv
            repeat = max(1, SPAN // (rows * k))
            times, cpu = best_times(fns, args.rounds, repeat)
            for peer, f in fns.items():
                outs[peer] = f()
            cvx = cvxpy_peer(k, upper) if k <= 1000 and dtype == torch.float64 else None
            if cvx is not None:
                n = min(rows, args.cvxpy_rows)
                t0 = time.perf_counter()
                outs["cvxpylayers"] = cvx(x[:n])
                times["cvxpylayers"] = (time.perf_counter() - t0) * rows / n
                cpu["cvxpylayers"] = float("nan")
            errors: dict[str, str] = {}
            for peer, out in outs.items():
                if "no cap" in peer or peer == "convexmix unbounded":
                    errors[peer] = "(no cap)"
                    continue
                if isinstance(out, torch.Tensor):
                    got = out.detach().double()
                else:
                    got = torch.as_tensor(np.array(convert.get(peer, np.asarray)(out))).double()
                errors[peer] = f"{(got - ref[: got.shape[0]]).abs().max().item():.1e}"
            base, cbase = times["convexmix capped"], cpu["convexmix capped"]
            for peer, t in times.items():
                note = (
                    f" ({min(rows, args.cvxpy_rows)} rows, scaled)" if peer == "cvxpylayers" else ""
                )
                detail.append(
                    f"| {rows} x {k:.0e} | {name} | {peer}{note} | {t * 1e3:.3f} | {t / base:.2f} "
                    f"| {cpu[peer] * 1e3:.3f} | {cpu[peer] / cbase:.2f} | {errors[peer]} |"
                )
            if "jaxopt box_section" in times:
                jt, jc = times["jaxopt box_section"], cpu["jaxopt box_section"]
                summary.append(
                    f"| {rows} x {k:.0e} | {name} | {base * 1e3:.3f} | {jt * 1e3:.3f} "
                    f"| {base / jt:.2f} | {cbase * 1e3:.3f} | {jc * 1e3:.3f} | {cbase / jc:.2f} "
                    f"| {errors['convexmix capped']} | {errors['jaxopt box_section']} |"
                )
            print(f"done: {rows} x {k} {name}", file=sys.stderr, flush=True)
    if summary:
        print(
            "\n| rows x K | dtype | convexmix wall ms | jaxopt wall ms | convexmix / jaxopt "
            "| convexmix CPU ms | jaxopt CPU ms | convexmix / jaxopt (CPU) "
            "| convexmix max error | jaxopt max error |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(summary))
    print(
        "\n| rows x K | dtype | impl | wall ms | wall / convexmix | CPU ms | CPU / convexmix "
        "| max error vs reference |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(detail))


if __name__ == "__main__":
    main()
