"""Caruana's greedy ensemble selection with replacement (private).

Caruana, Niculescu-Mizil, Crew & Ksikes, "Ensemble selection from libraries of models",
ICML 2004: add, one pick at a time, the model whose addition gives the lowest loss of the
running average; the weights are the counts divided by the number of picks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from convexmix.ensemble._objectives import DataObjective

__all__ = ["select"]


def select(
    obj: DataObjective,
    size: int,
    best_prefix: bool,
    callback: Callable[[int, float], None] | None,
) -> tuple[Tensor, list[float], int]:
    """The selected weights, the loss after each pick, and the number of picks kept."""
    counts = torch.zeros(obj.K, dtype=torch.float64)
    history: list[float] = []
    snapshots: list[Tensor] = []
    state = obj.greedy()
    for m in range(size):
        values = state.values()
        values = torch.where(torch.isnan(values), torch.inf, values)
        k = int(values.argmin())
        state.add(k)
        counts[k] += 1
        history.append(float(values[k]))
        snapshots.append(counts.clone())
        if callback is not None:
            callback(m + 1, history[-1])
    n = int(torch.tensor(history).argmin()) + 1 if best_prefix else size
    return snapshots[n - 1] / n, history, n
