"""Convergence study: ways to learn weights on the simplex, on four reference problems.

    python benchmarks/convergence.py [--steps 3000] [--out docs/figures]

Problems (float64, K weights):
  (a) mixing: recover the weights of a noisy mixture of K = 8 sources (optimum inside);
  (b) ensemble: log-loss of a convex blend of K = 10 models' class probabilities, where
      three models are noise, so the optimum lies on a face (some weights exactly 0);
  (c) vertex: least squares whose optimum is a vertex (one weight 1, the rest 0);
  (d) minibatch: problem (a) with gradients from minibatches of 32 samples.
The exact optimum comes from a high-precision solver: accelerated projected gradient
(FISTA) with backtracking, 20000 steps in float64 on the full objective.

Methods: softmax reparametrization with Adam and with SGD; sparsemax and stick-breaking
reparametrizations (Adam); exponentiated gradient; projected Adam and projected SGD;
"clip and renormalise" after each SGD step. Each runs over a grid of learning rates and
3 seeds (the seed sets the starting point: a random point of the simplex).

Reported per method and problem, at its best learning rate (the lowest median final
gap): steps and seconds to a loss gap of 1e-6 (median over seeds), the final gap, the
final max weight error, and stability: the share of all (lr, seed) runs that reach the
1e-6 gap, and the share that end worse than they started or non-finite.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import convexmix as cx

torch.set_default_dtype(torch.float64)
LRS = [1e-3, 1e-2, 1e-1, 1.0]
SEEDS = [0, 1, 2]
GAP = 1e-6

Loss = Callable[[torch.Tensor, int | None], torch.Tensor]  # (weights, minibatch seed) -> loss


@dataclass
class Problem:
    name: str
    k: int
    loss: Loss  # full objective when the second argument is None
    stochastic: bool = False
    optimum: torch.Tensor | None = None
    best: float = 0.0


def make_problems() -> list[Problem]:
    gen = torch.Generator().manual_seed(1234)
    # (a) mixing, optimum inside
    xs = torch.randn(8, 2000, generator=gen)
    true = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    y = true @ xs + 0.05 * torch.randn(2000, generator=gen)

    def mixing(w: torch.Tensor, batch: int | None) -> torch.Tensor:
        if batch is None:
            return ((w @ xs - y) ** 2).mean()
        idx = torch.randint(2000, (32,), generator=torch.Generator().manual_seed(batch))
        return ((w @ xs[:, idx] - y[idx]) ** 2).mean()

    # (b) ensemble log-loss: 7 informative models of varying quality, 3 pure noise
    n, c = 2000, 5
    labels = torch.randint(c, (n,), generator=gen)
    onehot = torch.nn.functional.one_hot(labels, c).double()
    preds = []
    for k in range(10):
        if k < 7:
            noise = 2.0 + 0.2 * k
            logits = 3.0 * onehot + noise * torch.randn(n, c, generator=gen)
        else:
            logits = 2.0 * torch.randn(n, c, generator=gen)
        preds.append(torch.softmax(logits, -1))
    p_true = torch.stack(preds)[:, torch.arange(n), labels]  # (K, N): prob of the label

    def ensemble(w: torch.Tensor, batch: int | None) -> torch.Tensor:
        return -torch.log((w @ p_true).clamp_min(1e-300)).mean()

    # (c) least squares with the optimum at a vertex: the target is source 0, plus a
    # shift that makes every other source strictly worse
    xv = torch.randn(6, 500, generator=gen)
    xv[1:] += 0.5
    target = xv[0].clone()

    def vertex(w: torch.Tensor, batch: int | None) -> torch.Tensor:
        return ((w @ xv - target) ** 2).mean()

    return [
        Problem("(a) mixing, inside", 8, mixing),
        Problem("(b) ensemble log-loss, face", 10, ensemble),
        Problem("(c) least squares, vertex", 6, vertex),
        Problem("(d) minibatch mixing", 8, mixing, stochastic=True),
    ]


def exact_optimum(problem: Problem, steps: int = 20000) -> tuple[torch.Tensor, float]:
    """FISTA with backtracking on the full objective, projected onto the simplex."""
    k = problem.k
    w = torch.full((k,), 1.0 / k)
    z, t, step = w.clone(), 1.0, 1.0

    def f_and_g(v: torch.Tensor) -> tuple[float, torch.Tensor]:
        v = v.detach().requires_grad_()
        val = problem.loss(v, None)
        (g,) = torch.autograd.grad(val, v)
        return float(val.detach()), g

    for _ in range(steps):
        fz, gz = f_and_g(z)
        for _ in range(200):  # backtracking, bounded
            cand = cx.functional.project_simplex(z - step * gz, method="sort")
            d = cand - z
            fc, _ = f_and_g(cand)
            if math.isfinite(fc) and fc <= fz + float(gz @ d) + float(d @ d) / (2 * step) + 1e-15:
                break
            step /= 2
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        # The extrapolated point is projected back: outside the simplex the log-loss of
        # problem (b) is undefined.
        z = cx.functional.project_simplex(cand + (t - 1) / t_next * (cand - w), method="sort")
        w, t = cand, t_next
        step = min(step * 1.1, 1e6)  # grows back after backtracking, never overflows
    return w, f_and_g(w)[0]


# ------------------------------------------------------------------------------ methods


def run(
    problem: Problem, method: str, lr: float, seed: int, steps: int
) -> tuple[list[float], torch.Tensor, float]:
    """Loss gaps per step, final weights and the seconds spent stepping."""
    k = problem.k
    gen = torch.Generator().manual_seed(seed)  # the start: a uniform random point
    e = torch.empty(k).exponential_(generator=gen)
    start = e / e.sum()
    assert problem.optimum is not None

    if method.startswith(("softmax", "sparsemax", "stick")):
        map_name = {"softmax": "softmax", "sparsemax": "sparsemax", "stick": "stick_breaking"}[
            method.split()[0]
        ]
        layer = cx.SimplexWeights(k, map=map_name, init=start)
        params = list(layer.parameters())
        opt: torch.optim.Optimizer = (
            torch.optim.SGD(params, lr=lr)
            if method.endswith("SGD")
            else torch.optim.Adam(params, lr=lr)
        )

        def weights() -> torch.Tensor:
            out: torch.Tensor = layer()
            return out

        post: Callable[[], None] = lambda: None  # noqa: E731
    else:
        w = torch.nn.Parameter(start.clone())
        params = [w]
        if method == "exponentiated gradient":
            opt = cx.optim.ExponentiatedGradient(params, lr=lr)
        elif method == "projected Adam":
            with warnings.catch_warnings():  # the warning this study is the evidence for
                warnings.simplefilter("ignore", cx.ConvexMixWarning)
                opt = cx.optim.Projected(torch.optim.Adam(params, lr=lr), params, method="sort")
        elif method == "projected SGD":
            opt = cx.optim.Projected(torch.optim.SGD(params, lr=lr), params, method="sort")
        else:  # clip and renormalise after each SGD step
            opt = torch.optim.SGD(params, lr=lr)

        def weights() -> torch.Tensor:
            return w

        def post() -> None:
            if method == "clip + renormalise":
                with torch.no_grad():
                    w.clamp_(min=0)
                    s = w.sum()
                    w.div_(s if s > 0 else 1.0)

    gaps = []
    elapsed = 0.0
    for i in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = problem.loss(weights(), seed * 100_000 + i if problem.stochastic else None)
        loss.backward()
        opt.step()
        post()
        elapsed += time.perf_counter() - t0
        with torch.no_grad():
            gaps.append(float(problem.loss(weights(), None)) - problem.best)
    return gaps, weights().detach(), elapsed


METHODS = [
    "softmax Adam",
    "softmax SGD",
    "sparsemax Adam",
    "stick-breaking Adam",
    "exponentiated gradient",
    "projected Adam",
    "projected SGD",
    "clip + renormalise",
]


def _first_below(gaps: list[float], level: float) -> int | None:
    for i, g in enumerate(gaps):
        if g <= level:
            return i + 1
    return None


def study(steps: int) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    rows = []
    curves: dict[str, dict[str, list[float]]] = {}
    for problem in make_problems():
        problem.optimum, problem.best = exact_optimum(problem)
        curves[problem.name] = {}
        zeros = int((problem.optimum < 1e-12).sum())
        print(
            f"{problem.name}: optimum {problem.optimum.numpy().round(4)}, "
            f"{zeros} exact zero(s), loss {problem.best:.10f}",
            flush=True,
        )
        for method in METHODS:
            name = (
                "stick" + method[len("stick-breaking") :] if method.startswith("stick") else method
            )
            results = {}
            for lr in LRS:
                results[lr] = [run(problem, name, lr, seed, steps) for seed in SEEDS]
            finals = {
                lr: statistics.median(
                    r[0][-1] if math.isfinite(r[0][-1]) else math.inf for r in res
                )
                for lr, res in results.items()
            }
            best_lr = min(finals, key=lambda lr: finals[lr])
            best = results[best_lr]
            hits = [_first_below(g, GAP) for g, _, _ in best]
            reached = [h for h in hits if h is not None]
            step_s = [t / steps for _, _, t in best]
            steps_to = statistics.median(reached) if len(reached) >= 2 else None
            secs_to = (
                statistics.median(h * s for h, s in zip(hits, step_s, strict=True) if h)
                if steps_to
                else None
            )
            all_runs = [r for res in results.values() for r in res]
            share = sum(_first_below(g, GAP) is not None for g, _, _ in all_runs) / len(all_runs)
            bad = sum(not math.isfinite(g[-1]) or g[-1] > g[0] for g, _, _ in all_runs) / len(
                all_runs
            )
            err = statistics.median(float((w - problem.optimum).abs().max()) for _, w, _ in best)
            rows.append(
                f"| {problem.name} | {method} | {best_lr:g} | "
                f"{'-' if steps_to is None else int(steps_to)} | "
                f"{'-' if secs_to is None else f'{secs_to:.3f}'} | {finals[best_lr]:.1e} | "
                f"{err:.1e} | {share:.0%} | {bad:.0%} |"
            )
            print(rows[-1], flush=True)
            curves[problem.name][method] = [
                statistics.median(max(g[i], 1e-16) for g, _, _ in best) for i in range(steps)
            ]
    return rows, curves


def plot(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    for ax, (name, by_method) in zip(axes, curves.items(), strict=True):
        for method, gaps in by_method.items():
            style = "--" if "SGD" in method or "clip" in method else "-"
            ax.semilogy(range(1, len(gaps) + 1), gaps, style, label=method)
        ax.axhline(GAP, color="grey", lw=0.8, ls=":")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss - optimum (median of 3 seeds, best lr)")
        ax.set_ylim(1e-16, 10)
    axes[0].legend(fontsize="small", ncols=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=None, help="folder for convergence.png")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows, curves = study(args.steps)
    print(
        f"\n{args.steps} steps per run, lr in {LRS}, seeds {SEEDS}, float64; "
        f"gap target {GAP:g}; {time.perf_counter() - t0:.0f} s in all\n"
    )
    print(
        "| problem | method | best lr | steps to 1e-6 | s to 1e-6 | final gap | max weight error "
        "| runs reaching 1e-6 | runs ending worse |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    if args.out:
        plot(curves, Path(args.out) / "convergence.png")


if __name__ == "__main__":
    main()
