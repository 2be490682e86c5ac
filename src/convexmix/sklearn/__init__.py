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

#: The checks of scikit-learn's estimator suite that fit ConvexBlendClassifier on data set
#: or random features: not class probabilities, which it rejects by design.
_CLASSIFIER_FAILS: dict[str, str] = {
    f"check_{name}": (
        "fits ConvexBlendClassifier on data set or random features, which are not class "
        "probabilities (negative, above 1, or in blocks that do not sum to 1): it raises "
        "a ValueError for them by design"
    )
    for name in [
        "classifier_data_not_an_array",
        "classifiers_classes",
        "classifiers_train",
        "dict_unchanged",
        "dont_overwrite_parameters",
        "dtype_object",
        "estimators_dtypes",
        "estimators_fit_returns_self",
        "estimators_overwrite_params",
        "estimators_pickle",
        "f_contiguous_array_estimator",
        "fit2d_1feature",
        "fit2d_predict1d",
        "fit_check_is_fitted",
        "fit_idempotent",
        "fit_score_takes_y",
        "methods_sample_order_invariance",
        "methods_subset_invariance",
        "n_features_in",
        "n_features_in_after_fitting",
        "pipeline_consistency",
        "readonly_memmap_input",
        "sample_weight_equivalence_on_dense_data",
        "sample_weights_list",
        "sample_weights_not_an_array",
        "sample_weights_not_overwritten",
        "sample_weights_pandas_series",
        "sample_weights_shape",
        "supervised_y_2d",
    ]
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
