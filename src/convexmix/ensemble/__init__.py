"""Convex blend weights for K models' stored predictions: the exact optimum, and Caruana.

:func:`fit_weights` solves

    min_w  L(sum_k w_k P_k, y) + lam * ||w - 1/K||^2    subject to  w >= 0,  sum_k w_k = 1

exactly: a Newton method whose steps solve the quadratic model on the simplex with a
finite active-set method, with a backtracking line search on the exact objective. It
stops when the Frank-Wolfe gap ``w.g - min_k g_k``, an upper bound on the distance to the
optimal loss, is below ``tol``; models the optimum does not use get weights of exactly 0.
Log-loss only needs each model's probability of the true class, so the (K, N, C) input
is read once and the iterations work on a (K, N) matrix.

:func:`ensemble_selection` is Caruana et al.'s greedy forward selection with replacement
(ICML 2004), the baseline of auto-sklearn and AutoGluon: weights are multiples of 1/size.

>>> import torch, convexmix as cx
>>> y = torch.tensor([0, 1, 1, 0])
>>> good = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
>>> bad = torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.5, 0.5], [0.5, 0.5]])
>>> fit = cx.ensemble.fit_weights(torch.stack([good, bad]), y)
>>> fit.weights
tensor([1., 0.], dtype=torch.float64)
>>> round(fit.loss, 4)
0.3284
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from convexmix.ensemble._inputs import as_predictions, make_objective
from convexmix.ensemble._objectives import DataObjective, Loss, Regularized
from convexmix.ensemble._selection import select
from convexmix.ensemble._solver import cv_lambda, fw_gap, solve
from convexmix.errors import ConvexMixError, ShapeError
from convexmix.functional._registry import get_map

__all__ = ["Comparison", "EnsembleResult", "compare", "ensemble_selection", "fit_weights"]


@dataclass
class EnsembleResult:
    """The outcome of :func:`fit_weights` or :func:`ensemble_selection`.

    Attributes:
        weights: (K,) float64 weights, >= 0, summing to 1.
        loss: the loss of the blend (without the regularisation term).
        history: the objective after each iteration (fit) or each added model (Caruana).
        n_iter: Newton iterations (fit) or models in the selected ensemble (Caruana).
        gap: Frank-Wolfe gap at ``weights``: an upper bound on ``objective - optimum``.
        converged: whether ``gap <= tol`` was reached (always True for Caruana).
        free: pre-weights for ``map``, so that ``map(free) == weights`` (softmax cannot
            make exact zeros: they become ``log(1e-12)``-sized values). Use them to
            initialise a :class:`~convexmix.SimplexWeights` or a parametrized layer.
        map: the name of that map.
        regularization: the ``lam`` that was used (chosen by cross-validation for "cv").
        method: "newton" or "caruana".
    """

    weights: Tensor
    loss: float
    history: list[float] = field(repr=False)
    n_iter: int
    gap: float
    converged: bool
    free: Tensor = field(repr=False)
    map: str = "softmax"
    regularization: float = 0.0
    method: str = "newton"

    def predict(self, predictions: Any) -> Tensor:
        """The blend ``sum_k weights[k] * predictions[k]`` of (K, N) or (K, N, C) predictions."""
        p = as_predictions(predictions)
        if p.shape[0] != self.weights.numel():
            raise ShapeError(
                f"predictions must hold {self.weights.numel()} models along dim 0; "
                f"got shape {tuple(p.shape)}."
            )
        blend: Tensor = torch.tensordot(self.weights.to(p.dtype), p, dims=1)
        return blend


def fit_weights(
    predictions: Any,
    targets: Any,
    *,
    loss: Loss = "log_loss",
    map: str = "softmax",
    sample_weight: Any = None,
    regularization: float | Literal["cv"] = 0.0,
    tol: float = 1e-10,
    max_iter: int = 200,
    validate: bool = True,
    cv_folds: int = 5,
    seed: int = 0,
    callback: Callable[[int, float, float], None] | None = None,
) -> EnsembleResult:
    """The convex blend weights that minimise a loss on stored predictions, exactly.

    Args:
        predictions: (K, N, C) class probabilities of K models for N samples, (K, N)
            probabilities of class 1 (binary log-loss) or (K, N) regression outputs
            (``loss="mse"``). A tensor, a numpy array or a list of K per-model arrays.
        targets: (N,) class labels (log-loss, and mse on probabilities, which is the
            Brier score) or (N,) regression targets.
        loss: "log_loss", "mse", or a callable ``loss(blend, targets)`` on the (N,) or
            (N, C) blend that returns per-sample losses (N,) or their mean; it must be
            convex in the blend for the optimum to be global, and written in torch ops.
        map: the simplex map whose pre-weights ``result.free`` should reproduce the
            weights. The optimum itself does not depend on it.
        sample_weight: optional (N,) non-negative sample weights.
        regularization: ``lam`` of the penalty ``lam * ||w - 1/K||^2`` towards equal
            weights, or "cv" to choose it from ``{0} U logspace(-4, 1, 11)`` by
            ``cv_folds``-fold cross-validation (a guard for small validation sets).
        tol: stop when the Frank-Wolfe gap, an upper bound on the loss gap to the
            optimum, is at most ``tol``.
        max_iter: the most Newton iterations.
        validate: check that probabilities are finite, >= 0 and sum to 1 per row (one
            extra read of the predictions).
        cv_folds: folds for ``regularization="cv"``; ``seed`` shuffles them.
        seed: the seed of the cross-validation split.
        callback: ``callback(iteration, objective, gap)`` after each iteration, for
            progress displays.

    Returns:
        An :class:`EnsembleResult`; ``weights`` is (K,) float64 with exact zeros for the
        models the optimum leaves out.

    Raises:
        ShapeError: shapes that do not match.
        InvalidProbabilitiesError: class probabilities that are negative or whose rows do
            not sum to 1 (within 1e-3).
        ConvexMixError: NaN or infinite values, bad labels or arguments.

    >>> import torch, convexmix as cx
    >>> p = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    >>> y = 0.25 * p[0] + 0.75 * p[1]
    >>> cx.ensemble.fit_weights(p, y, loss="mse").weights
    tensor([0.2500, 0.7500, 0.0000], dtype=torch.float64)
    """
    _check_fit_args(map, tol, max_iter, regularization, cv_folds)
    obj = make_objective(predictions, targets, loss, sample_weight, validate)
    return _fit(obj, map, regularization, tol, max_iter, cv_folds, seed, callback)


def _non_negative_number(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def _check_fit_args(
    map: str, tol: float, max_iter: int, regularization: float | str, cv_folds: int
) -> None:
    get_map(map)
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and tol > 0):
        raise ConvexMixError(f"tol must be a number > 0; got {tol!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConvexMixError(f"max_iter must be an int >= 1; got {max_iter!r}.")
    if isinstance(regularization, str):
        if regularization != "cv":
            raise ConvexMixError(
                f"regularization must be a number >= 0 or 'cv'; got {regularization!r}."
            )
        if isinstance(cv_folds, bool) or not isinstance(cv_folds, int) or cv_folds < 2:
            raise ConvexMixError(f"cv_folds must be an int >= 2; got {cv_folds!r}.")
    elif not _non_negative_number(regularization):
        raise ConvexMixError(
            f"regularization must be a number >= 0 or 'cv'; got {regularization!r}."
        )


def _fit(
    obj: DataObjective,
    map: str,
    regularization: float | str,
    tol: float,
    max_iter: int,
    cv_folds: int,
    seed: int,
    callback: Callable[[int, float, float], None] | None,
) -> EnsembleResult:
    if isinstance(regularization, str):
        lam = cv_lambda(obj, cv_folds, tol, max_iter, seed)
    else:
        lam = float(regularization)
    solved = Regularized(obj, lam) if lam > 0 else obj
    w, history, n_iter, gap, converged = solve(solved, float(tol), max_iter, callback)
    return EnsembleResult(
        weights=w,
        loss=obj.loss(w),
        history=history,
        n_iter=n_iter,
        gap=gap,
        converged=converged,
        free=_free(w, map),
        map=map,
        regularization=lam,
        method="newton",
    )


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
    _check_size(size)
    obj = make_objective(predictions, targets, loss, sample_weight, validate)
    return _select(obj, size, best_prefix, map, callback)


def _free(weights: Tensor, map: str) -> Tensor:
    spec = get_map(map)
    return spec.inverse(weights, -1, 1.0)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConvexMixError(f"size must be an int >= 1; got {size!r}.")


def _select(
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
        free=_free(w, map),
        map=map,
        regularization=0.0,
        method="caruana",
    )


@dataclass
class Comparison:
    """:func:`fit_weights` beside the usual alternatives, on the same predictions.

    Attributes:
        fit: the exact optimum (:func:`fit_weights`).
        caruana: greedy ensemble selection (:func:`ensemble_selection`).
        equal_loss: the loss of equal weights.
        single_losses: (K,) the loss of each model alone.
        best_single: the index of the best model alone.
    """

    fit: EnsembleResult
    caruana: EnsembleResult
    equal_loss: float
    single_losses: Tensor
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
    _check_fit_args(map, tol, max_iter, regularization, cv_folds)
    _check_size(size)
    obj = make_objective(predictions, targets, loss, sample_weight, validate)
    fit = _fit(obj, map, regularization, tol, max_iter, cv_folds, seed, fit_callback)
    caruana = _select(obj, size, False, map, selection_callback)
    K = obj.K
    eye = torch.eye(K, dtype=torch.float64)
    singles = torch.tensor([obj.loss(eye[k]) for k in range(K)], dtype=torch.float64)
    equal = obj.loss(torch.full((K,), 1.0 / K, dtype=torch.float64))
    return Comparison(fit, caruana, equal, singles, int(singles.argmin()))
