"""Forward + backward of the sparse maps: time and memory saved for backward.

    python benchmarks/bench_maps.py [--quick]

For each map and size, one run prints, as ratios to convexmix:
  * time of forward + backward (median of repeats),
  * bytes that autograd keeps alive for the backward (counted exactly with
    ``torch.autograd.graph.saved_tensors_hooks``; deterministic, unlike RSS).
Baselines: the obvious pure-torch autograd code (sort, cumsum, gather, clamp, and
autograd through all of it), and the peer library ``entmax`` when installed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

import convexmix as cx

Fn = Callable[[torch.Tensor], torch.Tensor]


def naive_sparsemax(x: torch.Tensor) -> torch.Tensor:
    """The sort-based sparsemax as usually written, differentiated by autograd."""
    zs = torch.sort(x, dim=-1, descending=True).values
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    cs = zs.cumsum(-1)
    kstar = (1 + k * zs > cs).sum(-1, keepdim=True)
    tau = (cs.gather(-1, kstar - 1) - 1) / kstar
    return (x - tau).clamp_min(0)


def naive_entmax15(x: torch.Tensor) -> torch.Tensor:
    """The sort-based 1.5-entmax as usually written, differentiated by autograd."""
    z = x / 2
    zs = torch.sort(z, dim=-1, descending=True).values
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    mean = zs.cumsum(-1) / k
    ss = (zs * zs).cumsum(-1) / k - mean * mean
    tau = mean - ((1 - k * ss) / k).clamp_min(0).sqrt()
    kstar = (tau <= zs).sum(-1, keepdim=True)
    return (z - tau.gather(-1, kstar - 1)).clamp_min(0) ** 2


def saved_bytes(f: Fn, x: torch.Tensor) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(x)
    return total


def timed(f: Fn, x: torch.Tensor, repeats: int) -> float:
    g = torch.randn_like(x)
    times = []
    for _ in range(repeats + 1):
        xi = x.detach().requires_grad_()
        t0 = time.perf_counter()
        (f(xi) * g).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    args = parser.parse_args()
    torch.manual_seed(0)
    sizes = (
        [(64, 1000), (4, 100_000)] if args.quick else [(256, 1000), (16, 100_000), (1, 1_000_000)]
    )
    repeats = 3 if args.quick else 7
    maps: dict[str, dict[str, Fn]] = {
        "sparsemax": {"convexmix": cx.functional.sparsemax, "naive torch": naive_sparsemax},
        "entmax15": {"convexmix": cx.functional.entmax15, "naive torch": naive_entmax15},
    }
    try:
        import entmax

        maps["sparsemax"]["entmax pkg"] = lambda x: entmax.sparsemax(x, -1)
        maps["entmax15"]["entmax pkg"] = lambda x: entmax.entmax15(x, -1)
    except ImportError:
        pass
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32"
    )
    print("| map | B x K | impl | fwd+bwd ms | time / convexmix | saved MB | saved / convexmix |")
    print("|---|---|---|---|---|---|---|")
    for name, impls in maps.items():
        for b, k in sizes:
            x = torch.randn(b, k)
            base_t = timed(impls["convexmix"], x, repeats)
            base_m = saved_bytes(impls["convexmix"], x.requires_grad_())
            for impl, f in impls.items():
                t = base_t if impl == "convexmix" else timed(f, x, repeats)
                m = saved_bytes(f, x.detach().requires_grad_())
                print(
                    f"| {name} | {b} x {k} | {impl} | {t * 1e3:.1f} | {t / base_t:.2f} | "
                    f"{m / 2**20:.1f} | {m / base_m:.2f} |"
                )


if __name__ == "__main__":
    main()
