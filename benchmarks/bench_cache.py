"""The CPU output cache's limit: time of a training step and memory held, by limit.

A step is ``convex_combination`` forward and backward (weights and all K inputs) of the
16M-element float32 case, whose output and K input gradients (64 MiB each) are freed at
the end of the step, as in a training loop. With a limit that holds them, the next step
reuses their blocks; with less, part of them is fresh memory from the OS (page faults and
zeroing). Prints, for each K and limit, the best-of-rounds and median time of a step
(each round a mean over several steps) and the bytes the cache holds after the step, then
the same with the default limit. One run, on this machine; ratios move with the load.

    python benchmarks/bench_cache.py [--n 16000000] [--ks 2 8] [--steps 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import convexmix as cx
from convexmix._kernels import alloc, native
from convexmix.functional import convex_combination

MIB = 1 << 20


def step_time(w: torch.Tensor, xs: list[torch.Tensor], g: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        wg = w.detach().requires_grad_()
        out = convex_combination(wg, xs)
        grads = torch.autograd.grad(out, [wg, *xs], g)
        del out, grads
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16_000_000)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, native ISA "
        f"{native.isa()}, default limit {alloc.default_limit() // MIB} MiB, "
        f"N = {args.n / 1e6:g}e6"
    )
    block = -(-args.n * 4 // (2 * MIB)) * 2 * MIB
    print("| K | limit MiB | step ms (best) | step ms (median) | held after MiB |")
    print("|---|---|---|---|---|")
    for k in args.ks:
        gen = torch.Generator().manual_seed(k)
        xs = [torch.randn(args.n, generator=gen).requires_grad_() for _ in range(k)]
        w = torch.softmax(torch.randn(k, generator=gen), 0)
        g = torch.randn(args.n, generator=gen)
        need = (k + 1) * block  # output + K gradients
        limits = sorted({0, need // 2 // MIB * MIB, need, 256 * MIB, alloc.default_limit()})
        for limit in limits:
            with cx.set_cache_limit(limit):
                cx.empty_cache()
                step_time(w, xs, g, 1)  # fills the cache up to the limit
                times = [step_time(w, xs, g, args.steps) for _ in range(args.rounds)]
                held = cx.cache_info().bytes
            cx.empty_cache()
            note = " (output + K grads)" if limit == need else ""
            note += " (default)" if limit == alloc.default_limit() else ""
            print(
                f"| {k} | {limit // MIB}{note} | {min(times) * 1e3:.1f} | "
                f"{statistics.median(times) * 1e3:.1f} | {held // MIB} |"
            )


if __name__ == "__main__":
    main()
