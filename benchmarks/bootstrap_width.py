"""When to trust a blend: the width of the bootstrap intervals against validation size.

    python benchmarks/bootstrap_width.py [--draws 5] [--n 200] [--out FIGURE.png]

On each of the demo's datasets (the 8 scikit-learn classifiers' out-of-fold predictions),
for validation sets of n samples drawn from the out-of-fold set (``--draws`` draws per
n), it runs ``cx.ensemble.bootstrap`` and records the 90% interval width of each weight.
It prints, per n, the mean over draws of the widest interval and of the mean interval
width, and draws both against n on log axes.
"""

from __future__ import annotations

import argparse

import torch

from convexmix import _demo
from convexmix.ensemble import bootstrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draws", type=int, default=5, help="validation subsets per size")
    parser.add_argument("--n", type=int, default=200, help="bootstrap draws per fit")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400, 800])
    parser.add_argument("--out", default="docs/figures/bootstrap_width.png")
    args = parser.parse_args()
    results: dict[str, list[tuple[int, float, float]]] = {}
    for name in _demo.DATASETS:
        data = _demo.predictions(name, 0, lambda msg: None)
        n_all = data.val.shape[1]
        gen = torch.Generator().manual_seed(0)
        rows = []
        print(f"{name}: {data.val.shape[0]} models, {n_all} out-of-fold samples")
        print(f"  {'n':>5s} {'widest 90% interval':>20s} {'mean 90% interval':>18s}")
        for n in [s for s in args.sizes if s <= n_all]:
            widest, mean = [], []
            for d in range(args.draws):
                idx = torch.randperm(n_all, generator=gen)[:n]
                bs = bootstrap(data.val[:, idx], data.y_val[idx], n=args.n, seed=d)
                lo, hi = bs.interval(0.9)
                widest.append(float((hi - lo).max()))
                mean.append(float((hi - lo).mean()))
            row = (n, sum(widest) / len(widest), sum(mean) / len(mean))
            rows.append(row)
            print(f"  {row[0]:5d} {row[1]:20.3f} {row[2]:18.3f}")
        results[name] = rows
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for (name, rows), color in zip(results.items(), ("C0", "C1", "C2"), strict=False):
        ns = [r[0] for r in rows]
        ax.plot(ns, [r[1] for r in rows], "o-", color=color, label=f"{name}: widest weight")
        ax.plot(ns, [r[2] for r in rows], "s--", color=color, label=f"{name}: mean over models")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("validation samples n")
    ax.set_ylabel("90% interval width of a weight")
    ax.set_title("Bayesian bootstrap of the blend weights (8 classifiers)")
    ax.legend(fontsize="small")
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
