"""``convexmix blend`` and ``convexmix score``: apply saved weights to other predictions,
and score the blend against targets (private). Both match the prediction files to the
weights by the models' names."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from convexmix._optional import require
from convexmix.cli import _common as common
from convexmix.errors import ShapeError

__all__: list[str] = []

BLEND_HELP = "apply saved blend weights to predictions"
BLEND_DESCRIPTION = (
    "Blend K models' predictions (say, on the test set) with the weights that "
    "`convexmix ensemble --out` wrote. The predictions are matched to the weights by the "
    "models' names (file names, .npz keys or --names), in any order; a weights file that "
    "records no names (fitted on one stacked array) is applied by position."
)
SCORE_HELP = "score saved blend weights against targets, beside each model and equal weights"
SCORE_DESCRIPTION = (
    "Score the blend that `convexmix ensemble --out` wrote on other predictions and their "
    "targets (say, the test set): log-loss, Brier score (mse) and accuracy for "
    "classification, mse for regression, for the blend, equal weights and each model "
    "alone. The predictions are matched to the weights by name, as in `convexmix blend`."
)


def _numpy() -> Any:
    return require("numpy", purpose="the convexmix command line")


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, metavar="JSON", help="from ensemble --out")
    parser.add_argument(
        "--predictions",
        nargs="+",
        required=True,
        metavar="FILE",
        help="one (K, N[, C]) file, or one (N[, C]) file per model (.npy .npz .csv .parquet), "
        "in any order: matched to the weights by name",
    )
    parser.add_argument(
        "--names",
        nargs="+",
        metavar="NAME",
        help="the models' names, in the order of the predictions (instead of the file names "
        "or .npz keys)",
    )


def add_blend_arguments(blend: argparse.ArgumentParser) -> None:
    _common_arguments(blend)
    blend.add_argument(
        "--out", required=True, metavar="FILE", help="the (N[, C]) blend: .npy, .csv or .parquet"
    )
    blend.add_argument("--quiet", action="store_true", help="no message on success")


def add_score_arguments(score: argparse.ArgumentParser) -> None:
    _common_arguments(score)
    score.add_argument("--targets", required=True, metavar="FILE", help="(N,) labels or values")
    score.add_argument(
        "--loss",
        choices=["log_loss", "mse"],
        default=None,
        help="what to score: log_loss (classification: log-loss, Brier score, accuracy) or "
        "mse (regression); by default the loss the weights were fitted for",
    )
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _load(args: argparse.Namespace, n_samples: int | None = None) -> tuple[Any, Any, Any, Any]:
    """The saved blend, its file, the predictions in the fit's model order, and the names."""
    from convexmix import _io
    from convexmix.ensemble import load_weights
    from convexmix.ensemble._files import read_weights_file

    saved = read_weights_file(args.weights)
    blend = load_weights(args.weights)
    loaded = _io.load_predictions(args.predictions, n_samples=n_samples, names=args.names)
    order = _io.match_models(saved.models, saved.named, loaded, args.weights)
    if loaded.named and not saved.named:
        print(
            f"convexmix: warning: {args.weights} records no model names; the predictions "
            f"are applied by position, in the order given ({', '.join(loaded.names)}).",
            file=sys.stderr,
        )
    predictions = loaded.array
    if order != list(range(len(order))):
        predictions = predictions[order]
    expected = saved.sample_shape
    if expected is not None and tuple(predictions.shape[2:]) != expected:
        fitted = ("K", "N", *(str(d) for d in expected))
        raise ShapeError(
            f"{args.weights} was fitted on ({', '.join(fitted)}) predictions; "
            f"got shape {tuple(predictions.shape)}."
        )
    names = [loaded.names[i] for i in order] if saved.named else loaded.names
    return blend, saved, predictions, names


def run_blend(args: argparse.Namespace) -> int:
    np = _numpy()

    from convexmix import _io

    common.check_outputs([args.out], [*args.predictions, args.weights])
    blend, _, predictions, names = _load(args)
    result = np.asarray(blend.predict(predictions))
    out = _io.save_array(args.out, result, [*args.predictions, args.weights])
    if not args.quiet:
        print(
            f"wrote {out}: the blend of {len(names)} models ({', '.join(names)}), "
            f"shape {tuple(predictions.shape[1:])}",
            file=sys.stderr,
        )
    return 0


def _loss(p: Any, targets: Any, loss: str) -> float:
    """The loss of one (N[, C]) prediction, as fit_weights defines and checks it."""
    from convexmix.ensemble import fit_weights

    return float(fit_weights(p[None], targets, loss=loss).loss)  # type: ignore[arg-type]


def _accuracy(p: Any, targets: Any) -> float:
    np = _numpy()

    guess = p.argmax(-1) if p.ndim == 2 else (p > 0.5).astype(np.int64)
    return float((guess == targets).mean())


def _scores(p: Any, targets: Any, loss: str) -> dict[str, float]:
    if loss == "mse":
        return {"mse": _loss(p, targets, "mse")}
    return {
        "log_loss": _loss(p, targets, "log_loss"),
        "brier": _loss(p, targets, "mse"),
        "accuracy": _accuracy(p, targets),
    }


def run_score(args: argparse.Namespace) -> int:
    np = _numpy()

    from convexmix import _io

    targets = _io.load_targets(args.targets)
    blend, saved, predictions, names = _load(args, n_samples=len(targets))
    if predictions.shape[1] != len(targets):
        raise ShapeError(
            f"the predictions hold N={predictions.shape[1]} samples; {args.targets} holds "
            f"{len(targets)} targets."
        )
    loss = args.loss or saved.loss_name or "log_loss"
    p = np.asarray(predictions, dtype=np.float64)
    weights = np.asarray(blend.weights, dtype=np.float64)
    y = np.asarray(targets)
    rows = {
        "blend": _scores(np.asarray(blend.predict(predictions), dtype=np.float64), y, loss),
        "equal_weights": _scores(p.mean(0), y, loss),
    }
    models = {name: _scores(p[k], y, loss) for k, name in enumerate(names)}
    metrics = list(rows["blend"])
    if args.json:
        report = {
            "weights_file": str(args.weights),
            "loss": loss,
            "n_samples": int(p.shape[1]),
            "weights": dict(zip(names, weights.tolist(), strict=True)),
            **rows,
            "models": models,
        }
        print(json.dumps(_json_safe(report), indent=2, allow_nan=False))
        return 0
    from rich.table import Table

    table = Table(title=f"Scores on {args.targets} ({p.shape[1]} samples)")
    table.add_column("method")
    table.add_column("weight", justify="right")
    for m in metrics:
        table.add_column(m.replace("_", "-"), justify="right")
    best = {
        m: (max if m == "accuracy" else min)(
            (r[m] for r in [*rows.values(), *models.values()] if math.isfinite(r[m])),
            default=math.nan,
        )
        for m in metrics
    }

    def cells(r: dict[str, float]) -> list[str]:
        shown = []
        for m in metrics:
            text = f"{100 * r[m]:.2f}%" if m == "accuracy" else f"{r[m]:.6f}"
            shown.append(f"[bold]{text}[/bold]" if r[m] == best[m] else text)
        return shown

    table.add_row(f"convexmix ({args.weights})", "", *cells(rows["blend"]))
    table.add_row("equal weights", "", *cells(rows["equal_weights"]))
    for k, name in enumerate(names):
        table.add_row(name, f"{weights[k]:.4f}", *cells(models[name]))
    common.console().print(table)
    return 0


def _json_safe(value: Any) -> Any:
    """``value`` with each non-finite float (which JSON cannot hold) as null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
