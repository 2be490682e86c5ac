"""The convex final estimators: :class:`ConvexBlendRegressor` (least squares) and
:class:`ConvexBlendClassifier` (log-loss on stacked class probabilities), both solved
exactly by :func:`convexmix.ensemble.fit_weights`."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

from convexmix._optional import require

_base = require("sklearn.base", purpose="convexmix.sklearn")
_validation = require("sklearn.utils.validation", purpose="convexmix.sklearn")
_multiclass = require("sklearn.utils.multiclass", purpose="convexmix.sklearn")

import numpy as np  # noqa: E402  (scikit-learn's own dependency, so present with it)
import numpy.typing as npt  # noqa: E402

from convexmix import ensemble  # noqa: E402
from convexmix.errors import ConvexMixError, InvalidProbabilitiesError, ShapeError  # noqa: E402

_BaseEstimator: Any = _base.BaseEstimator
_ClassifierMixin: Any = _base.ClassifierMixin
_RegressorMixin: Any = _base.RegressorMixin

__all__ = ["ConvexBlendClassifier", "ConvexBlendRegressor"]

Array = npt.NDArray[np.float64]

#: Each model's block of class probabilities must sum to 1 within this tolerance (the
#: tolerance of :func:`convexmix.ensemble.fit_weights`).
PROB_ATOL = 1e-3


def check_caps(est: Any, n_models: int | None = None) -> None:
    """``max_weight`` in (0, 1] and ``max_models`` >= 1 (or None), and with ``n_models``
    known, feasible: ``min(max_models, n_models) * max_weight >= 1``."""
    cap, k = est.max_weight, est.max_models
    if cap is not None and (
        isinstance(cap, bool) or not isinstance(cap, Real) or not 0 < float(cap) <= 1
    ):
        raise ConvexMixError(f"max_weight must be None or a number in (0, 1]; got {cap!r}.")
    if k is not None and (isinstance(k, bool) or not isinstance(k, Integral) or k < 1):
        raise ConvexMixError(f"max_models must be None or an integer >= 1; got {k!r}.")
    if n_models is not None and cap is not None:
        most = min(n_models, n_models if k is None else int(k))
        if most * float(cap) < 1.0 - 1e-12:
            raise ConvexMixError(
                f"infeasible: {most} model(s) with weights of at most max_weight={cap} sum "
                f"to at most {most * float(cap):.6g} < 1 (need max_weight >= 1/{most})."
            )


def check_sample_weight(sample_weight: Any, n_samples: int) -> Array | None:
    """(N,) float64 sample weights: finite, >= 0, not all zero; a number means that
    weight for every sample; None stays None."""
    if sample_weight is None:
        return None
    if isinstance(sample_weight, Real):
        sample_weight = np.full(n_samples, float(sample_weight))
    sw = _validation.check_array(
        sample_weight, ensure_2d=False, dtype=np.float64, input_name="sample_weight"
    )
    if sw.ndim != 1 or sw.shape[0] != n_samples:
        raise ShapeError(
            f"sample_weight must be of shape ({n_samples},) like the rows of X; "
            f"got shape {sw.shape}."
        )
    if (sw < 0).any():
        raise ConvexMixError("sample_weight must be >= 0; got negative values.")
    if not sw.any():
        raise ConvexMixError("sample_weight must not be all zero: no sample would count.")
    return np.array(sw, dtype=np.float64)  # a copy: never the caller's array


def _simplex_fit(est: Any, P: Array, y: Any, loss: str, sample_weight: Array | None) -> None:
    """Set ``coef_`` and ``loss_`` from the exact fit on (K, N[, C]) predictions."""
    check_caps(est, n_models=P.shape[0])
    fit = ensemble.fit_weights(
        P,
        y,
        loss=loss,  # type: ignore[arg-type]
        sample_weight=sample_weight,
        max_weight=None if est.max_weight is None else float(est.max_weight),
        max_models=None if est.max_models is None else int(est.max_models),
    )
    est.coef_ = np.asarray(fit.weights, dtype=np.float64).copy()
    est.loss_ = float(fit.loss)


def least_squares_rows(X: Array, y: Array, sample_weight: Array | None) -> Array:
    """K rows ``Z`` (K, K) with the same mean squared error as ``(X, y)`` weighted by
    ``sample_weight``, for every ``w`` on the simplex:
    ``mean((Z @ w) ** 2) == average((X @ w - y) ** 2, weights=sample_weight)``.

    On the simplex ``X @ w - y == D @ w`` with the residuals ``D = X - y[:, None]``, so
    the loss is ``w @ G @ w`` with the weighted Gram matrix ``G`` of ``D`` (K square,
    one BLAS product over the N rows; residuals, not raw columns, so that a large common
    offset of X and y cancels before it can cost precision). ``Z`` is
    ``sqrt(K) * diag(sqrt(lambda)) @ V.T`` from ``G = V diag(lambda) V.T``, whose Gram
    matrix is ``G`` again (a rank-deficient ``G``, from duplicate columns, is fine).
    """
    n, k = X.shape
    D = X - y[:, None]
    if sample_weight is None:
        G = D.T @ D / n
    else:
        G = (D * (sample_weight / sample_weight.sum())[:, None]).T @ D
    lam, V = np.linalg.eigh((G + G.T) / 2)
    Z: Array = np.sqrt(np.clip(lam, 0.0, None) * k)[:, None] * V.T
    return Z


class ConvexBlendRegressor(_RegressorMixin, _BaseEstimator):  # type: ignore[misc]
    """Least squares on the simplex: ``y ≈ X @ coef_`` with ``coef_ >= 0`` summing to 1.

    The columns of ``X`` are the predictions of the models to blend (for instance
    ``StackingRegressor``'s cross-validated predictions); the fit is the exact optimum of
    the (sample-weighted) mean squared error over the simplex, by
    :func:`convexmix.ensemble.fit_weights` with ``loss="mse"``. The fit runs on
    ``n_features`` rows made from the weighted Gram matrix of the residuals
    ``X - y[:, None]`` (one BLAS product over the N rows), which have the same squared
    error as ``(X, y)`` for every weight vector on the simplex. It is the final
    estimator of :class:`ConvexStackingRegressor`.

    Args:
        max_weight: a cap on every weight, in (0, 1]; ``fit`` needs
            ``max_weight >= 1/n_features``.
        max_models: at most this many non-zero weights (exact for up to 24 columns).

    Attributes:
        coef_: (n_features,) float64 weights, >= 0, summing to 1; exact zeros for the
            columns the optimum leaves out.
        loss_: the training objective, the weighted mean squared error at ``coef_``.
        n_features_in_: the number of columns seen in ``fit``.
        feature_names_in_: the column names seen in ``fit``, when they were all strings.

    >>> import numpy as np
    >>> from convexmix.sklearn import ConvexBlendRegressor
    >>> X = np.random.default_rng(0).normal(size=(200, 3))
    >>> y = X @ np.array([0.25, 0.75, 0.0])
    >>> reg = ConvexBlendRegressor().fit(X, y)
    >>> reg.coef_
    array([0.25, 0.75, 0.  ])
    >>> float(ConvexBlendRegressor(max_weight=0.6).fit(X, y).coef_.max())
    0.6
    """

    def __init__(self, max_weight: float | None = None, max_models: int | None = None) -> None:
        self.max_weight = max_weight
        self.max_models = max_models

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> ConvexBlendRegressor:
        """Fit the convex weights.

        Args:
            X: (n_samples, n_features) predictions of the models to blend.
            y: (n_samples,) regression targets.
            sample_weight: optional (n_samples,) non-negative sample weights.

        Returns:
            The fitted estimator.
        """
        check_caps(self)
        X, y = _validation.validate_data(self, X, y, dtype=np.float64, y_numeric=True)
        sw = check_sample_weight(sample_weight, X.shape[0])
        # On the simplex X @ w - y is (X - y) @ w: the fit runs on residuals against 0,
        # compressed to K rows with the same Gram matrix where there are more rows.
        if X.shape[0] > X.shape[1]:
            P, sw = least_squares_rows(X, y, sw).T, None
        else:
            P = (X - y[:, None]).T
        _simplex_fit(self, P, np.zeros(P.shape[1]), "mse", sw)
        return self

    def predict(self, X: Any) -> Array:
        """The blend ``X @ coef_``, shape (n_samples,)."""
        _validation.check_is_fitted(self)
        X = _validation.validate_data(self, X, dtype=np.float64, reset=False)
        out: Array = X @ self.coef_
        return out

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        # A convex blend of arbitrary features is a weak regressor; of models' predictions
        # (its use), it is the point.
        tags.regressor_tags.poor_score = True
        return tags


def probability_blocks(est: Any, X: Array, n_classes: int) -> Array:
    """The (K, N) or (K, N, C) probabilities held in ``X`` (N, K) or (N, K * C), in
    ``StackingClassifier(stack_method="predict_proba")``'s layout; raises
    :class:`~convexmix.errors.InvalidProbabilitiesError` (a ``ValueError``) otherwise."""
    name = type(est).__name__
    lo = float(X.min())
    if lo < 0:
        raise InvalidProbabilitiesError(
            f"Negative values in data passed to {name}: X must hold the base models' "
            f"class probabilities; got a minimum of {lo:.6g}."
        )
    if n_classes == 2:
        hi = float(X.max())
        if hi > 1 + PROB_ATOL:
            raise InvalidProbabilitiesError(
                f"{name}: with 2 classes, X holds one column per model, its probability "
                f"of classes_[1], in [0, 1]; got a maximum of {hi:.6g}."
            )
        binary: Array = np.minimum(X, 1.0).T if hi > 1 else X.T
        return binary
    n, f = X.shape
    if f % n_classes:
        raise ShapeError(
            f"{name}: with {n_classes} classes, X holds a block of {n_classes} class "
            f"probabilities per model (StackingClassifier(stack_method='predict_proba')'s "
            f"layout), so its number of columns must be a multiple of {n_classes}; got {f}."
        )
    blocks = X.reshape(n, f // n_classes, n_classes)
    sums = blocks.sum(axis=2)
    bad = np.abs(sums - 1.0) > PROB_ATOL
    if bad.any():
        row, model = (int(i) for i in np.argwhere(bad)[0])
        raise InvalidProbabilitiesError(
            f"{name}: X must hold one block of {n_classes} class probabilities per model, "
            f"each summing to 1 (within {PROB_ATOL}); the block of model {model} (columns "
            f"{model * n_classes} to {model * n_classes + n_classes - 1}) in row {row} sums "
            f"to {float(sums[row, model]):.6g}."
        )
    out: Array = blocks.transpose(1, 0, 2)
    return out


class ConvexBlendClassifier(_ClassifierMixin, _BaseEstimator):  # type: ignore[misc]
    """The convex blend of models' class probabilities with the least log-loss.

    ``X`` holds the stacked class probabilities of K models in the layout that
    ``StackingClassifier(stack_method="predict_proba")`` produces: one block of
    ``n_classes`` columns per model, in the order of ``classes_``, or for two classes
    one column per model, its probability of ``classes_[1]`` (scikit-learn drops the
    first column). ``predict_proba`` is ``sum_k coef_[k] * P_k``, with the weights that
    minimise the (sample-weighted) log-loss over the simplex exactly
    (:func:`convexmix.ensemble.fit_weights`). Use it as ``StackingClassifier``'s
    ``final_estimator``, or through :class:`ConvexStackingClassifier`.

    Rows that are not probabilities (negative values, binary columns above 1, blocks
    that do not sum to 1 within 1e-3, a number of columns that is not a multiple of the
    number of classes) raise :class:`~convexmix.errors.InvalidProbabilitiesError` or
    :class:`~convexmix.errors.ShapeError`, both ``ValueError``.

    Args:
        max_weight: a cap on every weight, in (0, 1]; ``fit`` needs
            ``max_weight >= 1/n_models``.
        max_models: at most this many models with non-zero weight.

    Attributes:
        coef_: (n_models,) float64 weights, >= 0, summing to 1.
        loss_: the training log-loss at ``coef_``.
        classes_: (n_classes,) the class labels.
        n_features_in_: the number of columns seen in ``fit``.
        feature_names_in_: the column names seen in ``fit``, when they were all strings.

    >>> import numpy as np
    >>> from convexmix.sklearn import ConvexBlendClassifier
    >>> y = np.array([0, 1, 1, 0])
    >>> good = [0.2, 0.7, 0.8, 0.4]  # two models' probabilities of class 1
    >>> bad = [0.5, 0.4, 0.5, 0.5]
    >>> clf = ConvexBlendClassifier().fit(np.column_stack([good, bad]), y)
    >>> clf.coef_
    array([1., 0.])
    >>> clf.predict(np.array([[0.9, 0.1]]))
    array([1])
    """

    def __init__(self, max_weight: float | None = None, max_models: int | None = None) -> None:
        self.max_weight = max_weight
        self.max_models = max_models

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> ConvexBlendClassifier:
        """Fit the convex weights.

        Args:
            X: (n_samples, n_models) probabilities of ``classes_[1]`` (two classes) or
                (n_samples, n_models * n_classes) class probabilities.
            y: (n_samples,) class labels.
            sample_weight: optional (n_samples,) non-negative sample weights.

        Returns:
            The fitted estimator.
        """
        check_caps(self)
        X, y = _validation.validate_data(self, X, y, dtype=np.float64)
        _multiclass.check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ConvexMixError(
                f"{type(self).__name__} needs samples of at least 2 classes; got 1 class "
                f"({self.classes_[0]!r})."
            )
        sw = check_sample_weight(sample_weight, X.shape[0])
        P = probability_blocks(self, X, len(self.classes_))
        _simplex_fit(self, P, encoded, "log_loss", sw)
        return self

    def predict_proba(self, X: Any) -> Array:
        """The blended class probabilities, shape (n_samples, n_classes)."""
        _validation.check_is_fitted(self)
        X = _validation.validate_data(self, X, dtype=np.float64, reset=False)
        P = probability_blocks(self, X, len(self.classes_))
        if P.ndim == 2:
            p1 = np.clip(P.T @ self.coef_, 0.0, 1.0)
            return np.column_stack([1.0 - p1, p1])
        out: Array = np.einsum("knc,k->nc", P, self.coef_)
        out /= out.sum(axis=1, keepdims=True)
        return out

    def predict(self, X: Any) -> Any:
        """The class of the highest blended probability, shape (n_samples,)."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True  # probabilities
        return tags
