"""The ``convexmix`` command line (also ``python -m convexmix``).

* ``convexmix ensemble --predictions FILE [FILE ...] --targets FILE``: exact convex blend
  weights for stored predictions, beside equal weights, the best model and Caruana.
* ``convexmix blend --weights W.json --predictions FILE [FILE ...] --out OUT``: apply the
  weights that ``ensemble --out`` wrote to other predictions (the test set's).
* ``convexmix demo``: the same job on classifiers trained on scikit-learn's bundled data.
* ``convexmix seeds``: the seed scenarios (recover known weights with ``SimplexWeights``).
* ``convexmix info [--json]``: versions, the kernels in use and the CPU output cache (for
  bug reports).

Errors become one line on stderr and exit code 2, never a traceback; a closed output
pipe (``| head``) is one line and exit code 1. Files (``--out``, ``--plot``) are written to
a temporary file and renamed when complete: never a partial file. Tables and progress
bars come from ``rich`` (the ``[cli]`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import torch

from convexmix import __version__
from convexmix.errors import ConvexMixError, ShapeError
from convexmix.functional._registry import MAPS

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line like every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _rich() -> Any:
    try:
        import rich
    except ImportError:
        raise ConvexMixError(
            "the convexmix command line needs rich: pip install 'convexmix[cli]'"
        ) from None
    return rich


def _console(stderr: bool = False) -> Any:
    _rich()
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich exits with code 1 and no message; let main() say what happened
            self.quiet = True
            raise BrokenPipeError

    stream = sys.stderr if stderr else sys.stdout
    # Pipes and files get 120 columns rather than rich's 80, so tables do not wrap.
    width = None if stream.isatty() else 120
    return _Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


@contextmanager
def _progress_group(enabled: bool) -> Iterator[Callable[[str, int | None], Callable[..., None]]]:
    """One rich progress display on stderr while the block runs, whose bars are added
    with ``add(description, total)``; each returns its ``advance(**fields)``."""
    if not enabled:
        yield lambda description, total: lambda **kw: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}")]
    with Progress(
        *columns, TimeElapsedColumn(), console=_console(stderr=True), transient=True
    ) as bar:

        def add(description: str, total: int | None) -> Callable[..., None]:
            task = bar.add_task(description, total=total, info="")

            def advance(
                info: str = "", completed: int | None = None, total: int | None = None
            ) -> None:
                if total is not None:
                    bar.update(task, total=total)
                if completed is None:
                    bar.advance(task)
                else:
                    bar.update(task, completed=completed)
                bar.update(task, info=info)

            return advance

        yield add


@contextmanager
def _progress(enabled: bool, description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr while the block runs; ``advance(**fields)`` moves it."""
    with _progress_group(enabled) as add:
        yield add(description, total)


@contextmanager
def _reading(add: Callable[[str, int | None], Callable[..., None]]) -> Iterator[None]:
    """A "reading" bar for the objectives' pass over the predictions (models or rows)."""
    from convexmix.ensemble._inputs import read_progress

    advance = add("reading", None)
    with read_progress(lambda done, total: advance(completed=done, total=total)):
        yield


def _regularization(text: str) -> float | str:
    if text == "cv":
        return "cv"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'cv'; got {text!r}") from None


# --------------------------------------------------------------------------- ensemble


def run_ensemble(args: argparse.Namespace) -> int:
    from rich.table import Table

    from convexmix import _io
    from convexmix.ensemble import compare

    console = _console()
    if args.bootstrap < 0:
        raise ConvexMixError(f"--bootstrap must be >= 0; got {args.bootstrap}.")
    if not 0 < args.level < 1:
        raise ConvexMixError(f"--level must be in (0, 1); got {args.level}.")
    if args.plot:  # a bad plot name fails now, before any work or any file is written
        from convexmix.plot import plot_path

        args.plot = plot_path(args.plot)
    targets = _io.load_targets(args.targets)
    predictions, names = _io.load_predictions(args.predictions, n_samples=len(targets))
    show = not args.quiet and sys.stderr.isatty()
    # the fit's settings, shared by the comparison and the bootstrap
    fit_args: dict[str, Any] = {
        "loss": args.loss,
        "map": args.map,
        "regularization": args.regularization,
        "tol": args.tol,
        "max_iter": args.max_iter,
    }
    # one display: the pass over the predictions, then the fit's iterations (a few: no
    # fixed total), then Caruana's picks
    with _progress_group(show) as add, _reading(add):
        fit_bar = add("fitting", None)
        sel_bar = add("Caruana", args.size)
        result = compare(
            predictions,
            targets,
            size=args.size,
            **fit_args,
            fit_callback=lambda it, f, gap: fit_bar(info=f"gap {gap:.1e}", completed=it),
            selection_callback=lambda m, f: sel_bar(info=f"loss {f:.5f}"),
            max_weight=args.max_weight,
            max_models=args.max_models,
        )
    fit, car = result.fit, result.caruana
    K = len(names)
    boot = None
    if args.bootstrap:
        from convexmix.ensemble import bootstrap

        with _progress_group(show) as add, _reading(add):
            boot_bar = add("bootstrap", args.bootstrap)
            boot = bootstrap(
                predictions,
                targets,
                n=args.bootstrap,
                seed=args.seed,
                **fit_args,
                callback=lambda i, n: boot_bar(completed=i),
            )
        lo, hi = boot.interval(args.level)
    title = f"{K} models, {predictions.shape[1]} samples, loss {args.loss}"
    table = Table(title=f"Blend weights ({title})")
    table.add_column("model")
    table.add_column("convexmix", justify="right")
    if boot is not None:
        table.add_column(f"{100 * args.level:g}% interval", justify="right")
    table.add_column(f"Caruana ({args.size})", justify="right")
    table.add_column("loss alone", justify="right")
    for k in range(K):
        interval = [] if boot is None else [f"[{float(lo[k]):.4f}, {float(hi[k]):.4f}]"]
        table.add_row(
            names[k],
            f"{float(fit.weights[k]):.4f}",
            *interval,
            f"{float(car.weights[k]):.4f}",
            f"{float(result.single_losses[k]):.5f}",
        )
    console.print(table)
    losses = result.losses()
    limits = ", ".join(
        part
        for part in (
            f"max weight {args.max_weight:g}" if args.max_weight is not None else "",
            f"max {args.max_models} models" if args.max_models is not None else "",
        )
        if part
    )
    labels = {
        "convexmix": "convexmix (exact optimum" + (f", {limits})" if limits else ")"),
        "caruana": f"Caruana ensemble selection ({args.size})",
        "equal_weights": "equal weights",
        "best_single": f"best single model ({names[result.best_single]})",
    }
    summary = Table(title="Loss of each blend")
    summary.add_column("method")
    summary.add_column(args.loss, justify="right")
    summary.add_column("minus convexmix", justify="right")
    for key, value in losses.items():
        summary.add_row(labels[key], f"{value:.6f}", f"{value - fit.loss:+.2e}")
    console.print(summary)
    status = "converged" if fit.converged else "did NOT converge"
    console.print(
        f"convexmix: {status} in {fit.n_iter} Newton iterations; optimality gap <= {fit.gap:.1e}"
        + (f"; regularization {fit.regularization:g}" if fit.regularization else "")
    )
    if boot is not None:
        console.print(
            f"bootstrap: {args.bootstrap} Bayesian-bootstrap draws (seed {args.seed}); "
            f"{100 * args.level:g}% intervals of each weight"
        )
    if args.out:
        payload: dict[str, Any] = {
            "weights": [float(v) for v in fit.weights],
            "models": names,
            "loss": args.loss,
            "losses": losses,
            "best_single_model": names[result.best_single],
            "caruana_weights": [float(v) for v in car.weights],
            "n_iter": fit.n_iter,
            "gap": fit.gap,
            "converged": fit.converged,
            "regularization": fit.regularization,
            "map": args.map,
            "method": fit.method,
            "sample_shape": list(predictions.shape[2:]),
            "max_weight": args.max_weight,
            "max_models": args.max_models,
        }
        if boot is not None:
            payload["bootstrap"] = {
                "n": args.bootstrap,
                "seed": args.seed,
                "level": args.level,
                "lo": [float(v) for v in lo],
                "hi": [float(v) for v in hi],
                "draws": [[float(v) for v in row] for row in boot.weights],
                "loss": [float(v) for v in boot.loss],
            }
        text = json.dumps(payload, indent=2) + "\n"
        out = _io.write_atomic(args.out, lambda tmp: tmp.write_text(text))
        console.print(f"wrote {out}")
    if args.plot:
        from convexmix.plot import plot_ensemble_weights

        path = plot_ensemble_weights(
            {"convexmix": fit.weights, f"Caruana ({args.size})": car.weights},
            names,
            args.plot,
            losses={labels[k]: v for k, v in losses.items()},
            title=title,
            intervals=None if boot is None else (lo, hi),
        )
        console.print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------ blend


def run_blend(args: argparse.Namespace) -> int:
    from convexmix import _io
    from convexmix.ensemble import load_weights

    blend = load_weights(args.weights)
    K = blend.weights.numel()
    predictions, names = _io.load_predictions(args.predictions)
    if predictions.shape[0] != K:
        raise ConvexMixError(
            f"{args.weights} holds weights for {K} models; the predictions hold "
            f"{predictions.shape[0]} ({', '.join(names)})."
        )
    sample_shape = tuple(predictions.shape[2:])
    expected = _weights_sample_shape(args.weights)
    if expected is not None and sample_shape != expected:
        fitted = ("K", "N", *(str(d) for d in expected))
        raise ShapeError(
            f"{args.weights} was fitted on ({', '.join(fitted)}) predictions; "
            f"got shape {tuple(predictions.shape)}."
        )
    out = _io.save_array(args.out, blend.predict(predictions))
    if not args.quiet:
        print(
            f"wrote {out}: the blend of {K} models, shape {tuple(predictions.shape[1:])}",
            file=sys.stderr,
        )
    return 0


def _weights_sample_shape(path: str) -> tuple[int, ...] | None:
    from convexmix.ensemble._files import read_weights_file

    return read_weights_file(path).sample_shape


# ------------------------------------------------------------------------------- demo


def run_demo(args: argparse.Namespace) -> int:
    from rich.table import Table

    from convexmix import _demo

    console = _console()
    show = not args.quiet and sys.stderr.isatty()
    out_dir = None if args.no_plots else args.out_dir
    steps = len(_demo.DATASETS) * 9
    with _progress(show, "demo", steps) as bar:
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
        table.add_column("method")
        table.add_column("val log-loss", justify="right")
        table.add_column("test log-loss", justify="right")
        table.add_column("test accuracy", justify="right")
        table.add_column("fit time", justify="right")
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


# ------------------------------------------------------------------------------ seeds


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in t.tolist()) + "]"


def run_seeds(args: argparse.Namespace) -> int:
    from convexmix._seeds import SCENARIOS

    if args.steps < 1:
        raise ConvexMixError(f"--steps must be >= 1; got {args.steps}.")
    torch.manual_seed(args.seed)
    show = not args.quiet and sys.stderr.isatty()
    with _progress(show, "training", args.steps * len(SCENARIOS)) as bar:
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="convexmix", description="Learnable weights that sum to one, for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"convexmix {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ens = sub.add_parser(
        "ensemble",
        help="exact convex blend weights for stored predictions",
        description="Fit convex blend weights to K models' stored predictions and compare "
        "them with equal weights, the best single model and Caruana's ensemble selection.",
    )
    ens.add_argument(
        "--predictions",
        nargs="+",
        required=True,
        metavar="FILE",
        help="one (K, N[, C]) file, or one (N[, C]) file per model (.npy .npz .csv .parquet)",
    )
    ens.add_argument("--targets", required=True, metavar="FILE", help="(N,) labels or values")
    ens.add_argument("--loss", default="log_loss", choices=["log_loss", "mse"])
    ens.add_argument("--map", default="softmax", choices=sorted(MAPS), help=argparse.SUPPRESS)
    ens.add_argument(
        "--regularization",
        type=_regularization,
        default=0.0,
        metavar="LAM|cv",
        help="pull towards equal weights (a guard for small validation sets), or 'cv'",
    )
    ens.add_argument("--size", type=int, default=50, help="Caruana's number of picks")
    ens.add_argument("--tol", type=float, default=1e-10, help="optimality gap to stop at")
    ens.add_argument(
        "--max-weight", type=float, default=None, metavar="U", help="cap on every weight"
    )
    ens.add_argument(
        "--max-models", type=int, default=None, metavar="K", help="at most K non-zero weights"
    )
    ens.add_argument("--max-iter", type=int, default=200, help="most Newton iterations")
    ens.add_argument("--out", metavar="JSON", help="write the weights and losses as JSON")
    ens.add_argument("--plot", metavar="PNG", help="draw the weights and losses")
    ens.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="N Bayesian-bootstrap draws: an interval for each weight (also in --out, --plot)",
    )
    ens.add_argument("--level", type=float, default=0.9, help="the intervals' probability")
    ens.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    ens.add_argument("--quiet", action="store_true", help="no progress display")
    ens.set_defaults(func=run_ensemble)

    blend = sub.add_parser(
        "blend",
        help="apply saved blend weights to predictions",
        description="Blend K models' predictions (say, on the test set) with the weights "
        "that `convexmix ensemble --out` wrote.",
    )
    blend.add_argument("--weights", required=True, metavar="JSON", help="from ensemble --out")
    blend.add_argument(
        "--predictions",
        nargs="+",
        required=True,
        metavar="FILE",
        help="one (K, N[, C]) file, or one (N[, C]) file per model, in the fit's order",
    )
    blend.add_argument(
        "--out", required=True, metavar="FILE", help="the (N[, C]) blend: .npy, .csv or .parquet"
    )
    blend.add_argument("--quiet", action="store_true", help="no message on success")
    blend.set_defaults(func=run_blend)

    demo = sub.add_parser(
        "demo",
        help="the ensemble job on classifiers trained on scikit-learn's bundled datasets",
    )
    demo.add_argument("--out-dir", default="convexmix-demo", help="folder for the plots")
    demo.add_argument("--no-plots", action="store_true", help="do not draw plots")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--quiet", action="store_true", help="no progress display")
    demo.set_defaults(func=run_demo)

    seeds = sub.add_parser("seeds", help="recover known weights in the seed scenarios")
    seeds.add_argument("--map", default="softmax", choices=sorted(MAPS), help="the simplex map")
    seeds.add_argument("--steps", type=int, default=400, help="Adam steps per scenario")
    seeds.add_argument("--seed", type=int, default=0, help="random seed")
    seeds.add_argument("--quiet", action="store_true", help="no progress display")
    seeds.set_defaults(func=run_seeds)

    info = sub.add_parser(
        "info", help="versions, active kernels and the output cache (for bug reports)"
    )
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=run_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convexmix`` console script and ``python -m convexmix``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        if func not in (run_seeds, run_info):
            _rich()
        return int(func(args))
    except ConvexMixError as err:
        print(f"convexmix: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # stdout was closed early (e.g. `| head -1`): say so once, and point stdout at
        # devnull so that Python's flush at exit does not raise a second time.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("convexmix: error: the output was closed before it was all written.", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"convexmix: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convexmix: interrupted", file=sys.stderr)
        return 130
