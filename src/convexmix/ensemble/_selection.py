"""``ensemble_selection``: Caruana's greedy selection with replacement (private).

Caruana, Niculescu-Mizil, Crew & Ksikes, "Ensemble selection from libraries of models",
ICML 2004: add, one pick at a time, the model whose addition gives the lowest loss of the
running average; the weights are the counts divided by the number of picks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from convexmix._validation import check_int
from convexmix.ensemble._factory import make_objective
from convexmix.ensemble._inputs import wants_numpy
from convexmix.ensemble._objectives import DataObjective, Loss
from convexmix.ensemble._result import EnsembleResult, as_output, free_weights
from convexmix.ensemble._solver import fw_gap
from convexmix.functional._registry import get_map

__all__ = ["check_size", "ensemble_selection", "select", "select_result"]


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


def ensemble_selection(
    predictions: Any,
    targets: Any,
    *,
    size: int = 50,
    loss: Loss = "log_loss",
    sample_weight: Any = None,
    best_prefix: bool = False,
    map: str = "softmax",
    validate: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> EnsembleResult:
    """Caruana's greedy ensemble selection with replacement (the auto-sklearn baseline).

    Starting from an empty ensemble, add ``size`` times the model (repeats allowed) whose
    addition gives the lowest loss of the running average; ties go to the lower index.
    The weights are the counts divided by the number of picks.

    Args:
        predictions: as in :func:`fit_weights`.
        targets: as in :func:`fit_weights`.
        size: the number of picks; weights are multiples of ``1/size``.
        loss: as in :func:`fit_weights`.
        sample_weight: as in :func:`fit_weights`.
        best_prefix: keep the prefix of the picks with the lowest loss (weights then are
            multiples of ``1/n_iter``), as Caruana et al. do.
        map: as in :func:`fit_weights`.
        validate: as in :func:`fit_weights`.
        callback: ``callback(picks, loss)`` after each pick.

    Returns:
        An :class:`EnsembleResult` with ``history`` the loss after each pick and
        ``gap`` the Frank-Wolfe gap of the selection for the exact problem.

    >>> import torch, convexmix as cx
    >>> p = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    >>> y = 0.25 * p[0] + 0.75 * p[1]
    >>> cx.ensemble.ensemble_selection(p, y, size=4, loss="mse").weights
    tensor([0.2500, 0.7500, 0.0000], dtype=torch.float64)
    """
    get_map(map)
    check_size(size)
    obj = make_objective(predictions, targets, loss, sample_weight, validate)
    return as_output(select_result(obj, size, best_prefix, map, callback), wants_numpy(predictions))


def check_size(size: int) -> None:
    check_int(size, "size")


def select_result(
    obj: DataObjective,
    size: int,
    best_prefix: bool,
    map: str,
    callback: Callable[[int, float], None] | None,
) -> EnsembleResult:
    w, history, n = select(obj, size, best_prefix, callback)
    return EnsembleResult(
        weights=w,
        loss=obj.loss(w),
        history=history,
        n_iter=n,
        gap=fw_gap(w, obj.value(w)[1]()),
        converged=True,
        free=free_weights(w, map),
        map=map,
        regularization=0.0,
        method="caruana",
    )
