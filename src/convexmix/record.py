"""Record the weights of convexmix layers during training, and plot their trajectories.

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

import torch
from torch import Tensor, nn

from convexmix.errors import ConvexMixError
from convexmix.nn import ScalarMix, SimplexWeights, WeightedSum
from convexmix.parametrize import _constraints

__all__ = ["WeightRecorder"]

_LAYERS = (SimplexWeights, WeightedSum, ScalarMix)


def _labels(module: nn.Module) -> list[str] | None:
    sources = getattr(module, "sources", None)
    return list(sources) if sources else None


class WeightRecorder:
    """Records the current weights of convexmix layers at each :meth:`record` call.

    Give it a model, and it finds every ``SimplexWeights``, ``WeightedSum`` and
    ``ScalarMix`` inside (outermost only) and every parameter constrained with
    :func:`convexmix.simplex_`; or give it a dict ``{name: layer}``. Lazy layers that are
    not initialised yet are skipped until they are.

    Attributes:
        steps: the step of each record.
        history: ``{name: tensor (records, *weight_shape)}``, detached, on the CPU.
    """

    def __init__(self, model: nn.Module | Mapping[str, nn.Module]) -> None:
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
                for param in _constraints(module):
                    self._add(f"{name}.{param}" if name else param, module, param)
        else:
            raise ConvexMixError(
                f"model must be a module or a dict of modules; got {type(model).__name__}."
            )
        if not self._getters:
            raise ConvexMixError(
                "found no convexmix layer or simplex_-constrained parameter to record."
            )
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
        self.steps.append(len(self.steps) if step is None else int(step))
        for name, get in self._getters.items():
            try:
                value = get()
            except (RuntimeError, ValueError):  # an uninitialised lazy layer
                continue
            self._records[name].append(value.detach().to("cpu", torch.float32).clone())

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
