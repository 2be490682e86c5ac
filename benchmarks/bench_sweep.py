"""The size sweep: ``WeightedSum(K)(xs).sum().backward()`` against the seed loop, every size.

    python benchmarks/bench_sweep.py [--quick] [--k 2 3 8 32] [--p 10 24]
        [--dtype float32 bfloat16] [--grad w wx] [--state fresh warm]
        [--no-compile] [--rounds 5] [--max-gib 1.0] [--json OUT] [--plot PNG]

For each case (K inputs of 2^p elements each, float32 or bfloat16, inputs without
("w": the weights' gradient only) or with ("wx") a gradient of their own), one step of
``WeightedSum(K)`` (forward, ``.sum()``, backward) is timed against the seed loop it
replaces (``torch.softmax`` of the free values, then ``sum(w * x for w, x in
zip(...))``), and, in the warm process, against ``torch.compile`` of that seed loop
(one compiled graph per K, dtype and gradient setting, ``dynamic=True``, compiled
before its first timed round). The three are timed interleaved (a batch of about 2 ms
of each in turn), best of at least ``--rounds`` rounds, so all see the same load.

Each case runs in two process states:

* ``fresh``: a new Python process that runs only that case (its allocator has seen
  nothing else: glibc's mmap threshold at its start value, the output cache empty);
* ``warm``: one long-running process that runs every case in turn, each K's sizes
  in increasing order (so every case after the first follows other sizes).

Cases whose inputs (and their gradients) would exceed ``--max-gib`` GiB are skipped.
``--quick`` runs K in {2, 8}, p in {10, 14, 17, 18, 20, 22}, float32 only. The whole
grid is long (about an hour on two loaded cores); ``--json`` keeps the figures and
``--plot`` draws the heat maps (matplotlib) from them; ``--from-json`` redraws without
measuring. The machine's load (``/proc/loadavg``) is printed before and after. On a
machine with more runnable processes than cores, ``--threads 1`` keeps ATen's OpenMP
teams from waiting on descheduled threads (steps 100-1000x their quiet time).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import convexmix as cx

Fn = Callable[[], object]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def seed_loop(free: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    w = torch.softmax(free, 0)
    return sum(wk * x for wk, x in zip(w, xs, strict=True))  # type: ignore[return-value]


def timed(fns: Sequence[Fn], rounds: int, budget: float, batch: float = 2e-3) -> list[float]:
    """Best seconds per call of each of ``fns``, timed interleaved: each round runs a
    batch of about ``batch`` seconds of each in turn. At least ``rounds`` rounds, more
    (up to 5x) while the case has used less than ``budget`` seconds."""
    counts = []
    for f in fns:
        f()
        t0 = time.perf_counter()
        f()
        counts.append(max(1, int(batch / max(time.perf_counter() - t0, 1e-7))))
    best = [float("inf")] * len(fns)
    gc.collect()
    start, done = time.perf_counter(), 0
    while done < rounds or (time.perf_counter() - start < budget and done < 5 * rounds):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(counts[i]):
                f()
            best[i] = min(best[i], (time.perf_counter() - t0) / counts[i])
        done += 1
    return best


def fits(k: int, p: int, dtype: str, grad: str, max_gib: float) -> bool:
    """Whether the inputs, their gradients and the seed loop's temporaries fit."""
    nbytes = k * (1 << p) * DTYPES[dtype].itemsize
    return nbytes * (3 if grad == "wx" else 2) <= max_gib * (1 << 30)


_compiled: dict[tuple[int, str, str], Callable[..., torch.Tensor]] = {}


def run_case(k: int, p: int, dtype: str, grad: str, rounds: int, compiled: bool) -> dict[str, Any]:
    """One case, timed in this process: seconds per step of convexmix, the seed loop and
    (with ``compiled``) the compiled seed loop."""
    n = 1 << p
    cols = min(n, 1024)
    shape = (n // cols, cols)
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(p * 100 + k)
    xs = [torch.randn(shape, generator=gen).to(dt).requires_grad_(grad == "wx") for _ in range(k)]
    layer = cx.WeightedSum(k).to(dt)
    free = torch.zeros(k, dtype=dt, requires_grad=True)

    def ours() -> None:
        layer(xs).sum().backward()
        layer.free.grad = None
        for x in xs:
            x.grad = None

    def seed() -> None:
        seed_loop(free, xs).sum().backward()
        free.grad = None
        for x in xs:
            x.grad = None

    fns: list[Fn] = [ours, seed]
    if compiled:
        key = (k, dtype, grad)
        if key not in _compiled:
            _compiled[key] = torch.compile(seed_loop, dynamic=True)
        comp = _compiled[key]

        def compiled_seed() -> None:
            comp(free, xs).sum().backward()
            free.grad = None
            for x in xs:
                x.grad = None

        fns.append(compiled_seed)
    budget = 1.0 if p >= 20 else 0.5
    times = timed(fns, rounds, budget)
    out = {"k": k, "p": p, "dtype": dtype, "grad": grad, "ours": times[0], "seed": times[1]}
    if compiled:
        out["compiled"] = times[2]
    return out


def grid(args: argparse.Namespace) -> list[tuple[int, int, str, str]]:
    ks, ps = args.k, list(range(args.p[0], args.p[1] + 1))
    dtypes, grads = args.dtype, args.grad
    if args.quick:
        ks, ps, dtypes = [2, 8], [10, 14, 17, 18, 20, 22], ["float32"]
    return [
        (k, p, d, g)
        for d in dtypes
        for g in grads
        for k in ks
        for p in ps
        if fits(k, p, d, g, args.max_gib)
    ]


def fresh(case: tuple[int, int, str, str], rounds: int) -> dict[str, Any]:
    k, p, d, g = case
    cmd = [sys.executable, __file__, "--one", str(k), str(p), d, g, "--rounds", str(rounds)]
    cmd += ["--threads", str(torch.get_num_threads())]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def line(r: dict[str, Any]) -> str:
    comp = r.get("compiled")
    c = f"{comp * 1e6:10.0f} | {r['ours'] / comp:5.2f}" if comp else "         - |     -"
    return (
        f"| {r['state']:5} | {r['dtype']:8} | {r['grad']:2} | {r['k']:2} | 2^{r['p']:<2} | "
        f"{r['ours'] * 1e6:10.0f} | {r['seed'] * 1e6:10.0f} | {r['ours'] / r['seed']:5.2f} | {c} |"
    )


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Heat maps of the ratios: one panel per (dtype, gradient, state), K by size."""
    from convexmix._optional import require

    plt = require("matplotlib.pyplot", purpose="the sweep's heat maps")
    import numpy as np

    order = {"seed": 0, "compiled": 1, "fresh": 0, "warm": 1, "w": 0, "wx": 1}
    panels = sorted(
        {
            (r["dtype"], r["grad"], r["state"], c)
            for r in results
            for c in ("seed", "compiled")
            if r.get(c)
        },
        key=lambda p: (order[p[3]], p[0], order[p[1]], order[p[2]]),
    )
    ks = sorted({r["k"] for r in results})
    ps = sorted({r["p"] for r in results})
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.4 * rows + 0.6), squeeze=False)
    for ax, (dtype, grad, state, col) in zip(axes.flat, panels, strict=False):
        m = np.full((len(ks), len(ps)), np.nan)
        for r in results:
            if (r["dtype"], r["grad"], r["state"]) == (dtype, grad, state) and r.get(col):
                m[ks.index(r["k"]), ps.index(r["p"])] = r["ours"] / r[col]
        im = ax.imshow(m, cmap="RdYlGn_r", vmin=0.2, vmax=1.8, aspect="auto")
        for i in range(len(ks)):
            for j in range(len(ps)):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(ps)), [str(p) for p in ps], fontsize=7)
        ax.set_yticks(range(len(ks)), [str(k) for k in ks], fontsize=7)
        who = "seed loop" if col == "seed" else "compiled seed loop"
        grads = "inputs with grad" if grad == "wx" else "weights' grad only"
        ax.set_title(f"vs {who}, {state} process\n{dtype}, {grads}", fontsize=8)
        ax.set_xlabel("log2 elements an input", fontsize=7)
        ax.set_ylabel("K", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.colorbar(im, ax=axes, shrink=0.6, label="time ratio convexmix / reference")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="K 2, 8; six sizes; float32")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 8, 32])
    parser.add_argument("--p", type=int, nargs=2, default=[10, 24], metavar=("LO", "HI"))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--grad", nargs="+", default=["w", "wx"], choices=["w", "wx"])
    parser.add_argument("--state", nargs="+", default=["fresh", "warm"], choices=["fresh", "warm"])
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled seed loop")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-gib", type=float, default=1.0, help="skip larger cases")
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads (and the kernels' threads)"
    )
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--from-json", help="plot these figures, measure nothing")
    parser.add_argument("--plot", help="draw the heat maps to this PNG")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # K P DTYPE GRAD (fresh)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        k, p, d, g = args.one
        print(json.dumps(run_case(int(k), int(p), d, g, args.rounds, compiled=False)))
        return
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)["results"]
        if args.plot:
            plot(results, args.plot)
        return
    cases = grid(args)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, convexmix "
        f"{cx.__version__}; {len(cases)} cases; best of >= {args.rounds} interleaved rounds; "
        f"load before: {load()}\n"
    )
    cols = "state | dtype | grad | K | n | convexmix (us) | seed (us) | ratio"
    print(f"| {cols} | compiled (us) | ratio |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    results: list[dict[str, Any]] = []
    for state in args.state:
        for case in cases:
            if state == "fresh":
                r = fresh(case, args.rounds)
            else:
                r = run_case(*case, args.rounds, compiled=not args.no_compile)
            r["state"] = state
            results.append(r)
            print(line(r), flush=True)
    over = [r for r in results if r["ours"] > r["seed"]]
    print(
        f"\n{len(results) - len(over)} of {len(results)} cases at <= 1.0x the seed loop; "
        f"load after: {load()}"
    )
    if args.json:
        meta = {"load_end": load(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
