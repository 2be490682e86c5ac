"""``convexmix demo``, ``seeds`` and ``info`` (private)."""

from __future__ import annotations

import argparse
import json

import torch

from convexmix import __version__
from convexmix.cli import _common as common
from convexmix.functional._registry import DETERMINISTIC

__all__: list[str] = []

DEMO_HELP = "the ensemble job on classifiers trained on scikit-learn's bundled datasets"
DEMO_DESCRIPTION = (
    "Train 8 scikit-learn classifiers on two datasets bundled with scikit-learn (digits, "
    "breast cancer), fit blend weights on their out-of-fold predictions, and score "
    "convexmix, SLSQP, Caruana's selection, equal weights and the best model on a held-out "
    "test split, with the time each fit takes. Needs the [demo] extra."
)
SEEDS_HELP = "recover known weights in the seed scenarios"
SEEDS_DESCRIPTION = (
    "Train SimplexWeights and friends with Adam on small synthetic problems whose true "
    "weights are known, and print the learned weights beside the true ones."
)
INFO_HELP = "versions, active kernels and the output cache (for bug reports)"
INFO_DESCRIPTION = (
    "Print the convexmix and torch versions, whether the native CPU kernels and Triton are "
    "in use, CUDA devices, and the CPU output cache's size and limit."
)


def add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--out-dir", default="convexmix-demo", help="folder for the plots")
    demo.add_argument("--no-plots", action="store_true", help="do not draw plots")
    demo.add_argument("--seed", type=common.seed, default=0, help="random seed")
    demo.add_argument("--quiet", action="store_true", help="no progress display")


def run_demo(args: argparse.Namespace) -> int:
    from rich.table import Table

    from convexmix import _demo

    console = common.console()
    out_dir = None if args.no_plots else args.out_dir
    steps = len(_demo.DATASETS) * 9
    with common.progress(common.show_progress(args), "demo", steps) as bar:
        reports = _demo.run(args.seed, out_dir, lambda msg: bar(info=msg))
    console.print(
        f"convexmix {__version__} demo: blend weights for 8 scikit-learn classifiers,\n"
        "fitted on out-of-fold predictions of the training split, "
        "scored on a held-out test split.\n"
    )
    for rep in reports:
        table = Table(
            title=f"{rep.dataset}: {rep.n_train} train / {rep.n_test} test samples, "
            f"{rep.n_classes} classes"
        )
        for name in ("method", "val log-loss", "test log-loss", "test accuracy", "fit time"):
            table.add_column(name, justify="left" if name == "method" else "right")
        table.add_column("models used", justify="right")
        for s in rep.scores:
            table.add_row(
                s.method,
                f"{s.val_loss:.4f}",
                f"{s.test_loss:.4f}",
                f"{100 * s.test_accuracy:.1f}%",
                f"{1e3 * s.fit_seconds:.1f} ms",
                str(int((s.weights > 0).sum())),
            )
        console.print(table)
        fit = rep.scores[0]
        used = ", ".join(
            f"{n} {w:.3f}"
            for n, w in zip(rep.model_names, fit.weights.tolist(), strict=True)
            if w > 0
        )
        console.print(f"convexmix weights: {used}")
        if rep.plot:
            console.print(f"plot: {rep.plot}")
        console.print()
    return 0


def add_seeds_arguments(seeds: argparse.ArgumentParser) -> None:
    seeds.add_argument(
        "--map", default="softmax", choices=sorted(DETERMINISTIC), help="the simplex map"
    )
    seeds.add_argument("--steps", type=common.count(1), default=400, help="Adam steps per scenario")
    seeds.add_argument("--seed", type=common.seed, default=0, help="random seed")
    seeds.add_argument("--quiet", action="store_true", help="no progress display")


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in t.tolist()) + "]"


def run_seeds(args: argparse.Namespace) -> int:
    from convexmix._seeds import SCENARIOS

    torch.manual_seed(args.seed)
    with common.progress(
        common.show_progress(args), "training", args.steps * len(SCENARIOS)
    ) as bar:
        results = [scenario(args.map, args.steps, lambda n: bar()) for scenario in SCENARIOS]
    print(
        f"convexmix {__version__} seed scenarios, map={args.map!r}, {args.steps} Adam steps each\n"
    )
    for r in results:
        err = (r.learned - r.true).abs().max().item()
        print(f"{r.name}")
        print(f"  learned  {_fmt(r.learned)}")
        print(f"  true     {_fmt(r.true)}")
        print(
            f"  sum {r.learned.sum().item():.6f}   max |error| {err:.4f}   loss {r.loss:.2e}"
            + (f"   {r.extra}" if r.extra else "")
        )
    return 0


def add_info_arguments(info: argparse.ArgumentParser) -> None:
    info.add_argument("--json", action="store_true", help="print JSON")


def run_info(args: argparse.Namespace) -> int:
    from convexmix._runtime import info

    report = info()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    native = (
        f"yes ({report['native_isa']})"
        if report["native_cpu"]
        else "no (ATen fallback: installed without a C compiler, or CONVEXMIX_NATIVE=0)"
    )
    limit = report["output_cache_limit"]
    rows = [
        ("convexmix", report["version"]),
        ("torch", report["torch"]),
        ("native CPU kernels", native),
        ("triton", "installed" if report["triton"] else "not installed"),
        ("CUDA", f"{torch.cuda.device_count()} device(s)" if report["cuda"] else "none"),
        (
            "CPU output cache",
            f"{report['output_cache_bytes'] / 2**20:.1f} MiB held, limit "
            + (f"{limit / 2**20:.0f} MiB" if limit else "0 (off)"),
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
