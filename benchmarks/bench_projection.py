"""project_simplex against a plain torch sort-based projection and the entmax package.

    python benchmarks/bench_projection.py [--repeats 5]

One run, float32, forward only. For K in {10, 1e3, 1e6} and several batch sizes it
prints the time of each implementation and its speed-up over the plain sort-based
projection (the code that floats around: sort, cumsum, threshold; 1-D per row, no
custom backward). Also the worst |sum - 1| and the max difference to convexmix's "sort".
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from bench_maps import naive_sparsemax

import convexmix as cx

Fn = Callable[[torch.Tensor], torch.Tensor]


def best_time(f: Callable[[], object], repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    impls: dict[str, Fn] = {
        "plain torch sort": naive_sparsemax,
        "cx sort": lambda x: cx.functional.project_simplex(x, method="sort"),
        "cx bisect": lambda x: cx.functional.project_simplex(x, method="bisect"),
        "cx condat": lambda x: cx.functional.project_simplex(x, method="condat"),
        "cx auto": lambda x: cx.functional.project_simplex(x),
    }
    try:
        import entmax

        impls["entmax pkg sparsemax"] = lambda x: entmax.sparsemax(x, -1)
    except ImportError:
        pass
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, float32, forward only, best of {args.repeats}"
    )
    print(
        "| K | batch | impl | ms | speed-up vs plain sort | max abs(sum-1) | max diff to cx sort |"
    )
    print("|---|---|---|---|---|---|---|")
    cases = [(10, 1), (10, 4096), (1000, 1), (1000, 1024), (1_000_000, 1), (1_000_000, 16)]
    for k, b in cases:
        torch.manual_seed(0)
        x = torch.randn(b, k)
        ref = cx.functional.project_simplex(x, method="sort")
        base = best_time(lambda x=x: naive_sparsemax(x), args.repeats)
        for name, f in impls.items():
            t = (
                base
                if name == "plain torch sort"
                else best_time(lambda f=f, x=x: f(x), args.repeats)
            )
            out = f(x)
            err = (out.double().sum(-1) - 1).abs().max().item()
            diff = (out - ref).abs().max().item()
            cells = [f"{k:.0e}", str(b), name, f"{t * 1e3:.3f}", f"{base / t:.1f}", f"{err:.1e}"]
            print("| " + " | ".join([*cells, f"{diff:.1e}"]) + " |", flush=True)


if __name__ == "__main__":
    main()
