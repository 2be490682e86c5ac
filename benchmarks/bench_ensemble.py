"""cx.ensemble.fit_weights against SLSQP and Caruana: fit time and loss, in one run.

    python benchmarks/bench_ensemble.py [--repeats 3] [--sizes 50x100000x10 100x100000x10]
        [--no-fd] [--cv-size 20x20000x10] [--stream-size 50x100000x10]
    python benchmarks/bench_ensemble.py --grid [options of bench_ensemble_grid.py]

``--grid`` runs the grid from the sizes people start with (K in {2, 8, 20, 50, 100}, N in
{300, 1000, 10^4, 10^5}, 2 or 10 classes or mse; cold and warm; one thread and each at
its faster setting) against SLSQP: ``bench_ensemble_grid.py``, whose options narrow it.

For each size K x N x C (K models, N samples, C classes; float64 class probabilities of
synthetic models of mixed quality, made by a softmax of a class signal plus independent
noise, so that the optimum blends several of them) it times, from the (K, N, C) array to
the weights:

* convexmix: ``fit_weights(P, y)`` with its input checks;
* SLSQP, finite differences: the blend script found in many Kaggle kernels: a Python
  loop ``sum(w_k * P_k)`` and ``sklearn.metrics.log_loss`` as the objective, scipy's
  default SLSQP (numerical gradient, ``ftol=1e-6``);
* SLSQP, analytic gradient: the objective computes the blend from the full predictions
  with ``np.tensordot``, the gradient from the precomputed true-class probabilities;
  scipy's default options;
* SLSQP on the reduced problem: objective and gradient both on the (K, N) true-class
  probabilities, ``ftol=1e-12`` (the strongest SLSQP set-up we know);
* Caruana: ``ensemble_selection(P, y, size=50)``.

It prints each method's time and CPU time (of the whole process, best of the runs each),
each divided by convexmix's, its log-loss and its loss above the optimum (convexmix's
loss, certified by its Frank-Wolfe gap). On a shared machine the CPU-time ratio is the
steadier one: the wall time also counts the time other processes hold the cores.
Without ``--threads`` it then times convexmix and the analytic-gradient SLSQP again at
the default threads and at one thread each (BLAS threads through threadpoolctl), in
interleaved rounds, and prints the ratio with both at the default, both at one thread,
and each at its faster setting.

Then, against the code they replaced (kept here as references, measured in the same run):

* Caruana's selection (50 picks): today's incremental running sum with a lower bound
  that skips most models' logarithms, against the full K x N recomputation per pick;
* the ``regularization="cv"`` guard: fits warm-started along the lambda path, against
  60 cold starts (the module ``src/convexmix/ensemble.py`` of commit 93cfb56, read with
  ``git show`` into a temporary module: ``--before-ref``; skipped outside a git checkout);
* a streamed fit of a float32 ``.npy`` file: time, and the growth of the anonymous RSS
  against the file's size;
* ``bootstrap(n=200)``, cold and warm-started, against 200 ``fit_weights`` calls.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize

from convexmix.ensemble import bootstrap, ensemble_selection, fit_weights
from convexmix.ensemble._factory import make_objective
from convexmix.ensemble._log_loss import LogLoss
from convexmix.ensemble._selection import select


def make_problem(K: int, N: int, C: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (N,), generator=g)
    signal = torch.rand(K, 1, 1, generator=g, dtype=torch.float64) * 2 + 0.5
    noise = torch.rand(K, 1, 1, generator=g, dtype=torch.float64) * 2 + 1
    P = torch.randn(K, N, C, generator=g, dtype=torch.float64).mul_(noise)
    P.view(K, N * C)[:, torch.arange(N) * C + y] += signal.view(K, 1)
    torch.softmax(P, -1, out=P)
    return P.numpy(), y.numpy()


def constraints(K: int) -> tuple[list[tuple[float, float]], list[dict[str, Any]]]:
    return [(0.0, 1.0)] * K, [{"type": "eq", "fun": lambda w: np.sum(w) - 1.0}]


def slsqp_finite_differences(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    from sklearn.metrics import log_loss

    labels = np.arange(P.shape[2])

    def objective(weights: np.ndarray) -> float:
        final = 0.0
        for weight, prediction in zip(weights, P, strict=True):
            final = final + weight * prediction
        return float(log_loss(y, final, labels=labels))

    bounds, cons = constraints(P.shape[0])
    start = np.full(P.shape[0], 1.0 / P.shape[0])
    return np.asarray(minimize(objective, start, method="SLSQP", bounds=bounds, constraints=cons).x)


def slsqp_analytic(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    N = P.shape[1]
    rows = np.arange(N)
    q = P[:, rows, y]

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        blend = np.tensordot(w, P, axes=1)[rows, y]
        return float(-np.log(blend).mean()), -(q / blend).mean(1)

    bounds, cons = constraints(P.shape[0])
    start = np.full(P.shape[0], 1.0 / P.shape[0])
    res = minimize(objective, start, jac=True, method="SLSQP", bounds=bounds, constraints=cons)
    return np.asarray(res.x)


def slsqp_reduced(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    q = P[:, np.arange(P.shape[1]), y]

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        u = w @ q
        return float(-np.log(u).mean()), -(q / u).mean(1)

    bounds, cons = constraints(P.shape[0])
    start = np.full(P.shape[0], 1.0 / P.shape[0])
    res = minimize(
        objective,
        start,
        jac=True,
        method="SLSQP",
        bounds=bounds,
        constraints=cons,
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    return np.asarray(res.x)


def log_loss(w: np.ndarray, q: np.ndarray) -> float:
    w = np.clip(w, 0.0, None)
    return float(-np.log(np.maximum(w @ q, 1e-15)).mean())


def build_methods(
    P: np.ndarray, y: np.ndarray, repeats: int, fd_repeats: int
) -> dict[str, tuple[Callable[[], np.ndarray], int]]:
    Pt, yt = torch.from_numpy(P), torch.from_numpy(y)
    return {
        "convexmix fit_weights": (lambda: np.asarray(fit_weights(Pt, yt).weights), repeats),
        "SLSQP, finite differences": (lambda: slsqp_finite_differences(P, y), fd_repeats),
        "SLSQP, analytic gradient": (lambda: slsqp_analytic(P, y), repeats),
        "SLSQP, reduced, ftol 1e-12": (lambda: slsqp_reduced(P, y), repeats),
        "Caruana (50)": (lambda: np.asarray(ensemble_selection(Pt, yt, size=50).weights), repeats),
    }


def caruana_before(obj: LogLoss, size: int = 50) -> np.ndarray:
    """The selection as it was: each pick recomputes the K x N blends and their logs."""
    q, s = obj.q, obj.s
    counts = torch.zeros(obj.K, dtype=torch.float64)
    for m in range(size):
        u = (q + counts @ q).div_(m + 1)
        values = -(torch.log(u) @ s)
        counts[int(values.argmin())] += 1
    return (counts / size).numpy()


#: The commit whose single-module ensemble is the cv guard's "before" reference.
BEFORE_REF = "93cfb56"


def load_before(ref: str) -> Any:
    """The ensemble module of commit ``ref`` (``git show REF:src/convexmix/ensemble.py``)
    as a module of its own, or None outside a git checkout. It imports only
    ``convexmix.errors`` and the map registry, which today's package still has."""
    import importlib.util
    import os
    import subprocess
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        source = subprocess.run(
            ["git", "-C", root, "show", f"{ref}:src/convexmix/ensemble.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location("_convexmix_ensemble_before", fh.name)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(fh.name)
    return module


def cv_before(before: Any, P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The cross-validated guard as it was (``BEFORE_REF``): every fit of the path from a
    cold start, to tol."""
    fit = before.fit_weights(torch.from_numpy(P), torch.from_numpy(y), regularization="cv")
    return np.asarray(fit.weights.numpy())


def anon_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def streamed(path: str, y: np.ndarray) -> tuple[float, int]:
    """Time of a fit on a .npy path and the peak growth of the anonymous RSS."""
    import threading

    base = peak = anon_rss()
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, anon_rss())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    fit_weights(path, y)
    t = time.perf_counter() - t0
    done.set()
    watcher.join()
    return t, max(peak, anon_rss()) - base


def interleaved(pairs: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, float]:
    """Best time of each function over ``repeats`` rounds that run them back to back."""
    best = dict.fromkeys(pairs, float("inf"))
    for _ in range(repeats):
        for name, f in pairs.items():
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def timed(f: Callable[[], np.ndarray], repeats: int) -> tuple[float, float, np.ndarray]:
    """Best wall time, best CPU time of the process (all its threads) and the result.

    On a shared machine the wall time includes the time other processes hold the cores;
    the CPU time does not (it still feels their use of the memory bus and caches)."""
    best, cpu, out = float("inf"), float("inf"), np.empty(0)
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = f()
        best = min(best, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return best, cpu, out


def thread_settings(P: np.ndarray, y: np.ndarray, repeats: int) -> None:
    """convexmix and SLSQP (analytic gradient) at the default threads and at one thread
    each (torch's threads, and numpy/scipy's BLAS threads through threadpoolctl), in
    interleaved rounds: SLSQP's small matrix-vector products get slower with a second
    BLAS thread, convexmix's passes faster, so each method's faster setting is compared
    too."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("  (threadpoolctl is not installed: no per-thread comparison)")
        return
    Pt, yt = torch.from_numpy(P), torch.from_numpy(y)
    default = torch.get_num_threads()

    def cx(threads: int) -> Callable[[], Any]:
        def run() -> Any:
            torch.set_num_threads(threads)
            try:
                return fit_weights(Pt, yt)
            finally:
                torch.set_num_threads(default)

        return run

    def sl(threads: int | None) -> Callable[[], Any]:
        def run() -> Any:
            with threadpool_limits(threads):
                return slsqp_analytic(P, y)

        return run

    best = interleaved(
        {
            ("convexmix", default): cx(default),
            ("convexmix", 1): cx(1),
            ("SLSQP", default): sl(None),
            ("SLSQP", 1): sl(1),
        },
        repeats,
    )
    print(f"  SLSQP (analytic gradient) / convexmix by threads (interleaved, best of {repeats}):")
    rows = [
        (f"both at {default} threads (the default)", default, default),
        ("both at 1 thread", 1, 1),
    ]
    cx_fast = min((default, 1), key=lambda n: best[("convexmix", n)])
    sl_fast = min((default, 1), key=lambda n: best[("SLSQP", n)])
    rows.append((f"each at its faster (convexmix {cx_fast}, SLSQP {sl_fast})", cx_fast, sl_fast))
    for label, a, b in rows:
        t_cx, t_sl = best[("convexmix", a)], best[("SLSQP", b)]
        print(f"    {label:42s} {t_cx:7.3f}s {t_sl:7.3f}s {t_sl / t_cx:5.1f}x")


def main() -> None:
    import sys

    if sys.argv[1:2] == ["--grid"]:
        import bench_ensemble_grid

        sys.argv = [bench_ensemble_grid.__file__, *sys.argv[2:]]
        bench_ensemble_grid.main()
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--sizes", nargs="+", default=["50x100000x10", "100x100000x10"])
    parser.add_argument(
        "--fd-repeats", type=int, default=1, help="runs of the (slow) finite-difference SLSQP"
    )
    parser.add_argument("--no-fd", action="store_true", help="skip finite-difference SLSQP")
    parser.add_argument(
        "--before-ref", default=BEFORE_REF, help="git ref of the cv guard's 'before' code"
    )
    parser.add_argument("--cv-size", default="20x20000x10", help="K x N x C of the cv guard")
    parser.add_argument("--stream-size", default="50x100000x10", help="the streamed file")
    parser.add_argument("--boot-size", default="8x2000x10", help="K x N x C of bootstrap")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch and BLAS threads (0: leave the default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.threads)
        except ImportError:
            pass
    import os

    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load}; best of {args.repeats} runs\n"
    )
    for size in args.sizes:
        K, N, C = (int(v) for v in size.split("x"))
        P, y = make_problem(K, N, C)
        q = P[:, np.arange(N), y]
        fit_weights(P[:, :1000], y[:1000])  # warm-up of torch's kernels
        methods = build_methods(P, y, args.repeats, args.fd_repeats)
        if args.no_fd:
            del methods["SLSQP, finite differences"]
        results = {name: timed(f, reps) for name, (f, reps) in methods.items()}
        t_ref, c_ref, w_ref = results["convexmix fit_weights"]
        best = log_loss(w_ref, q)
        print(f"K={K} models, N={N} samples, C={C} classes ({P.nbytes / 1e6:.0f} MB)")
        print(
            f"  {'method':28s} {'time':>9s} {'x convexmix':>12s} {'CPU time':>9s} "
            f"{'x convexmix':>12s} {'log-loss':>12s} {'above opt':>10s}"
        )
        for name, (t, c, w) in results.items():
            loss = log_loss(w, q)
            print(
                f"  {name:28s} {t:8.3f}s {t / t_ref:11.1f}x {c:8.3f}s {c / c_ref:11.1f}x "
                f"{loss:12.8f} {loss - best:10.1e}"
            )
        print(f"  convexmix weights used: {int((w_ref > 0).sum())} of {K}")
        t_sl, c_sl, _ = results["SLSQP, analytic gradient"]
        print(
            f"  SLSQP (analytic gradient) / convexmix: {t_sl / t_ref:.1f}x in time, "
            f"{c_sl / c_ref:.1f}x in CPU time (target >= 5x)"
        )
        if not args.threads:
            thread_settings(P, y, args.repeats)
        obj = make_objective(P, y, "log_loss", None, True)
        assert isinstance(obj, LogLoss)
        before = interleaved(
            {
                "before": lambda obj=obj: caruana_before(obj),
                "after": lambda obj=obj: select(obj, 50, False, None),
            },
            args.repeats,
        )
        np.testing.assert_array_equal(caruana_before(obj), select(obj, 50, False, None)[0])
        print(
            f"  Caruana's 50 picks (same picks): full recomputation {before['before']:.3f}s, "
            f"incremental {before['after']:.3f}s: {before['after'] / before['before']:.2f} "
            "of before (target <= 0.33)\n"
        )

    K, N, C = (int(v) for v in args.cv_size.split("x"))
    P, y = make_problem(K, N, C)
    before_module = load_before(args.before_ref)
    if before_module is None:
        print(f"cv guard: no git checkout with {args.before_ref}: no 'before' reference")
    else:
        cv = interleaved(
            {
                "before": lambda: cv_before(before_module, P, y),
                "after": lambda: np.asarray(fit_weights(P, y, regularization="cv").weights),
            },
            args.repeats,
        )
        print(
            f"cv guard, K={K} N={N} C={C} (5 folds x 12 lambdas): cold starts "
            f"{cv['before']:.3f}s, warm-started path {cv['after']:.3f}s: "
            f"{cv['after'] / cv['before']:.2f} of before (target <= 0.33)"
        )
        np.testing.assert_allclose(
            cv_before(before_module, P, y),
            np.asarray(fit_weights(P, y, regularization="cv").weights),
            atol=1e-7,
        )

    K, N, C = (int(v) for v in args.boot_size.split("x"))
    P, y = make_problem(K, N, C)
    Pt, yt = torch.from_numpy(P), torch.from_numpy(y)
    t0 = time.perf_counter()
    bs = bootstrap(Pt, yt, n=200)
    t_boot = time.perf_counter() - t0
    t0 = time.perf_counter()
    bootstrap(Pt, yt, n=200, warm_start=True)
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(200):
        fit_weights(Pt, yt, sample_weight=bs.sample_weights[i])
    t_cold = time.perf_counter() - t0
    print(
        f"bootstrap n=200, K={K} N={N} C={C}: {t_boot:.3f}s, warm-started {t_warm:.3f}s; "
        f"200 separate fit_weights calls {t_cold:.3f}s ({t_cold / t_boot:.1f}x)"
    )

    import tempfile

    K, N, C = (int(v) for v in args.stream_size.split("x"))
    P, y = make_problem(K, N, C)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.npy")
        np.save(path, P.astype(np.float32))
        size = os.path.getsize(path)
        t, grown = streamed(path, y)
        print(
            f"streamed float32 .npy, K={K} N={N} C={C} ({size / 1e6:.0f} MB): {t:.3f}s, "
            f"anonymous RSS grew by {grown / 1e6:.0f} MB ({grown / size:.2f} of the file)"
        )
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
