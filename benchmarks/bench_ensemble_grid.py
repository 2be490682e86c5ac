"""fit_weights against SLSQP from the sizes people start with up: cold and warm, in one run.

    python benchmarks/bench_ensemble_grid.py [--K 2 8 20 50 100] [--N 300 1000 10000 100000]
        [--classes 2 10 mse] [--modes cold warm] [--threads 1 default] [--repeats 5]
        [--max-values 10000000]

The grid runs in pieces: each option narrows it (the machine is shared; a full grid with
both modes and thread settings is 60 cases x 8 fresh processes). For each case, K models
and N rows:

* classes 2 or 10: (K, N, C) class probabilities of synthetic models of mixed quality
  (a softmax of a class signal plus independent noise), log-loss;
* mse: (K, N) regression predictions of targets in [25, 341] (the scale of
  scikit-learn's diabetes) with independent noise of different sizes, ``loss="mse"``.

It times ``fit_weights(P, y)`` (numpy in, numpy out, its input checks included) and
SLSQP with the analytic gradient: for log-loss the objective and gradient on the (K, N)
probabilities of the true class (gathered inside the timed call), for mse on the
predictions, both with the constraint's Jacobian and ``ftol=1e-12`` (the setting that
reaches the optimum; scipy's default 1e-6 stops above it).

* cold: the first call in a fresh process, after ``import convexmix`` (or
  ``scipy.optimize``), as the command line and the demo run it; the problem is made
  with numpy so that nothing of torch has run before the call;
* warm: the best of ``--repeats`` interleaved rounds in one process.

``--threads 1``: one thread each (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
``OPENBLAS_NUM_THREADS`` set to 1 for cold runs; torch's threads and threadpoolctl's
limit for warm ones); ``default``: the library defaults. With both, the table gives each
method at its faster setting too. Columns: times in ms, the ratio convexmix / SLSQP
(below 1: convexmix is faster), and SLSQP's loss above convexmix's optimum, relative to
the loss's scale (negative: SLSQP found a lower value; convexmix's Frank-Wolfe gap bounds
how much lower it can be).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

MSE_LO, MSE_HI = 25.0, 341.0


def make_problem(K: int, N: int, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(K, N, C) probabilities and labels, or (K, N) regression predictions and targets."""
    rng = np.random.default_rng(seed)
    if kind == "mse":
        y = MSE_LO + (MSE_HI - MSE_LO) * rng.random(N)
        noise = 10 + 60 * rng.random((K, 1))
        return y + noise * rng.standard_normal((K, N)), y
    C = int(kind)
    y = rng.integers(0, C, N)
    signal = rng.random((K, 1, 1)) * 2 + 0.5
    noise = rng.random((K, 1, 1)) * 2 + 1
    P = rng.standard_normal((K, N, C)) * noise
    P[:, np.arange(N), y] += signal[:, :, 0]
    P -= P.max(-1, keepdims=True)
    np.exp(P, out=P)
    P /= P.sum(-1, keepdims=True)
    return P, y


def slsqp(P: np.ndarray, y: np.ndarray, kind: str) -> np.ndarray:
    """SLSQP with the analytic gradient, ftol 1e-12, the constraint's Jacobian."""
    from scipy.optimize import minimize

    K, N = P.shape[:2]
    if kind == "mse":

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            r = w @ P - y
            return float(r @ r) / N, (2.0 / N) * (P @ r)

    else:
        q = np.maximum(P[:, np.arange(N), y], 1e-15)

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            u = w @ q
            return float(-np.log(u).mean()), -(q / u).mean(1)

    res = minimize(
        objective,
        np.full(K, 1.0 / K),
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * K,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(K)}],
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    w = np.clip(res.x, 0.0, None)
    return np.asarray(w / w.sum())


def loss_of(w: np.ndarray, P: np.ndarray, y: np.ndarray, kind: str) -> float:
    if kind == "mse":
        r = w @ P - y
        return float(r @ r) / len(y)
    q = np.maximum(P[:, np.arange(len(y)), y], 1e-15)
    return float(-np.log(np.maximum(w @ q, 1e-15)).mean())


def scale_of(y: np.ndarray, kind: str) -> float:
    return float((y**2).mean()) if kind == "mse" else 1.0


def child(method: str, K: int, N: int, kind: str) -> None:
    """One cold call in this fresh process; prints the time and the weights as JSON."""
    if method == "convexmix":
        import convexmix as cx

        P, y = make_problem(K, N, kind)
        t0 = time.perf_counter()
        fit = cx.ensemble.fit_weights(P, y, loss="mse" if kind == "mse" else "log_loss")
        t = time.perf_counter() - t0
        w = np.asarray(fit.weights)
    else:
        import scipy.optimize  # noqa: F401

        P, y = make_problem(K, N, kind)
        t0 = time.perf_counter()
        w = slsqp(P, y, kind)
        t = time.perf_counter() - t0
    print(json.dumps({"t": t, "w": w.tolist()}))


def cold(method: str, K: int, N: int, kind: str, threads: str) -> tuple[float, np.ndarray]:
    env = dict(os.environ)
    if threads == "1":
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, str(K), str(N), kind],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    data = json.loads(out.strip().splitlines()[-1])
    return float(data["t"]), np.asarray(data["w"])


def warm(
    K: int, N: int, kind: str, threads: str, repeats: int
) -> dict[str, tuple[float, np.ndarray]]:
    import torch
    from threadpoolctl import threadpool_limits

    import convexmix as cx

    P, y = make_problem(K, N, kind)
    loss = "mse" if kind == "mse" else "log_loss"
    default = torch.get_num_threads()
    best: dict[str, tuple[float, np.ndarray]] = {}
    torch.set_num_threads(1 if threads == "1" else default)
    try:
        with threadpool_limits(1 if threads == "1" else None):
            for _ in range(repeats):
                for name in ("convexmix", "SLSQP"):
                    t0 = time.perf_counter()
                    if name == "convexmix":
                        w = np.asarray(cx.ensemble.fit_weights(P, y, loss=loss).weights)
                    else:
                        w = slsqp(P, y, kind)
                    t = time.perf_counter() - t0
                    if name not in best or t < best[name][0]:
                        best[name] = (t, w)
    finally:
        torch.set_num_threads(default)
    return best


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--K", type=int, nargs="+", default=[2, 8, 20, 50, 100])
    parser.add_argument("--N", type=int, nargs="+", default=[300, 1000, 10_000, 100_000])
    parser.add_argument("--classes", nargs="+", default=["2", "10", "mse"])
    parser.add_argument("--modes", nargs="+", default=["cold", "warm"])
    parser.add_argument("--threads", nargs="+", default=["1", "default"])
    parser.add_argument("--repeats", type=int, default=5, help="warm: best of this many")
    parser.add_argument(
        "--cold-repeats", type=int, default=1, help="cold: best of this many fresh processes"
    )
    parser.add_argument(
        "--max-values", type=float, default=1e8, help="skip cases with K * N * C above this"
    )
    args = parser.parse_args()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"{os.cpu_count()} cores, load average {load} at the start")
    header = (
        f"{'mode':5s} {'threads':8s} {'K':>4s} {'N':>7s} {'loss':>5s} {'convexmix':>10s} "
        f"{'SLSQP':>10s} {'ratio':>7s} {'SLSQP above':>12s}"
    )
    print(header)
    for kind in args.classes:
        for K in args.K:
            for N in args.N:
                C = 1 if kind == "mse" else int(kind)
                if args.max_values < K * N * C:
                    continue
                P, y = make_problem(K, N, kind)
                scale = scale_of(y, kind)
                for mode in args.modes:
                    times: dict[tuple[str, str], tuple[float, np.ndarray]] = {}
                    for threads in args.threads:
                        if mode == "warm":
                            for name, tw in warm(K, N, kind, threads, args.repeats).items():
                                times[name, threads] = tw
                        else:
                            for _ in range(args.cold_repeats):
                                for name in ("convexmix", "SLSQP"):
                                    tw = cold(name, K, N, kind, threads)
                                    old = times.get((name, threads))
                                    if old is None or tw[0] < old[0]:
                                        times[name, threads] = tw
                    rows = [(t, t, t) for t in args.threads]
                    if len(args.threads) > 1:
                        cx_fast = min(args.threads, key=lambda t: times["convexmix", t][0])
                        sl_fast = min(args.threads, key=lambda t: times["SLSQP", t][0])
                        rows.append(("each best", cx_fast, sl_fast))
                    for label, a, b in rows:
                        (t_cx, w_cx), (t_sl, w_sl) = times["convexmix", a], times["SLSQP", b]
                        above = (loss_of(w_sl, P, y, kind) - loss_of(w_cx, P, y, kind)) / scale
                        print(
                            f"{mode:5s} {label:8s} {K:4d} {N:7d} {kind:>5s} "
                            f"{1e3 * t_cx:9.2f}ms {1e3 * t_sl:9.2f}ms {t_cx / t_sl:6.2f}x "
                            f"{above:12.1e}",
                            flush=True,
                        )
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average {load} at the end")


if __name__ == "__main__":
    main()
