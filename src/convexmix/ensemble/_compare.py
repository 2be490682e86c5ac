"""``compare``: the exact fit beside equal weights, each model alone and Caruana (private)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from convexmix.ensemble import _dense
from convexmix.ensemble._factory import make_objective
from convexmix.ensemble._fit import (
    check_fit_args,
    dense_route,
    fit_constrained,
    fit_dense,
    fit_objective,
)
from convexmix.ensemble._inputs import wants_numpy
from convexmix.ensemble._objectives import Loss
from convexmix.ensemble._result import EnsembleResult, Weights, as_output
from convexmix.ensemble._selection import check_size, select_result

__all__ = ["Comparison", "compare"]


@dataclass
class Comparison:
    """:func:`fit_weights` beside the usual alternatives, on the same predictions.

    Attributes:
        fit: the exact optimum (:func:`fit_weights`).
        caruana: greedy ensemble selection (:func:`ensemble_selection`).
        equal_loss: the loss of equal weights.
        single_losses: (K,) the loss of each model alone (numpy for numpy predictions).
        best_single: the index of the best model alone.
    """

    fit: EnsembleResult
    caruana: EnsembleResult
    equal_loss: float
    single_losses: Weights
    best_single: int

    def losses(self) -> dict[str, float]:
        """Method name -> loss, the exact fit first."""
        return {
            "convexmix": self.fit.loss,
            "caruana": self.caruana.loss,
            "equal_weights": self.equal_loss,
            "best_single": float(self.single_losses[self.best_single]),
        }


def compare(
    predictions: Any,
    targets: Any,
    *,
    loss: Loss = "log_loss",
    map: str = "softmax",
    sample_weight: Any = None,
    regularization: float | Literal["cv"] = 0.0,
    size: int = 50,
    tol: float = 1e-10,
    max_iter: int = 200,
    validate: bool = True,
    cv_folds: int = 5,
    seed: int = 0,
    fit_callback: Callable[[int, float, float], None] | None = None,
    selection_callback: Callable[[int, float], None] | None = None,
    max_weight: float | None = None,
    max_models: int | None = None,
) -> Comparison:
    """Fit the exact weights and score equal weights, each model alone and Caruana.

    The predictions are checked and reduced once for all of them. Arguments are those of
    :func:`fit_weights` (``cv_folds`` and ``seed`` included), plus ``size`` for
    :func:`ensemble_selection`.

    >>> import torch, convexmix as cx
    >>> p = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    >>> y = 0.25 * p[0] + 0.75 * p[1]
    >>> c = cx.ensemble.compare(p, y, loss="mse", size=8)
    >>> {k: round(v, 4) for k, v in c.losses().items()}
    {'convexmix': 0.0, 'caruana': 0.0, 'equal_weights': 1.7824, 'best_single': 0.0417}
    """
    check_fit_args(map, tol, max_iter, regularization, cv_folds)
    check_size(size)
    numpy = wants_numpy(predictions)
    dense = None
    if dense_route(None, regularization, max_weight, max_models):
        # the fit that fit_weights gives for the same arguments: the same path
        dense = _dense.prepare(predictions, targets, loss, sample_weight, validate)
    obj = make_objective(predictions, targets, loss, sample_weight, validate)
    if dense is not None:
        fit = fit_dense(
            dense, map, regularization, tol, max_iter, fit_callback, None, cv_folds, seed
        )
    elif max_weight is not None or max_models is not None:
        fit = fit_constrained(
            obj, map, regularization, tol, max_iter, fit_callback, max_weight, max_models
        )
    else:
        fit = fit_objective(obj, map, regularization, tol, max_iter, cv_folds, seed, fit_callback)
    caruana = select_result(obj, size, False, map, selection_callback)
    K = obj.K
    eye = torch.eye(K, dtype=torch.float64)
    singles = torch.tensor([obj.loss(eye[k]) for k in range(K)], dtype=torch.float64)
    equal = obj.loss(torch.full((K,), 1.0 / K, dtype=torch.float64))
    return Comparison(
        as_output(fit, numpy),
        as_output(caruana, numpy),
        equal,
        singles.numpy() if numpy else singles,
        int(singles.argmin()),
    )
