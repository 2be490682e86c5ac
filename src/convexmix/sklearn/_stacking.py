"""scikit-learn's stacking with the convex final estimator built in:
:class:`ConvexStackingClassifier` and :class:`ConvexStackingRegressor`."""

from __future__ import annotations

from typing import Any

from convexmix._optional import require

_ensemble = require("sklearn.ensemble", purpose="convexmix.sklearn")

import numpy as np  # noqa: E402  (scikit-learn's own dependency)

from convexmix.sklearn._blend import (  # noqa: E402
    ConvexBlendClassifier,
    ConvexBlendRegressor,
    check_caps,
    check_sample_weight,
)

__all__ = ["ConvexStackingClassifier", "ConvexStackingRegressor"]

_StackingClassifier: Any = _ensemble.StackingClassifier
_StackingRegressor: Any = _ensemble.StackingRegressor


def _n_rows(X: Any) -> int:
    """The number of rows of anything the base models may take (arrays, sparse
    matrices, data frames, lists, array-likes), without converting it."""
    shape = getattr(X, "shape", None)
    if shape is not None and len(shape):
        return int(shape[0])
    if hasattr(X, "__len__"):
        return len(X)
    return int(np.asarray(X).shape[0])


def _fit(
    self: Any, parent: Any, X: Any, y: Any, sample_weight: Any, fit_params: dict[str, Any]
) -> Any:
    """Check the caps (before any base model is fitted), fit as scikit-learn's stacking
    does, and name the final weights."""
    used = [name for name, est in self.estimators if not _dropped(est)] if _is_list(self) else []
    check_caps(self, n_models=len(used) or None)
    if sample_weight is not None:
        sw = check_sample_weight(sample_weight, _n_rows(X))
        fit_params = {**fit_params, "sample_weight": sw}
    parent.fit(self, X, y, **fit_params)
    self.weights_ = dict(zip(used, self.final_estimator_.coef_.tolist(), strict=True))
    return self


def _dropped(est: Any) -> bool:
    return isinstance(est, str) and est == "drop"


def _is_list(self: Any) -> bool:
    est = self.estimators
    return isinstance(est, list) and all(isinstance(e, tuple) and len(e) == 2 for e in est)


class ConvexStackingClassifier(_StackingClassifier):  # type: ignore[misc]
    """``StackingClassifier`` whose final estimator is the exact convex blend of the base
    models' out-of-fold class probabilities (:class:`ConvexBlendClassifier`, log-loss).

    The base models are fitted on all of ``X``; their ``predict_proba`` on the ``cv``
    folds they did not see is the blend's training data, as in scikit-learn's
    ``StackingClassifier(stack_method="predict_proba")``. ``weights_`` names each
    model's weight. Everything else (``estimators_``, ``named_estimators_``,
    ``transform``, ``"drop"``, ``cv="prefit"``, ``n_jobs`` through joblib) is
    scikit-learn's.

    Args:
        estimators: a list of ``(name, classifier)`` pairs; each needs ``predict_proba``.
        cv: the cross-validation of the out-of-fold probabilities: a number of
            (stratified) folds, a splitter, an iterable of splits, or "prefit".
        n_jobs: jobs for the base models' fits (joblib), as in scikit-learn.
        verbose: scikit-learn's verbosity.
        max_weight: a cap on every weight, ``1/n_models <= max_weight <= 1``.
        max_models: at most this many models with non-zero weight.

    Attributes:
        weights_: ``{name: weight}`` for each estimator not dropped, in order; the
            weights are >= 0 and sum to 1.
        final_estimator_: the fitted :class:`ConvexBlendClassifier` (``coef_``).
        estimators_: the base models, refitted on all the rows; ``named_estimators_``,
            ``classes_``, ``stack_method_``, ``n_features_in_`` and
            ``feature_names_in_`` are as in ``StackingClassifier`` too.

    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.naive_bayes import GaussianNB
    >>> from sklearn.tree import DecisionTreeClassifier
    >>> from convexmix.sklearn import ConvexStackingClassifier
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> stack = ConvexStackingClassifier(
    ...     [("nb", GaussianNB()), ("tree", DecisionTreeClassifier(max_depth=3, random_state=0))]
    ... ).fit(X, y)
    >>> sorted(stack.weights_)
    ['nb', 'tree']
    >>> round(sum(stack.weights_.values()), 12)
    1.0
    >>> stack.predict_proba(X[:2]).shape
    (2, 2)
    """

    stack_method = "predict_proba"
    passthrough = False

    def __init__(
        self,
        estimators: list[tuple[str, Any]],
        *,
        cv: Any = 5,
        n_jobs: int | None = None,
        verbose: int = 0,
        max_weight: float | None = None,
        max_models: int | None = None,
    ) -> None:
        self.estimators = estimators
        self.cv = cv
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.max_weight = max_weight
        self.max_models = max_models

    @property
    def final_estimator(self) -> ConvexBlendClassifier:
        """The unfitted final estimator: ``ConvexBlendClassifier(max_weight, max_models)``."""
        return ConvexBlendClassifier(max_weight=self.max_weight, max_models=self.max_models)

    def fit(
        self, X: Any, y: Any, sample_weight: Any = None, **fit_params: Any
    ) -> ConvexStackingClassifier:
        """Fit the base models, and the convex weights on their out-of-fold probabilities.

        Args:
            X: (n_samples, n_features) training data, as the base models take it.
            y: (n_samples,) class labels.
            sample_weight: optional (n_samples,) weights, passed to every base model's
                ``fit`` and to the blend's log-loss.
            **fit_params: further metadata, routed as scikit-learn's stacking routes it.

        Returns:
            The fitted estimator.
        """
        out: ConvexStackingClassifier = _fit(
            self, _StackingClassifier, X, y, sample_weight, fit_params
        )
        return out


class ConvexStackingRegressor(_StackingRegressor):  # type: ignore[misc]
    """``StackingRegressor`` whose final estimator is the exact least-squares convex blend
    of the base models' out-of-fold predictions (:class:`ConvexBlendRegressor`).

    Args:
        estimators: a list of ``(name, regressor)`` pairs.
        cv: the cross-validation of the out-of-fold predictions: a number of folds, a
            splitter, an iterable of splits, or "prefit".
        n_jobs: jobs for the base models' fits (joblib), as in scikit-learn.
        verbose: scikit-learn's verbosity.
        max_weight: a cap on every weight, ``1/n_models <= max_weight <= 1``.
        max_models: at most this many models with non-zero weight.

    Attributes:
        weights_: ``{name: weight}`` for each estimator not dropped, in order; the
            weights are >= 0 and sum to 1.
        final_estimator_: the fitted :class:`ConvexBlendRegressor` (``coef_``).
        estimators_: the base models, refitted on all the rows; ``named_estimators_``,
            ``stack_method_``, ``n_features_in_`` and ``feature_names_in_`` are as in
            ``StackingRegressor`` too.

    >>> from sklearn.datasets import load_diabetes
    >>> from sklearn.linear_model import Ridge
    >>> from sklearn.tree import DecisionTreeRegressor
    >>> from convexmix.sklearn import ConvexStackingRegressor
    >>> X, y = load_diabetes(return_X_y=True)
    >>> stack = ConvexStackingRegressor(
    ...     [("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=3, random_state=0))]
    ... ).fit(X, y)
    >>> list(stack.weights_)
    ['ridge', 'tree']
    >>> stack.predict(X[:3]).shape
    (3,)
    """

    stack_method = "predict"
    passthrough = False

    def __init__(
        self,
        estimators: list[tuple[str, Any]],
        *,
        cv: Any = 5,
        n_jobs: int | None = None,
        verbose: int = 0,
        max_weight: float | None = None,
        max_models: int | None = None,
    ) -> None:
        self.estimators = estimators
        self.cv = cv
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.max_weight = max_weight
        self.max_models = max_models

    @property
    def final_estimator(self) -> ConvexBlendRegressor:
        """The unfitted final estimator: ``ConvexBlendRegressor(max_weight, max_models)``."""
        return ConvexBlendRegressor(max_weight=self.max_weight, max_models=self.max_models)

    def fit(
        self, X: Any, y: Any, sample_weight: Any = None, **fit_params: Any
    ) -> ConvexStackingRegressor:
        """Fit the base models, and the convex weights on their out-of-fold predictions.

        Args:
            X: (n_samples, n_features) training data, as the base models take it.
            y: (n_samples,) regression targets.
            sample_weight: optional (n_samples,) weights, passed to every base model's
                ``fit`` and to the blend's squared error.
            **fit_params: further metadata, routed as scikit-learn's stacking routes it.

        Returns:
            The fitted estimator.
        """
        out: ConvexStackingRegressor = _fit(
            self, _StackingRegressor, X, y, sample_weight, fit_params
        )
        return out
