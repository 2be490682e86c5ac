"""Plots (needs the ``[plot]`` extra: ``pip install "convexmix[plot]"``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from convexmix._files import atomic_path
from convexmix._optional import require
from convexmix.errors import ConvexMixError

__all__ = ["plot_ensemble_weights", "plot_weight_history"]

_MAX_LINES = 12


def _figure(rows: int) -> Any:
    agg = require("matplotlib.backends.backend_agg", purpose="plotting")
    figure = require("matplotlib.figure", purpose="plotting")
    fig = figure.Figure(figsize=(7.0, 2.6 * rows), layout="constrained")
    agg.FigureCanvasAgg(fig)  # no pyplot, no global backend change
    return fig


#: The file types matplotlib's Agg canvas writes.
PLOT_FORMATS = (
    ".png",
    ".pdf",
    ".svg",
    ".svgz",
    ".eps",
    ".ps",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".webp",
)


def plot_path(path: str | Path) -> Path:
    """The path a plot is written to: ``path`` with ``.png`` added when it has no suffix;
    an unknown suffix is a :class:`ConvexMixError` (checked before any work is done)."""
    out = Path(path)
    if not out.suffix:
        return out.with_name(out.name + ".png")
    if out.suffix.lower() not in PLOT_FORMATS:
        raise ConvexMixError(
            f"{out}: cannot draw a {out.suffix!r} file; use one of {', '.join(PLOT_FORMATS)}."
        )
    return out


def _save(fig: Any, path: str | Path, title: str | None) -> Path:
    if title:
        fig.suptitle(title)
    out = plot_path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix[1:].lower())
    return out


def plot_weight_history(
    history: Mapping[str, Tensor],
    steps: Mapping[str, Sequence[int]],
    path: str | Path,
    *,
    labels: Mapping[str, Sequence[str] | None] | None = None,
    title: str | None = None,
    xlabel: str = "step",
) -> Path:
    """One panel per recorded layer, one line per weight, saved as a PNG at ``path``.

    Weights of more than one dimension (per-channel ``(n, C)``) are drawn as the mean over
    the other dimensions per input, with the min-max range shaded.
    """
    if not history:
        raise ConvexMixError("nothing recorded yet: call record() during training first.")
    fig = _figure(len(history))
    axes = fig.subplots(len(history), 1, squeeze=False)[:, 0]
    for ax, (name, values) in zip(axes, history.items(), strict=True):
        x = list(steps[name])
        v = (
            values.reshape(values.shape[0], values.shape[1], -1)
            if values.dim() > 1
            else values[:, None, None]
        )
        names = (labels or {}).get(name) or [f"w{k}" for k in range(v.shape[1])]
        for k in range(min(v.shape[1], _MAX_LINES)):
            line = ax.plot(x, v[:, k].mean(-1).numpy(), label=names[k])[0]
            if v.shape[-1] > 1:
                ax.fill_between(
                    x,
                    v[:, k].amin(-1).numpy(),
                    v[:, k].amax(-1).numpy(),
                    color=line.get_color(),
                    alpha=0.15,
                )
        ax.set_title(name)
        ax.set_ylabel("weight")
        ax.set_ylim(-0.02, max(1.02, float(v.max()) + 0.02))
        ax.legend(loc="best", fontsize="small", ncols=min(v.shape[1], 4))
    axes[-1].set_xlabel(xlabel)
    return _save(fig, path, title)


def plot_ensemble_weights(
    weights: Mapping[str, Sequence[float] | Tensor],
    names: Sequence[str],
    path: str | Path,
    *,
    losses: Mapping[str, float] | None = None,
    title: str | None = None,
    intervals: tuple[Sequence[float] | Tensor, Sequence[float] | Tensor] | None = None,
) -> Path:
    """Grouped bars of the weights each method gives each model, saved as a PNG at ``path``.

    Args:
        weights: method name -> (K,) weights, e.g. ``{"convexmix": fit.weights}``.
        names: the K model names.
        path: the PNG to write (folders are created).
        losses: optional method name -> loss, drawn as a second panel.
        title: optional figure title.
        intervals: optional ``(lo, hi)``, each (K,): the first method's intervals (say,
            from :func:`convexmix.ensemble.bootstrap`), drawn as error bars.
    """
    if not weights:
        raise ConvexMixError("give the weights of at least one method.")
    rows = 2 if losses else 1
    fig = _figure(rows)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    ax = axes[0]
    K = len(names)
    width = 0.8 / len(weights)
    for i, (method, w) in enumerate(weights.items()):
        values = [float(v) for v in w]
        if len(values) != K:
            raise ConvexMixError(f"{method}: expected {K} weights; got {len(values)}.")
        xs = [k + (i - (len(weights) - 1) / 2) * width for k in range(K)]
        ax.bar(xs, values, width, label=method)
        if i == 0 and intervals is not None:
            lo_k, hi_k = ([float(v) for v in b] for b in intervals)
            if len(lo_k) != K or len(hi_k) != K:
                raise ConvexMixError(f"intervals: expected {K} bounds each; got {len(lo_k)}.")
            below = [max(0.0, v - a) for v, a in zip(values, lo_k, strict=True)]
            above = [max(0.0, b - v) for v, b in zip(values, hi_k, strict=True)]
            ax.errorbar(
                xs, values, yerr=[below, above], fmt="none", ecolor="black", capsize=3, lw=1
            )
    ax.set_xticks(
        range(K), list(names), rotation=30 if K > 4 else 0, ha="right" if K > 4 else "center"
    )
    ax.set_ylabel("weight")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="best", fontsize="small")
    if losses:
        lx = axes[1]
        items = list(losses.items())
        lx.barh([m for m, _ in items], [v for _, v in items], color="0.55")
        lo = best = min(v for _, v in items)
        hi = max(v for _, v in items)
        lx.set_xlim(max(0.0, lo - 0.15 * (hi - lo + 1e-12)), hi + 0.05 * (hi - lo + 1e-12))
        for y, (_, v) in enumerate(items):
            lx.text(
                v, y, f" {v:.4f}" + (" (best)" if v == best else ""), va="center", fontsize="small"
            )
        lx.invert_yaxis()
        lx.set_xlabel("loss (lower is better)")
    return _save(fig, path, title)
