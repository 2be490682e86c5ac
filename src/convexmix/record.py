"""Record the weights of convexmix layers during training, plot their trajectories, and
send them to TensorBoard or to any callable.

>>> import torch, convexmix as cx
>>> model = torch.nn.ModuleDict({"fuse": cx.WeightedSum(3), "mix": cx.ScalarMix(2)})
>>> rec = cx.WeightRecorder(model)
>>> rec.record(step=0)
>>> sorted(rec.history), rec.history["fuse"].shape
(['fuse', 'mix'], torch.Size([1, 3]))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from convexmix._optional import require
from convexmix.errors import ConvexMixError
from convexmix.nn import ScalarMix, SimplexWeights, WeightedSum
from convexmix.parametrize import simplex_constraints

__all__ = ["WeightRecorder"]

_LAYERS = (SimplexWeights, WeightedSum, ScalarMix)


def _labels(module: nn.Module) -> list[str] | None:
    sources = getattr(module, "sources", None)
    return list(sources) if sources else None


class _SummaryWriter(Protocol):
    """What the recorder calls on a writer: ``torch.utils.tensorboard.SummaryWriter``'s API."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> Any: ...

    def add_histogram(self, tag: str, values: Tensor, global_step: int) -> Any: ...

    def flush(self) -> Any: ...

    def close(self) -> Any: ...


def _open_writer(log_dir: str | Path) -> _SummaryWriter:
    require("tensorboard", purpose="writing to TensorBoard")
    writer: _SummaryWriter = require(
        "torch.utils.tensorboard", extra="tensorboard", purpose="writing to TensorBoard"
    ).SummaryWriter(log_dir=str(log_dir))
    return writer


class WeightRecorder:
    """Records the current weights of convexmix layers at each :meth:`record` call.

    Give it a model, and it finds every ``SimplexWeights``, ``WeightedSum`` and
    ``ScalarMix`` inside (outermost only) and every parameter constrained with
    :func:`convexmix.simplex_`; or give it a dict ``{name: layer}``. Lazy layers that are
    not initialised yet are skipped until they are.

    Each record is kept in :attr:`history` (for :meth:`plot`) and, optionally, sent on:

    - to TensorBoard: one scalar per input and layer, tagged ``"{layer}/{input}"``
      (inputs named by the layer's ``sources``, else ``w0``, ``w1``, ...). Weights of
      more than one dimension (per-channel ``(n, C)``, a constrained matrix) are logged
      per input ``k`` as the mean of ``weights[k]``, as :meth:`plot` draws them, plus a
      histogram of ``weights[k]`` tagged ``"{layer}/{input}/values"``.
    - to any callable ``callback(step, name, weights)``, called once per layer and
      record with the detached float32 CPU weights (do not modify them in place: they
      are the stored history).

    Args:
        model: a module to search, or a dict ``{name: layer}`` of layers to record.
        tensorboard: a ``torch.utils.tensorboard.SummaryWriter`` (or any object with its
            ``add_scalar``/``add_histogram``), or a log directory for which the recorder
            opens, and :meth:`close` closes, its own writer (the ``[tensorboard]``
            extra).
        callback: called as ``callback(step, name, weights)`` at each record.

    Attributes:
        steps: the step of each record.
        history: ``{name: tensor (records, *weight_shape)}``, detached, on the CPU.
        labels: ``{name: input names or None}``.

    Raises:
        ConvexMixError: no layer to record, a layer without ``.weights``, a
            ``tensorboard`` that is not a writer or a path, or a ``callback`` that is not
            callable.

    >>> import torch, convexmix as cx
    >>> seen = []
    >>> rec = cx.WeightRecorder(
    ...     {"fuse": cx.WeightedSum(2, sources=["rgb", "depth"])},
    ...     callback=lambda step, name, w: seen.append((step, name, w.tolist())),
    ... )
    >>> rec.record(step=7)
    >>> seen
    [(7, 'fuse', [0.5, 0.5])]
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, nn.Module],
        *,
        tensorboard: _SummaryWriter | str | Path | None = None,
        callback: Callable[[int, str, Tensor], object] | None = None,
    ) -> None:
        self._getters: dict[str, Callable[[], Tensor]] = {}
        self.labels: dict[str, list[str] | None] = {}
        if isinstance(model, Mapping):
            for name, module in model.items():
                self._add(name, module)
        elif isinstance(model, nn.Module):
            taken: list[str] = []
            for name, module in model.named_modules():
                if any(name.startswith(t + ".") for t in taken if t):
                    continue
                if isinstance(module, _LAYERS):
                    self._add(name or type(module).__name__, module)
                    taken.append(name)
                for param in simplex_constraints(module):
                    self._add(f"{name}.{param}" if name else param, module, param)
        else:
            raise ConvexMixError(
                f"model must be a module or a dict of modules; got {type(model).__name__}."
            )
        if not self._getters:
            raise ConvexMixError(
                "found no convexmix layer or simplex_-constrained parameter to record."
            )
        if callback is not None and not callable(callback):
            raise ConvexMixError(
                "callback must be callable as callback(step, name, weights); "
                f"got {type(callback).__name__}."
            )
        self._callback = callback
        self._owns_writer = isinstance(tensorboard, (str, Path))
        if isinstance(tensorboard, (str, Path)):
            tensorboard = _open_writer(tensorboard)
        elif tensorboard is not None and not callable(getattr(tensorboard, "add_scalar", None)):
            raise ConvexMixError(
                "tensorboard must be a torch.utils.tensorboard.SummaryWriter or a log "
                f"directory; got {type(tensorboard).__name__}."
            )
        self._writer: _SummaryWriter | None = tensorboard
        self.steps: list[int] = []
        self._records: dict[str, list[Tensor]] = {name: [] for name in self._getters}

    def _add(self, name: str, module: nn.Module, param: str | None = None) -> None:
        if param is None and not hasattr(type(module), "weights"):
            raise ConvexMixError(f"{name!r} ({type(module).__name__}) has no .weights to record.")
        attr = param or "weights"

        def get() -> Tensor:
            value: Tensor = getattr(module, attr)
            return value

        self._getters[name] = get
        self.labels[name] = _labels(module)

    @torch.no_grad()
    def record(self, step: int | None = None) -> None:
        """Store the current weights of every layer (``step`` defaults to the record count)."""
        step = len(self.steps) if step is None else int(step)
        self.steps.append(step)
        for name, get in self._getters.items():
            try:
                value = get()
            except (RuntimeError, ValueError):  # an uninitialised lazy layer
                continue
            weights = value.detach().to("cpu", torch.float32).clone()
            self._records[name].append(weights)
            if self._writer is not None:
                self._log_tensorboard(self._writer, step, name, weights)
            if self._callback is not None:
                self._callback(step, name, weights)

    def _log_tensorboard(
        self, writer: _SummaryWriter, step: int, name: str, weights: Tensor
    ) -> None:
        rows = weights.reshape(weights.shape[0], -1) if weights.dim() > 1 else weights[:, None]
        labels = self.labels.get(name) or [f"w{k}" for k in range(rows.shape[0])]
        for label, row in zip(labels, rows, strict=True):
            writer.add_scalar(f"{name}/{label}", float(row.mean()), step)
            if row.numel() > 1:
                writer.add_histogram(f"{name}/{label}/values", row, step)

    def close(self) -> None:
        """Flush the TensorBoard writer, and close it if the recorder opened it.

        Later records still go to :attr:`history` and the callback, no longer to a
        writer the recorder has closed. ``with WeightRecorder(...) as rec:`` calls it on
        exit.
        """
        if self._writer is None:
            return
        if self._owns_writer:
            self._writer.close()
            self._writer = None
        else:
            self._writer.flush()

    def __enter__(self) -> WeightRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def history(self) -> dict[str, Tensor]:
        """The recorded weights, stacked: ``{name: (records, *weight_shape)}``."""
        return {n: torch.stack(r) for n, r in self._records.items() if r}

    def plot(self, path: str | Path, *, title: str | None = None, xlabel: str = "step") -> Path:
        """Draw the trajectories to a PNG (needs the ``[plot]`` extra, matplotlib)."""
        from convexmix.plot import plot_weight_history

        steps = {n: self.steps[-len(r) :] for n, r in self._records.items() if r}
        return plot_weight_history(
            self.history, steps, path, labels=self.labels, title=title, xlabel=xlabel
        )
