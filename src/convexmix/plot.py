"""Plots (needs the ``[plot]`` extra: ``pip install "convexmix[plot]"``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from convexmix.errors import ConvexMixError

__all__ = ["plot_weight_history"]

_MAX_LINES = 12


def _figure(rows: int) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ConvexMixError('plotting needs matplotlib: pip install "convexmix[plot]"') from err
    fig = Figure(figsize=(7.0, 2.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot, no global backend change
    return fig


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
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
