"""convex_combination against the obvious PyTorch code, as ratios to the memory bound.

    python benchmarks/bench_combine.py [--quick] [--no-compile] [--repeats 5]

One run measures the read bandwidth of a reduction over 512 MiB (larger than the
last-level cache), then for each case and implementation prints the time divided by the
bound, the bytes a fused op must move at that bandwidth:

* forward: read K inputs, write 1 output;
* backward, weights only: read the output gradient and the K inputs;
* backward, weights and inputs: the same plus K writes;
* "fwd+bwd w": forward and backward for the weights, both times over both bounds.

"peak extra" is the peak resident memory above what the inputs hold, during a forward
(and a forward + backward for the weights and inputs), in units of one output; it is
read from the kernel's high-water mark, reset before each measurement (Linux).
Implementations: fused (``cx.functional.convex_combination``, its large outputs from
convexmix's cache of freed outputs;
"fused, no cache" with the cache off, so every output is fresh memory from the OS;
"fused out=" into one reused buffer), the seed loop ``sum(w * x for ...)``,
``torch.stack`` + ``tensordot``, and ``torch.compile`` of the loop and of
``convex_combination`` ("compiled fused", ``fullgraph=True``); compile times in the last
column. A time is the best of ``--repeats`` runs, each the mean of enough back-to-back
calls to last 5 ms (one call for the large cases).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import time
from collections.abc import Callable, Iterator

import torch

import convexmix as cx
from convexmix._kernels import native

Impl = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]


def seed_loop(w: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    return sum(wk * x for wk, x in zip(w, xs, strict=True))  # type: ignore[return-value]


def stack_tensordot(w: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensordot(w, torch.stack(xs), dims=1)


def fused(w: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    return cx.functional.convex_combination(w, xs)


@contextlib.contextmanager
def cache_off() -> Iterator[None]:
    """convexmix's output cache off: each output and gradient is fresh memory."""
    with cx.set_cache_limit(0):
        yield


def best_time(f: Callable[[], object], repeats: int) -> float:
    f()
    t0 = time.perf_counter()
    f()
    calls = max(1, int(5e-3 / max(time.perf_counter() - t0, 1e-7)))
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        times.append((time.perf_counter() - t0) / calls)
    return min(times)


_KEEP: list[torch.Tensor] = []


def read_bandwidth(repeats: int) -> float:
    big = torch.ones(1 << 27)  # 512 MiB
    t = best_time(lambda: big.sum(), repeats)
    # Kept alive: on a virtual machine, memory freed in bulk goes back to the host, and the
    # next few hundred MiB of fresh allocations then fault on the host, 5-10x slower. The
    # first case's outputs would pay for the bandwidth probe.
    _KEEP.append(big)
    return big.numel() * 4 / t


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def peak_extra(f: Callable[[], object]) -> float:
    """Peak resident bytes above the current resident set while ``f`` runs."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return float("nan")
    before = _status("VmRSS")
    f()
    return float(_status("VmHWM") - before)


def run_case(
    name: str,
    k: int,
    shape: tuple[int, ...],
    impls: dict[str, Impl],
    bw: float,
    repeats: int,
    compile_loop: bool,
) -> list[str]:
    torch.manual_seed(0)
    xs = [torch.randn(shape) for _ in range(k)]
    w = torch.softmax(torch.randn(k), 0)
    n = xs[0].numel()
    unit = n * 4  # bytes of one output
    bound = {
        "fwd": (k + 1) * unit / bw,
        "fwd+bwd_w": 2 * (k + 1) * unit / bw,
        "bwd_w": (k + 1) * unit / bw,
        "bwd_wx": (2 * k + 1) * unit / bw,
    }
    rows = []
    impls = dict(impls)
    compile_s = {}
    if compile_loop:
        # A fresh compile per case: one shared function would hit Dynamo's recompile limit
        # (8 shapes/grad modes) and silently fall back to eager.
        torch._dynamo.reset()

        def loop(w: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
            return seed_loop(w, xs)

        def mixed(w: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
            return fused(w, xs)

        # The loop as Inductor fuses it, and convexmix inside a compiled graph (one
        # opaque custom op, fullgraph): the cost of each under torch.compile.
        for label, fn, full in (("compiled loop", loop, False), ("compiled fused", mixed, True)):
            compiled = torch.compile(fn, dynamic=False, fullgraph=full)
            t0 = time.perf_counter()
            compiled(w, xs)
            wg = w.clone().requires_grad_()
            xg = [x.clone().requires_grad_() for x in xs]
            compiled(wg, xg).backward(torch.ones(shape))
            compile_s[label] = time.perf_counter() - t0
            impls[label] = compiled
            del wg, xg
    out_buf = torch.empty(shape)
    g = torch.randn(shape)
    for label, f in [*impls.items(), ("fused out=", None)]:
        with cache_off() if label == "fused, no cache" else contextlib.nullcontext():
            rows.append(_row(name, label, f, w, xs, g, out_buf, bound, unit, repeats, compile_s))
    return rows


def _row(
    name: str,
    label: str,
    f: Impl | None,
    w: torch.Tensor,
    xs: list[torch.Tensor],
    g: torch.Tensor,
    out_buf: torch.Tensor,
    bound: dict[str, float],
    unit: int,
    repeats: int,
    compile_s: dict[str, float],
) -> str:
    """One table row: ``f`` (None: the fused op into ``out_buf``) against the bounds."""
    with torch.no_grad():
        if f is None:

            def into_buffer() -> torch.Tensor:
                return cx.functional.convex_combination(w, xs, out=out_buf)

            t_fwd = best_time(into_buffer, repeats)
            mem_fwd = peak_extra(into_buffer)
        else:
            t_fwd = best_time(lambda f=f: f(w, xs), repeats)
            mem_fwd = peak_extra(lambda f=f: f(w, xs))
    cells = [f"{t_fwd / bound['fwd']:.2f}"]
    times = {"fwd": t_fwd}
    mem_bwd = float("nan")
    if f is not None:
        for mode in ("bwd_w", "bwd_wx"):
            wg = w.clone().requires_grad_()
            xg = [x.requires_grad_(mode == "bwd_wx") for x in xs]
            out = f(wg, xg)

            def backward(out: torch.Tensor = out, wg: torch.Tensor = wg, xg: list = xg) -> None:
                wg.grad = None
                for x in xg:
                    x.grad = None
                out.backward(g, retain_graph=True)

            times[mode] = best_time(backward, repeats)
            cells.append(f"{times[mode] / bound[mode]:.2f}")
            if mode == "bwd_wx":
                del out
                for x in xg:
                    x.grad = None
                mem_bwd = peak_extra(lambda f=f, wg=wg, xg=xg: f(wg, xg).backward(g))
            for x in xs:
                x.requires_grad_(False)
                x.grad = None
        both = (times["fwd"] + times["bwd_w"]) / bound["fwd+bwd_w"]
        cells.insert(2, f"{both:.2f}")
    else:
        cells += ["-", "-", "-"]
    mem = f"{mem_fwd / unit:.1f}" + ("" if mem_bwd != mem_bwd else f" / {mem_bwd / unit:.1f}")
    comp = f"{compile_s[label]:.1f}" if label in compile_s else ""
    return f"| {name} | {label} | " + " | ".join(cells) + f" | {mem} | {comp} |"


def _short(n: float) -> str:
    """16000000 -> '16e6', 100000 -> '1e5'."""
    m, e = int(n), 0
    while m and m % 10 == 0:
        m, e = m // 10, e + 1
    return f"{m}e{e}" if e else str(m)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N = 1e5 and 1e6 only")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, nargs="*", default=[2, 8, 32], help="numbers of inputs")
    parser.add_argument("--n", type=float, nargs="*", help="input sizes (default 1e5 and 16e6)")
    parser.add_argument("--no-scalarmix", action="store_true", help="skip the ScalarMix case")
    args = parser.parse_args()
    bw = read_bandwidth(args.repeats)
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, native kernels: "
        f"{native.isa() or 'none (ATen)'}, torch {torch.__version__}, float32; "
        f"read bandwidth (sum over 512 MiB): {bw / 1e9:.1f} GB/s"
    )
    print(
        "bound: bytes a fused op must move / read bandwidth; cells are time / bound "
        f"(min of {args.repeats} runs); peak extra in outputs (forward / forward+backward)\n"
    )
    print("| case | impl | fwd | bwd w | fwd+bwd w | bwd w+x | peak extra | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    ns = args.n or ([100_000, 1_000_000] if args.quick else [100_000, 16_000_000])
    impls: dict[str, Impl] = {
        "fused": fused,
        "fused, no cache": fused,
        "seed loop": seed_loop,
        "stack+tensordot": stack_tensordot,
    }
    cases = [(f"K={k}, N={_short(n)}", k, (n,)) for k in args.k for n in ns]
    if not args.no_scalarmix:
        cases.append(("ScalarMix 25 x (8, 512, 768)", 25, (8, 512, 768)))
    for name, k, shape in cases:
        shape = tuple(int(d) for d in shape)
        for row in run_case(name, k, shape, impls, bw, args.repeats, not args.no_compile):
            print(row, flush=True)
        gc.collect()


if __name__ == "__main__":
    main()
