"""``convexmix ensemble``: fit blend weights to stored predictions (private)."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from convexmix.cli import _common as common
from convexmix.functional._registry import DETERMINISTIC

__all__: list[str] = []

HELP = "exact convex blend weights for stored predictions"
DESCRIPTION = (
    "Fit convex blend weights to K models' stored predictions (say, on a validation set) "
    "and compare them with equal weights, the best single model and Caruana's ensemble "
    "selection. --out writes the weights with the models' names, for `convexmix blend` "
    "and `convexmix score`."
)


def add_arguments(ens: argparse.ArgumentParser) -> None:
    ens.add_argument(
        "--predictions",
        nargs="+",
        required=True,
        metavar="FILE",
        help="one (K, N[, C]) file, or one (N[, C]) file per model (.npy .npz .csv .parquet); "
        "the file names name the models",
    )
    ens.add_argument("--targets", required=True, metavar="FILE", help="(N,) labels or values")
    ens.add_argument(
        "--names",
        nargs="+",
        metavar="NAME",
        help="the models' names, in order (instead of the file names or .npz keys)",
    )
    ens.add_argument(
        "--loss",
        default="log_loss",
        choices=["log_loss", "mse"],
        help="log_loss: class probabilities and labels; mse: regression outputs and values "
        "(or probabilities: the Brier score)",
    )
    ens.add_argument(
        "--map", default="softmax", choices=sorted(DETERMINISTIC), help=argparse.SUPPRESS
    )
    ens.add_argument(
        "--regularization",
        type=common.regularization,
        default=0.0,
        metavar="LAM|cv",
        help="pull towards equal weights (a guard for small validation sets), or 'cv'",
    )
    ens.add_argument("--size", type=common.count(1), default=50, help="Caruana's number of picks")
    ens.add_argument(
        "--tol", type=common.number(0.0), default=1e-10, help="optimality gap to stop at"
    )
    ens.add_argument(
        "--max-weight",
        type=common.number(0.0, 1.0),
        default=None,
        metavar="U",
        help="cap on every weight (none by default)",
    )
    ens.add_argument(
        "--max-models",
        type=common.count(1),
        default=None,
        metavar="K",
        help="at most K non-zero weights (no limit by default)",
    )
    ens.add_argument("--max-iter", type=common.count(1), default=200, help="most Newton iterations")
    ens.add_argument("--out", metavar="JSON", help="write the weights, names and losses as JSON")
    ens.add_argument("--plot", metavar="PNG", help="draw the weights and losses")
    ens.add_argument(
        "--bootstrap",
        type=common.count(0),
        default=0,
        metavar="N",
        help="N Bayesian-bootstrap draws of the same (constrained) fit: an interval for each "
        "weight (also in --out, --plot)",
    )
    ens.add_argument(
        "--level",
        type=common.number(0.0, 1.0, open_high=True),
        default=0.9,
        help="the intervals' probability",
    )
    ens.add_argument("--seed", type=common.seed, default=0, help="seed of the bootstrap draws")
    ens.add_argument("--quiet", action="store_true", help="no progress display")


@contextmanager
def _reading(add: common.AddBar) -> Iterator[None]:
    """A "reading" bar for the objectives' pass over the predictions (models or rows)."""
    from convexmix.ensemble._inputs import read_progress

    advance = add("reading", None)
    with read_progress(lambda done, total: advance(completed=done, total=total)):
        yield


def _floats(values: Any) -> list[float | None]:
    """JSON numbers (a non-finite value, which JSON cannot hold, becomes null)."""
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def _fit(args: argparse.Namespace, predictions: Any, targets: Any) -> tuple[Any, Any]:
    from convexmix.ensemble import bootstrap, compare

    fit_args: dict[str, Any] = {
        "loss": args.loss,
        "map": args.map,
        "regularization": args.regularization,
        "tol": args.tol,
        "max_iter": args.max_iter,
    }
    limits = {
        key: value
        for key, value in (("max_weight", args.max_weight), ("max_models", args.max_models))
        if value is not None
    }
    show = common.show_progress(args)
    # one display: the pass over the predictions, then the fit's iterations (a few: no
    # fixed total), then Caruana's picks
    with common.progress_group(show) as add, _reading(add):
        fit_bar = add("fitting", None)
        sel_bar = add("Caruana", args.size)
        result = compare(
            predictions,
            targets,
            size=args.size,
            **fit_args,
            **limits,
            fit_callback=lambda it, f, gap: fit_bar(info=f"gap {gap:.1e}", completed=it),
            selection_callback=lambda m, f: sel_bar(info=f"loss {f:.5f}"),
        )
    boot = None
    if args.bootstrap:
        with common.progress_group(show) as add, _reading(add):
            boot_bar = add("bootstrap", args.bootstrap)
            boot = bootstrap(
                predictions,
                targets,
                n=args.bootstrap,
                seed=args.seed,
                **fit_args,
                **limits,
                callback=lambda i, n: boot_bar(completed=i),
            )
    return result, boot


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from convexmix import _io

    inputs = [*args.predictions, args.targets]
    if args.plot:  # a bad plot name fails now, before any work or any file is written
        from convexmix.plot import plot_path

        args.plot = plot_path(args.plot)
    common.check_outputs([args.out, args.plot], inputs)
    targets = _io.load_targets(args.targets)
    loaded = _io.load_predictions(args.predictions, n_samples=len(targets), names=args.names)
    predictions, names = loaded.array, loaded.names
    result, boot = _fit(args, predictions, targets)
    fit, car = result.fit, result.caruana
    K = len(names)
    lo, hi = boot.interval(args.level) if boot is not None else (None, None)
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
    title = f"{K} models, {predictions.shape[1]} samples, loss {args.loss}"
    # the result files first: they must not depend on the terminal (`| head` closes it)
    written = []
    if args.out:
        payload: dict[str, Any] = {
            "weights": _floats(fit.weights),
            "models": names,
            "models_named": loaded.named,
            "loss": args.loss,
            "losses": losses,
            "best_single_model": names[result.best_single],
            "caruana_weights": _floats(car.weights),
            "n_iter": fit.n_iter,
            "gap": fit.gap if math.isfinite(fit.gap) else None,
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
                "lo": _floats(lo),
                "hi": _floats(hi),
                "draws": [_floats(row) for row in boot.weights],
                "loss": _floats(boot.loss),
            }
        text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
        written.append(_io.write_atomic(args.out, lambda tmp: tmp.write_text(text), inputs))
    if args.plot:
        from convexmix.plot import plot_ensemble_weights

        written.append(
            plot_ensemble_weights(
                {"convexmix": fit.weights, f"Caruana ({args.size})": car.weights},
                names,
                args.plot,
                losses={labels[k]: v for k, v in losses.items()},
                title=title,
                intervals=None if lo is None or hi is None else (lo, hi),
            )
        )
    console = common.console()
    table = Table(title=f"Blend weights ({title})")
    table.add_column("model")
    table.add_column("convexmix", justify="right")
    if boot is not None:
        table.add_column(f"{100 * args.level:g}% interval", justify="right")
    table.add_column(f"Caruana ({args.size})", justify="right")
    table.add_column("loss alone", justify="right")
    for k in range(K):
        interval = [] if lo is None or hi is None else [f"[{lo[k]:.4f}, {hi[k]:.4f}]"]
        table.add_row(
            names[k],
            f"{float(fit.weights[k]):.4f}",
            *interval,
            f"{float(car.weights[k]):.4f}",
            f"{float(result.single_losses[k]):.5f}",
        )
    console.print(table)
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
            f"bootstrap: {args.bootstrap} Bayesian-bootstrap draws (seed {args.seed}) of the "
            + ("constrained fit" if limits else "fit")
            + f"; {100 * args.level:g}% intervals of each weight"
        )
    for path in written:
        console.print(f"wrote {path}")
    return 0
