"""``fit_weights``: the exact convex blend weights, with or without caps and budgets (private)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor

from convexmix._validation import check_int, check_positive, is_number
from convexmix.ensemble import _capped, _dense
from convexmix.ensemble._distributed import Sharded, reducer
from convexmix.ensemble._factory import make_objective
from convexmix.ensemble._inputs import as_predictions, wants_numpy
from convexmix.ensemble._objectives import DataObjective, Loss, Regularized
from convexmix.ensemble._result import EnsembleResult, as_output, free_weights
from convexmix.ensemble._solver import cv_lambda, sample_start, solve, stopping_gap
from convexmix.errors import ConvexMixError, ConvexMixTypeError
from convexmix.functional._registry import get_map

__all__ = [
    "check_fit_args",
    "dense_route",
    "fit_constrained",
    "fit_dense",
    "fit_objective",
    "fit_weights",
]


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
    process_group: Any = None,
    max_weight: float | None = None,
    max_models: int | None = None,
) -> EnsembleResult:
    """The convex blend weights that minimise a loss on stored predictions, exactly.

    Args:
        predictions: (K, N, C) class probabilities of K models for N samples, (K, N)
            probabilities of class 1 (binary log-loss) or (K, N) regression outputs
            (``loss="mse"``). A tensor, a numpy array or a list of K per-model arrays;
            or a ``numpy.memmap`` or the path of a ``.npy`` file (memory-mapped), which
            is read in row chunks in its own dtype (float32 stays float32; sums are in
            float64) and never copied whole: beyond the mapping, log-loss keeps the
            (K, N) probabilities of the true class, mse a (K, K) matrix.
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
            optimum, is at most ``tol`` times the objective's scale (1 for log-loss; for
            mse the best single model's loss; ``regularization`` where that is larger).
        max_iter: the most Newton iterations.
        validate: check that probabilities are finite, >= 0 and sum to 1 per row (one
            extra read of the predictions).
        cv_folds: folds for ``regularization="cv"``; ``seed`` shuffles them.
        seed: the seed of the cross-validation split.
        callback: ``callback(iteration, objective, gap)`` after each iteration, for
            progress displays.
        process_group: a sharded fit over ``torch.distributed``: each rank passes its
            own rows (predictions, targets, sample weights) and every sum over rows is
            all-reduced, so every rank gets the weights of one fit on all the rows.
            ``None`` uses the default group when it is initialised (one process
            otherwise). Sharded fits take "log_loss" or "mse" and a number for
            ``regularization``.
        max_weight: a cap on every weight, ``1/K <= max_weight <= 1``: the exact optimum
            over ``{0 <= w <= max_weight, sum w = 1}`` (a box-constrained Newton method).
        max_models: at most this many non-zero weights. Exact (branch and bound over the
            supports, with the convex fits as bounds) for K <= 24; above, forward
            selection plus swaps (a heuristic: ``result.method`` says which, and
            docs/ensemble.md gives its measured gap).

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
    >>> cx.ensemble.fit_weights(p, y, loss="mse", max_weight=0.6).weights
    tensor([0.3940, 0.6000, 0.0060], dtype=torch.float64)
    >>> cx.ensemble.fit_weights(p, y, loss="mse", max_models=1).weights
    tensor([0., 1., 0.], dtype=torch.float64)
    """
    numpy = wants_numpy(predictions)
    reduce = reducer(process_group)
    if isinstance(reduce, Sharded):
        return as_output(
            _fit_sharded(
                reduce, predictions, targets, loss, map, sample_weight, regularization, tol,
                max_iter, validate, callback, max_weight, max_models,
            ),
            numpy,
        )  # fmt: skip
    check_fit_args(map, tol, max_iter, regularization, cv_folds)
    if dense_route(process_group, regularization, max_weight, max_models):
        dense = _dense.prepare(predictions, targets, loss, sample_weight, validate)
        if dense is not None:
            return as_output(
                fit_dense(
                    dense, map, regularization, tol, max_iter, callback, None, cv_folds, seed
                ),
                numpy,
            )
    obj = make_objective(predictions, targets, loss, sample_weight, validate)
    if max_weight is not None or max_models is not None:
        return as_output(
            fit_constrained(
                obj, map, regularization, tol, max_iter, callback, max_weight, max_models
            ),
            numpy,
        )
    return as_output(
        fit_objective(obj, map, regularization, tol, max_iter, cv_folds, seed, callback), numpy
    )


def _fit_sharded(
    reduce: Sharded,
    predictions: Any,
    targets: Any,
    loss: Loss,
    map: str,
    sample_weight: Any,
    regularization: float | str,
    tol: float,
    max_iter: int,
    validate: bool,
    callback: Callable[[int, float, float], None] | None,
    max_weight: float | None,
    max_models: int | None,
) -> EnsembleResult:
    """A fit whose rows are sharded over ``reduce``'s ranks. Every check runs before the
    collective that depends on it, and a failure on any rank raises the same
    ShardedFitError on every rank (see ``_distributed``), never a hang."""
    try:
        check_fit_args(map, tol, max_iter, regularization, 2)
        if callable(loss):
            raise ConvexMixError(
                "a sharded fit (process_group) takes loss='log_loss' or 'mse'; got a callable loss."
            )
        if isinstance(regularization, str):
            raise ConvexMixError(
                "a sharded fit (process_group) takes a number for regularization; got 'cv'."
            )
        if max_weight is not None or max_models is not None:
            raise ConvexMixError(
                "a sharded fit (process_group) does not take max_weight/max_models."
            )
        p = as_predictions(predictions)
        reduce.settings = (
            loss, map, float(regularization), float(tol), max_iter, bool(validate),
            sample_weight is None, p.dim(), p.shape[0], p.shape[2] if p.dim() == 3 else 0,
        )  # fmt: skip
        obj = make_objective(p, targets, loss, sample_weight, validate, reduce)
        reduce.agree()
    except Exception as err:  # a torch error too: the other ranks must not wait
        reduce.fail(err if isinstance(err, ConvexMixError) else ConvexMixError(repr(err)))
        raise  # pragma: no cover - fail() raises
    return fit_objective(obj, map, regularization, tol, max_iter, 2, 0, callback)


def _distributed() -> bool:
    """Whether torch.distributed's default group is up (a fit may then be sharded)."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized())


def dense_route(
    process_group: Any,
    regularization: float | str,
    max_weight: float | None = None,
    max_models: int | None = None,
) -> bool:
    """Whether a fit with these settings may take the dense path (its inputs decide the
    rest: :func:`convexmix.ensemble._dense.prepare`)."""
    return (
        max_weight is None and max_models is None and process_group is None and not _distributed()
    )


def fit_dense(
    problem: _dense.DenseProblem,
    map: str,
    regularization: float | str,
    tol: float,
    max_iter: int,
    callback: Callable[[int, float, float], None] | None,
    w0: Any = None,
    cv_folds: int = 5,
    seed: int = 0,
) -> EnsembleResult:
    """:func:`fit_objective` on the dense (numpy) path, for a problem without the pull
    (``lam`` 0); numpy weights."""
    if isinstance(regularization, str):
        lam, start = _dense.cv_lambda(problem, cv_folds, float(tol), max_iter, seed)
        if w0 is None:
            w0 = start
    else:
        lam = float(regularization)
    problem = replace(problem, lam=lam)
    stop = stopping_gap(float(tol), problem.scale, lam)
    w, history, n_iter, gap, converged = _dense.solve(problem, stop, max_iter, callback, w0)
    return EnsembleResult(
        weights=w,
        loss=problem.loss(w),
        history=history,
        n_iter=n_iter,
        gap=gap,
        converged=converged,
        free=free_weights(w, map),
        map=map,
        regularization=problem.lam,
        method="newton",
    )


def fit_constrained(
    obj: DataObjective,
    map: str,
    regularization: float | str,
    tol: float,
    max_iter: int,
    callback: Callable[[int, float, float], None] | None,
    max_weight: float | None,
    max_models: int | None,
) -> EnsembleResult:
    """``fit_weights`` under ``max_weight`` and/or ``max_models`` (see ``_capped``)."""
    K = obj.K
    cap = 1.0 if max_weight is None else check_positive(max_weight, "max_weight", optional=True)
    if cap > 1.0:
        raise ConvexMixError(f"max_weight must be at most 1 (a weight of the blend); got {cap}.")
    if max_models is not None:
        check_int(max_models, "max_models")
    k = K if max_models is None else min(max_models, K)
    if k * cap < 1.0 - 1e-12:
        raise ConvexMixError(
            f"infeasible: {k} model(s) with weights of at most max_weight={cap} sum to at "
            f"most {k * cap:.6g} < 1 (need max_weight >= 1/{k})."
        )
    if isinstance(regularization, str):
        raise ConvexMixError(
            "regularization='cv' is not available with max_weight/max_models; pass a number."
        )
    lam = float(regularization)
    solved = Regularized(obj, lam) if lam > 0 else obj
    method = "newton"
    if k < K:
        search = _capped.Search(solved, cap, stopping_gap(float(tol), obj.scale, lam), max_iter)
        exact = K <= _capped.EXACT_MAX_MODELS
        allowed, proven = _capped.best_support(search, k, exact)
        method = "branch-and-bound" if proven else "forward-swap"
        u = torch.zeros(K, dtype=torch.float64)
        u[sorted(allowed)] = cap
    else:
        u = torch.full((K,), cap, dtype=torch.float64)
    stop = stopping_gap(float(tol), obj.scale, lam)
    solution = _capped.newton_capped(solved, u, stop, max_iter, callback)
    return _result(obj, solution, map, lam, method)


def _result(
    obj: DataObjective,
    solution: tuple[Tensor, list[float], int, float, bool],
    map: str,
    lam: float,
    method: str,
) -> EnsembleResult:
    """The result of a solve: ``solution`` is the solver's (w, history, n_iter, gap,
    converged); the loss is the data loss, without the regularization."""
    w, history, n_iter, gap, converged = solution
    return EnsembleResult(
        weights=w,
        loss=obj.loss(w),
        history=history,
        n_iter=n_iter,
        gap=gap,
        converged=converged,
        free=free_weights(w, map),
        map=map,
        regularization=lam,
        method=method,
    )


def _non_negative_number(x: object) -> bool:
    return is_number(x) and math.isfinite(x) and x >= 0


def check_fit_args(
    map: str, tol: float, max_iter: int, regularization: float | str, cv_folds: int
) -> None:
    get_map(map)
    if not (is_number(tol) and tol > 0):
        raise (ConvexMixError if is_number(tol) else ConvexMixTypeError)(
            f"tol must be a number > 0; got {tol!r}."
        )
    check_int(max_iter, "max_iter")
    if isinstance(regularization, str):
        if regularization != "cv":
            raise ConvexMixError(
                f"regularization must be a number >= 0 or 'cv'; got {regularization!r}."
            )
        check_int(cv_folds, "cv_folds", 2)
    elif not _non_negative_number(regularization):
        raise ConvexMixError(
            f"regularization must be a number >= 0 or 'cv'; got {regularization!r}."
        )


def fit_objective(
    obj: DataObjective,
    map: str,
    regularization: float | str,
    tol: float,
    max_iter: int,
    cv_folds: int,
    seed: int,
    callback: Callable[[int, float, float], None] | None,
    w0: Tensor | None = None,
) -> EnsembleResult:
    if isinstance(regularization, str):
        lam, start = cv_lambda(obj, cv_folds, float(tol), max_iter, seed)
        if w0 is None:
            w0 = start
    else:
        lam = float(regularization)
    if w0 is None:
        w0 = sample_start(obj, lam, max_iter)
    solved = Regularized(obj, lam) if lam > 0 else obj
    solution = solve(solved, stopping_gap(float(tol), obj.scale, lam), max_iter, callback, w0)
    return _result(obj, solution, map, lam, "newton")
