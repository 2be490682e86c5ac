"""Per-call cost at everyday sizes: convexmix against the code it replaces, fwd + bwd.

    python benchmarks/bench_overhead.py [--rounds 7] [--quick] [--only TEXT ...]

One run prints, for each case, the time of convexmix and of the naive code or peer
(forward and backward, ``out.backward(g)``) and the ratio convexmix / naive. Each pair
is timed interleaved (a ~1 ms batch of convexmix calls, then one of naive calls, and
again), best of at least ``--rounds`` rounds, so that both see the same machine load.

The grid:

* ``WeightedSum(K)`` vs the seed loop (``torch.softmax`` of the free values, then
  ``sum(w * x for w, x in zip(...))``), K in {2, 3, 8, 32} x inputs (64, 256),
  (32, 1024), (256, 1024), (8, 128, 768);
* each map vs its peer at (1, 8), (256, 8), (4096, 10), (64, 1000), (16, 100000):
  ``softmax`` vs ``torch.softmax``; ``softmax(mask=)`` vs ``masked_fill`` + ``softmax``;
  ``sparsemax``, ``entmax15`` and ``entmax`` (bisection, alpha = 1.5) vs the ``entmax``
  package (``sparsemax``, ``entmax15``, ``entmax_bisect``); ``stick_breaking`` vs
  ``torch.distributions``' ``StickBreakingTransform``;
* ``project_simplex`` (forward) vs the plain sort projection at (10000, 10),
  (1000, 1000), (1, 1e6);
* the per-call floor: ``convex_combination`` of two (1, 2) inputs vs one ``torch.add``;
  also ``ScalarMix``, ``SimplexWeights`` and ``simplex_`` against their plain versions.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from collections.abc import Callable

import torch
from torch.nn.utils import parametrize

import convexmix as cx

Fn = Callable[[], object]


def pair(
    a: Fn, b: Fn, rounds: int, batch: float = 1e-3, budget: float = 4.0
) -> tuple[float, float]:
    """Best seconds per call of ``a`` and of ``b``, timed interleaved.

    Each round times a batch of about ``batch`` seconds of ``a``, then one of ``b``; the
    best of the rounds is kept. Short batches fit between the scheduler's interruptions
    on a shared machine, so the best round is a quiet one for both. At least ``rounds``
    rounds, more while the case has used less than ``budget`` seconds (at most 10x)."""
    counts = []
    for f in (a, b):
        f()
        f()
        t0 = time.perf_counter()
        f()
        counts.append(max(1, int(batch / max(time.perf_counter() - t0, 1e-7))))
    best = [float("inf"), float("inf")]
    gc.collect()
    start = time.perf_counter()
    done = 0
    while done < rounds or (time.perf_counter() - start < budget and done < 10 * rounds):
        for i, f in enumerate((a, b)):
            n = counts[i]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            best[i] = min(best[i], (time.perf_counter() - t0) / n)
        done += 1
    return best[0], best[1]


ROWS: list[tuple[str, float, float]] = []


#: Substrings of the case names to run (``--only``); empty: every case.
ONLY: list[str] = []


def report(name: str, a: Fn, b: Fn, rounds: int) -> None:
    if ONLY and not any(s in name for s in ONLY):
        return
    ta, tb = pair(a, b, rounds)
    ROWS.append((name, ta, tb))
    print(f"| {name} | {ta * 1e6:9.1f} | {tb * 1e6:9.1f} | {ta / tb:5.2f} |", flush=True)


def fwd_bwd(f: Callable[[], torch.Tensor], g: torch.Tensor) -> Fn:
    return lambda: f().backward(g)


def seed_loop(w: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    return sum(wk * x for wk, x in zip(w, xs, strict=True))  # type: ignore[return-value]


def weighted_sum_cases(rounds: int, quick: bool) -> None:
    shapes = [(64, 256), (32, 1024), (256, 1024), (8, 128, 768)]
    for k in (2, 3, 8, 32):
        for shape in shapes[:2] if quick else shapes:
            layer = cx.WeightedSum(k)
            free = torch.zeros(k, requires_grad=True)
            xs = [torch.randn(*shape, requires_grad=True) for _ in range(k)]
            g = torch.randn(*shape)
            report(
                f"WeightedSum({k}) {k} x {shape}",
                fwd_bwd(lambda layer=layer, xs=xs: layer(xs), g),
                fwd_bwd(lambda free=free, xs=xs: seed_loop(torch.softmax(free, 0), xs), g),
                rounds,
            )


def map_cases(rounds: int, quick: bool) -> None:
    try:
        import entmax as peer
    except ImportError:  # pragma: no cover - the [test] extra has it
        peer = None
        print("(entmax is not installed: pip install entmax; its rows are skipped)")
    shapes = [(1, 8), (256, 8), (4096, 10), (64, 1000), (16, 100000)]
    stick = torch.distributions.transforms.StickBreakingTransform()
    f = cx.functional
    for shape in shapes[:3] if quick else shapes:
        x = torch.randn(*shape, requires_grad=True)
        g = torch.randn(*shape)
        mask = torch.rand(*shape) > 0.3
        mask[:, 0] = True
        report(
            f"softmax {shape}",
            fwd_bwd(lambda x=x: f.softmax(x, -1), g),
            fwd_bwd(lambda x=x: torch.softmax(x, -1), g),
            rounds,
        )
        report(
            f"softmax mask {shape}",
            fwd_bwd(lambda x=x, m=mask: f.softmax(x, -1, mask=m), g),
            fwd_bwd(lambda x=x, m=mask: torch.softmax(x.masked_fill(~m, -torch.inf), -1), g),
            rounds,
        )
        if peer is not None:
            report(
                f"sparsemax {shape}",
                fwd_bwd(lambda x=x: f.sparsemax(x, -1), g),
                fwd_bwd(lambda x=x: peer.sparsemax(x, -1), g),
                rounds,
            )
            report(
                f"entmax15 {shape}",
                fwd_bwd(lambda x=x: f.entmax15(x, -1), g),
                fwd_bwd(lambda x=x: peer.entmax15(x, -1), g),
                rounds,
            )
            report(
                f"entmax a=1.5 {shape}",
                fwd_bwd(lambda x=x: f.entmax(x, 1.5, -1), g),
                fwd_bwd(lambda x=x: peer.entmax_bisect(x, 1.5, -1), g),
                rounds,
            )
        z = torch.randn(shape[0], shape[1] - 1, requires_grad=True)
        report(
            f"stick_breaking {shape}",
            fwd_bwd(lambda z=z: f.stick_breaking(z, -1), g),
            fwd_bwd(lambda z=z: stick(z), g),
            rounds,
        )


def sort_projection(x: torch.Tensor) -> torch.Tensor:
    """The textbook sort projection onto the simplex (Held et al.; Duchi et al. 2008)."""
    u = torch.sort(x, -1, descending=True).values
    css = u.cumsum(-1) - 1
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    rho = (u * k > css).sum(-1, keepdim=True)
    tau = css.gather(-1, rho - 1) / rho.to(x.dtype)
    return (x - tau).clamp_min(0)


def projection_cases(rounds: int, quick: bool) -> None:
    shapes = [(10000, 10), (1000, 1000), (1, 1_000_000)]
    for shape in shapes[:1] if quick else shapes:
        x = torch.randn(*shape)
        report(
            f"project_simplex fwd {shape}",
            lambda x=x: cx.functional.project_simplex(x),
            lambda x=x: sort_projection(x),
            rounds,
        )


def floor_cases(rounds: int) -> None:
    xs = [torch.randn(1, 2), torch.randn(1, 2)]
    w = torch.tensor([0.3, 0.7])
    report(
        "floor: convex_combination 2 x (1, 2) vs torch.add",
        lambda: cx.functional.convex_combination(w, xs),
        lambda: torch.add(xs[0], xs[1]),
        rounds,
    )


def layer_cases(rounds: int) -> None:
    layers = [torch.randn(8, 32, 256, requires_grad=True) for _ in range(13)]
    g = torch.randn(8, 32, 256)
    mix = cx.ScalarMix(13)
    params = torch.zeros(13, requires_grad=True)
    gamma = torch.ones((), requires_grad=True)
    report(
        "ScalarMix(13) 13 x (8, 32, 256) vs AllenNLP-style loop",
        fwd_bwd(lambda: mix(layers), g),
        fwd_bwd(lambda: gamma * seed_loop(torch.softmax(params, 0), layers), g),
        rounds,
    )
    sw = cx.SimplexWeights(10)
    free = torch.zeros(10, requires_grad=True)
    plain = PlainWeights(10)
    g10 = torch.randn(10)
    report(
        "SimplexWeights(10) vs torch.softmax",
        fwd_bwd(lambda: sw(), g10),
        fwd_bwd(lambda: torch.softmax(free, 0), g10),
        rounds,
    )
    report(
        "SimplexWeights(10) vs a module: Parameter + softmax",
        fwd_bwd(lambda: sw(), g10),
        fwd_bwd(lambda: plain(), g10),
        rounds,
    )
    lin = cx.simplex_(torch.nn.Linear(10, 4, bias=False), "weight")
    raw = torch.zeros(4, 10, requires_grad=True)
    tlin = torch.nn.Linear(10, 4, bias=False)
    parametrize.register_parametrization(tlin, "weight", SoftmaxRows())
    g4 = torch.randn(4, 10)
    report(
        "simplex_(Linear(10, 4)).weight vs torch.softmax",
        fwd_bwd(lambda: lin.weight, g4),
        fwd_bwd(lambda: torch.softmax(raw, -1), g4),
        rounds,
    )
    report(
        "simplex_(Linear(10, 4)).weight vs torch's parametrize + softmax",
        fwd_bwd(lambda: lin.weight, g4),
        fwd_bwd(lambda: tlin.weight, g4),
        rounds,
    )


class PlainWeights(torch.nn.Module):
    """What SimplexWeights replaces: a module with free values and a softmax."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(n))

    def forward(self) -> torch.Tensor:
        return torch.softmax(self.logits, 0)


class SoftmaxRows(torch.nn.Module):
    """What simplex_ replaces: torch's parametrization with a softmax (rows sum to 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a few sizes of each case")
    parser.add_argument(
        "--only", nargs="+", default=[], metavar="TEXT", help="run the cases whose name has TEXT"
    )
    args = parser.parse_args()
    ONLY[:] = args.only
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, convexmix {cx.__version__}; fwd+bwd unless marked fwd; "
        f"best of >= {args.rounds} interleaved rounds\n"
    )
    print("| case | convexmix (us) | naive (us) | ratio |")
    print("|---|---:|---:|---:|")
    floor_cases(args.rounds)
    weighted_sum_cases(args.rounds, args.quick)
    map_cases(args.rounds, args.quick)
    projection_cases(args.rounds, args.quick)
    layer_cases(args.rounds)
    over = [r for r in ROWS if r[1] > r[2]]
    print(f"\n{len(ROWS) - len(over)} of {len(ROWS)} cases at <= 1.0x.")


if __name__ == "__main__":
    main()
