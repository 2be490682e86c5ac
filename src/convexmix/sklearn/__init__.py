"""scikit-learn estimators for exact convex blends (needs the ``[sklearn]`` extra:
``pip install "convexmix[sklearn]"``).

- :class:`ConvexBlendRegressor`: least squares on the simplex, ``y ≈ X @ coef_``.
- :class:`ConvexBlendClassifier`: the log-loss-optimal convex blend of stacked class
  probabilities (``StackingClassifier(stack_method="predict_proba")``'s layout).
- :class:`ConvexStackingClassifier`, :class:`ConvexStackingRegressor`: scikit-learn's
  stacking with these as the final estimator, and ``weights_`` by estimator name.
- :func:`expected_failed_checks`: the hook of scikit-learn's ``parametrize_with_checks``.

Each fit is the exact optimum of :func:`convexmix.ensemble.fit_weights`.

>>> from sklearn.datasets import load_wine
>>> from sklearn.naive_bayes import GaussianNB
>>> from sklearn.tree import DecisionTreeClassifier
>>> from convexmix.sklearn import ConvexStackingClassifier
>>> X, y = load_wine(return_X_y=True)
>>> models = [("nb", GaussianNB()), ("tree", DecisionTreeClassifier(max_depth=3, random_state=0))]
>>> stack = ConvexStackingClassifier(models, cv=5).fit(X, y)
>>> {name: round(w, 3) for name, w in stack.weights_.items()}
{'nb': 0.8..., 'tree': 0.1...}
"""

from __future__ import annotations

from typing import Any

from convexmix.sklearn._blend import ConvexBlendClassifier, ConvexBlendRegressor
from convexmix.sklearn._stacking import ConvexStackingClassifier, ConvexStackingRegressor

__all__ = [
    "ConvexBlendClassifier",
    "ConvexBlendRegressor",
    "ConvexStackingClassifier",
    "ConvexStackingRegressor",
    "expected_failed_checks",
]

_ABOVE_1 = "2 classes, and X has values above 1: one column per model must be a probability"
_BLOCKS = "3 classes, and X's blocks of 3 columns do not sum to 1 per row"
_COLUMNS = "classes, and X's number of columns is not a multiple of the number of classes"

#: The checks of scikit-learn's ``check_estimator`` that fit ConvexBlendClassifier on
#: features that are not class probabilities (random or dataset features), and why.
_CLASSIFIER_FAILS: dict[str, str] = {
    f"check_{name}": f"its X is not class probabilities ({why})"
    for name, why in {
        "classifier_data_not_an_array": _ABOVE_1,
        "classifiers_classes": _ABOVE_1,
        "classifiers_train": _ABOVE_1,
        "dict_unchanged": _BLOCKS,
        "dont_overwrite_parameters": _BLOCKS,
        "dtype_object": f"4 {_COLUMNS}",
        "estimators_dtypes": _ABOVE_1,
        "estimators_fit_returns_self": f"3 {_COLUMNS}",
        "estimators_overwrite_params": f"3 {_COLUMNS}",
        "estimators_pickle": _ABOVE_1,
        "f_contiguous_array_estimator": _BLOCKS,
        "fit2d_1feature": f"{_ABOVE_1}; rejected before the 1-feature error it expects",
        "fit2d_predict1d": _BLOCKS,
        "fit_check_is_fitted": _ABOVE_1,
        "fit_idempotent": _ABOVE_1,
        "fit_score_takes_y": _BLOCKS,
        "methods_sample_order_invariance": _BLOCKS,
        "methods_subset_invariance": _BLOCKS,
        "n_features_in": _ABOVE_1,
        "n_features_in_after_fitting": f"3 {_COLUMNS}",
        "pipeline_consistency": _ABOVE_1,
        "readonly_memmap_input": f"3 {_COLUMNS}",
        "sample_weight_equivalence_on_dense_data": _BLOCKS,
        "sample_weights_list": _BLOCKS,
        "sample_weights_not_an_array": _ABOVE_1,
        "sample_weights_not_overwritten": _ABOVE_1,
        "sample_weights_pandas_series": _ABOVE_1,
        "sample_weights_shape": _ABOVE_1,
        "supervised_y_2d": _BLOCKS,
    }.items()
}


def expected_failed_checks(estimator: Any) -> dict[str, str]:
    """The checks of scikit-learn's estimator suite that ``estimator`` is expected to
    fail, each with its reason: the ``expected_failed_checks`` of
    ``sklearn.utils.estimator_checks.parametrize_with_checks`` and ``check_estimator``.

    Empty for the regressors and the stacking estimators: they pass every check. For
    :class:`ConvexBlendClassifier` it lists the checks that fit it on features that are
    not class probabilities (dataset or random features, negative or above 1, or in
    blocks that do not sum to 1), which it rejects with a ``ValueError`` by design;
    the other checks pass. The stacking classifier passes them all with it inside.

    Args:
        estimator: an estimator instance.

    Returns:
        ``{check name: reason}``.

    >>> from convexmix.sklearn import ConvexBlendRegressor, expected_failed_checks
    >>> expected_failed_checks(ConvexBlendRegressor())
    {}
    """
    if isinstance(estimator, ConvexBlendClassifier):
        return dict(_CLASSIFIER_FAILS)
    return {}
