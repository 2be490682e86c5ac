"""convexmix.sklearn: scikit-learn's own estimator checks, the exact optimum against scipy
and fit_weights, the stacking layout, the conventions (clone, pickle, sample_weight,
feature names, Pipeline/GridSearchCV), the errors, the missing extra and the example."""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import convexmix
from convexmix.errors import ConvexMixError, InvalidProbabilitiesError, ShapeError

try:
    import sklearn
except ImportError:  # pragma: no cover - the [test] extra brings scikit-learn
    sklearn = None

ROOT = Path(__file__).resolve().parents[1]


def test_missing_extra_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without scikit-learn, importing convexmix.sklearn is an ImportError that says
    what to install (scikit-learn made unimportable through sys.modules)."""
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    for name in [m for m in sys.modules if m.startswith("convexmix.sklearn")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(convexmix, "sklearn", raising=False)
    with pytest.raises(ImportError, match=r'pip install "convexmix\[sklearn\]"'):
        importlib.import_module("convexmix.sklearn")


if sklearn is None:  # pragma: no cover

    def test_sklearn_absent() -> None:
        pytest.skip("scikit-learn is not installed (pip install 'convexmix[sklearn]')")

else:
    from sklearn.base import clone
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
    from sklearn.ensemble import StackingClassifier
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.model_selection import (
        GridSearchCV,
        KFold,
        StratifiedKFold,
        cross_val_predict,
        cross_val_score,
    )
    from sklearn.naive_bayes import GaussianNB
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor
    from sklearn.utils.estimator_checks import check_estimator, parametrize_with_checks

    from convexmix.ensemble import fit_weights
    from convexmix.sklearn import (
        ConvexBlendClassifier,
        ConvexBlendRegressor,
        ConvexStackingClassifier,
        ConvexStackingRegressor,
        expected_failed_checks,
    )

    def small_stack_classifier(**kw: Any) -> ConvexStackingClassifier:
        trees = [DecisionTreeClassifier(max_depth=3, random_state=s) for s in (0, 1)]
        return ConvexStackingClassifier([("t0", trees[0]), ("t1", trees[1])], cv=3, **kw)

    def small_stack_regressor(**kw: Any) -> ConvexStackingRegressor:
        trees = [DecisionTreeRegressor(max_depth=3, random_state=s) for s in (0, 1)]
        return ConvexStackingRegressor([("t0", trees[0]), ("t1", trees[1])], cv=3, **kw)

    ALL = [
        ConvexBlendRegressor(),
        ConvexBlendClassifier(),
        small_stack_classifier(),
        small_stack_regressor(),
    ]

    @parametrize_with_checks(ALL, expected_failed_checks=expected_failed_checks)
    def test_sklearn_estimator_checks(estimator: Any, check: Any) -> None:
        check(estimator)

    def test_expected_failures_are_exactly_the_non_probability_checks() -> None:
        """Every check the hook lists fails, and fails because its X is not class
        probabilities; every other check passes. The regressors list none."""
        assert expected_failed_checks(ConvexBlendRegressor()) == {}
        assert expected_failed_checks(small_stack_classifier()) == {}
        assert expected_failed_checks(small_stack_regressor()) == {}
        listed = expected_failed_checks(ConvexBlendClassifier())
        assert all("not class probabilities" in reason for reason in listed.values())
        results = check_estimator(ConvexBlendClassifier(), on_fail=None)
        failed = {r["check_name"]: r["exception"] for r in results if r["status"] == "failed"}
        skipped = {r["check_name"] for r in results if r["status"] == "skipped"}
        assert set(failed) == set(listed) - skipped
        for name, exc in failed.items():
            chain = []
            while exc is not None:
                chain.append(exc)
                exc = exc.__cause__ or exc.__context__
            ours = [
                e
                for e in chain
                if isinstance(e, (InvalidProbabilitiesError, ShapeError))
                or "ConvexBlendClassifier: with 2 classes" in str(e)
            ]
            assert ours, f"{name} failed for another reason: {chain[0]!r}"
            assert "ConvexBlendClassifier" in str(ours[0])

    # --- the exact optimum --------------------------------------------------------

    def scipy_simplex_lstsq(X: np.ndarray, y: np.ndarray, sw: np.ndarray) -> np.ndarray:
        from scipy.optimize import minimize

        s = sw / sw.sum()

        def f(w: np.ndarray) -> tuple[float, np.ndarray]:
            r = X @ w - y
            return float(s @ r**2), 2 * X.T @ (s * r)

        K = X.shape[1]
        res = minimize(
            f,
            np.full(K, 1.0 / K),
            jac=True,
            method="SLSQP",
            bounds=[(0, 1)] * K,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(K)}],
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        w: np.ndarray = res.x
        return w

    def blend_problem(seed: int, n: int = 2000, K: int = 8) -> tuple[np.ndarray, ...]:
        """K noisy predictors of y, some biased: the optimum is interior for some and zero
        for others."""
        rng = np.random.default_rng(seed)
        y = rng.normal(size=n)
        noise = rng.uniform(0.3, 2.0, size=K)
        X = y[:, None] + noise * rng.normal(size=(n, K)) + rng.normal(0, 0.5, size=K)
        sw = rng.integers(0, 4, size=n).astype(float)
        return X, y, sw

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_blend_regressor_is_the_scipy_optimum(seed: int) -> None:
        X, y, sw = blend_problem(seed)
        reg = ConvexBlendRegressor().fit(X, y, sample_weight=sw)
        ref = scipy_simplex_lstsq(X, y, sw)
        obj = lambda w: float(np.average((X @ w - y) ** 2, weights=sw))  # noqa: E731
        assert obj(reg.coef_) <= obj(ref) + 1e-10
        np.testing.assert_allclose(reg.coef_, np.clip(ref, 0, None), atol=1e-5)
        assert reg.coef_.min() >= 0
        assert reg.coef_.sum() == pytest.approx(1.0, abs=1e-12)
        assert reg.loss_ == pytest.approx(obj(reg.coef_), rel=1e-9)
        np.testing.assert_allclose(reg.predict(X), X @ reg.coef_, rtol=1e-12)

    @given(
        seed=st.integers(0, 2**31 - 1),
        n=st.integers(5, 60),
        K=st.integers(1, 6),
    )
    def test_blend_regressor_invariants(seed: int, n: int, K: int) -> None:
        """On the simplex; a column permutation permutes coef_; integer sample weights
        are repeated rows; scaling the weights, or shifting X and y together, changes
        nothing."""
        rng = np.random.default_rng(seed)
        X = rng.normal(size=(n, K))
        y = X @ rng.dirichlet(np.ones(K)) + 0.3 * rng.normal(size=n)
        sw = rng.integers(0, 3, size=n).astype(float)
        sw[0] = 1.0
        obj = lambda w, X=X: float(np.average((X @ w - y) ** 2, weights=sw))  # noqa: E731
        w = ConvexBlendRegressor().fit(X, y, sample_weight=sw).coef_
        assert w.min() >= 0
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        perm = rng.permutation(K)
        w_perm = ConvexBlendRegressor().fit(X[:, perm], y, sample_weight=sw).coef_
        assert obj(w_perm[np.argsort(perm)]) == pytest.approx(obj(w), rel=1e-7, abs=1e-12)
        rep = np.repeat(np.arange(n), sw.astype(int))
        w_rep = ConvexBlendRegressor().fit(X[rep], y[rep]).coef_
        assert obj(w_rep) == pytest.approx(obj(w), rel=1e-7, abs=1e-12)
        w_scaled = ConvexBlendRegressor().fit(X, y, sample_weight=7.5 * sw).coef_
        assert obj(w_scaled) == pytest.approx(obj(w), rel=1e-7, abs=1e-12)
        # a common offset of the columns and the target changes nothing on the simplex,
        # even a large one (the fit works on residuals)
        w_shift = ConvexBlendRegressor().fit(X + 1e6, y + 1e6, sample_weight=sw).coef_
        assert obj(w_shift) == pytest.approx(obj(w), rel=1e-6, abs=1e-9)

    def test_blend_regressor_caps() -> None:
        X, y, _sw = blend_problem(3)
        free = ConvexBlendRegressor().fit(X, y).coef_
        capped = ConvexBlendRegressor(max_weight=0.3).fit(X, y).coef_
        assert free.max() > 0.3
        assert capped.max() <= 0.3 + 1e-12
        np.testing.assert_allclose(
            capped, np.asarray(fit_weights(X.T, y, loss="mse", max_weight=0.3).weights)
        )
        two = ConvexBlendRegressor(max_models=2).fit(X, y).coef_
        assert np.count_nonzero(two) <= 2
        assert two.sum() == pytest.approx(1.0)

    # --- the classifier and the stacking layout -----------------------------------

    def oof_stack(X: np.ndarray, y: np.ndarray, models: list[Any], cv: Any) -> np.ndarray:
        return np.stack(
            [cross_val_predict(clone(m), X, y, cv=cv, method="predict_proba") for m in models]
        )

    @pytest.mark.parametrize("load", [load_breast_cancer, load_wine])
    def test_blend_classifier_in_stacking_classifier_equals_fit_weights(load: Any) -> None:
        """StackingClassifier(final_estimator=ConvexBlendClassifier()) and
        ConvexStackingClassifier both give fit_weights' weights on the out-of-fold
        probabilities (binary: scikit-learn keeps one column per model)."""
        X, y = load(return_X_y=True)
        models = [
            make_pipeline(StandardScaler(), LogisticRegression(C=0.05)),
            GaussianNB(),
            DecisionTreeClassifier(max_depth=3, random_state=0),
        ]
        cv = StratifiedKFold(5, shuffle=True, random_state=0)
        named = [(f"m{k}", m) for k, m in enumerate(models)]
        sk = StackingClassifier(
            named, final_estimator=ConvexBlendClassifier(), stack_method="predict_proba", cv=cv
        ).fit(X, y)
        ours = ConvexStackingClassifier(named, cv=cv).fit(X, y)
        ref = np.asarray(fit_weights(oof_stack(X, y, models, cv), y).weights)
        np.testing.assert_allclose(sk.final_estimator_.coef_, ref, atol=1e-6)
        np.testing.assert_allclose(list(ours.weights_.values()), ref, atol=1e-6)
        assert list(ours.weights_) == ["m0", "m1", "m2"]
        # predict_proba is the blend of the base models' (full-data) probabilities
        base = np.stack([e.predict_proba(X) for e in ours.estimators_])
        np.testing.assert_allclose(
            ours.predict_proba(X), np.einsum("knc,k->nc", base, ref), atol=1e-6
        )
        assert ours.score(X, y) > 0.9

    def test_blend_classifier_sample_weight_is_repetition() -> None:
        X, y = load_wine(return_X_y=True)
        models = [GaussianNB(), DecisionTreeClassifier(max_depth=2, random_state=0)]
        P = oof_stack(X, y, models, StratifiedKFold(3))
        Xs = np.concatenate(list(P), axis=1)  # (N, K * C): sklearn's layout
        sw = np.random.default_rng(0).integers(0, 4, size=len(y)).astype(float)
        w = ConvexBlendClassifier().fit(Xs, y, sample_weight=sw).coef_
        rep = np.repeat(np.arange(len(y)), sw.astype(int))
        w_rep = ConvexBlendClassifier().fit(Xs[rep], y[rep]).coef_
        np.testing.assert_allclose(w, w_rep, atol=1e-7)
        np.testing.assert_allclose(
            w, np.asarray(fit_weights(P, y, sample_weight=sw).weights), atol=1e-9
        )

    def test_blend_classifier_string_labels_and_caps() -> None:
        rng = np.random.default_rng(0)
        y = rng.choice(["ham", "spam"], size=300)
        truth = (y == "spam").astype(float)
        X = np.column_stack(
            [
                np.clip(truth * 0.6 + 0.2 + 0.1 * rng.normal(size=300), 0, 1),  # good
                rng.uniform(size=300),  # noise
                np.full(300, 0.5),  # uninformative
            ]
        )
        clf = ConvexBlendClassifier().fit(X, y)
        assert list(clf.classes_) == ["ham", "spam"]
        assert clf.coef_[0] > 0.9
        proba = clf.predict_proba(X)
        np.testing.assert_allclose(proba[:, 1], X @ clf.coef_, atol=1e-12)
        np.testing.assert_allclose(proba.sum(1), 1.0)
        assert set(clf.predict(X)) <= {"ham", "spam"}
        capped = ConvexBlendClassifier(max_weight=0.5).fit(X, y).coef_
        assert capped.max() <= 0.5 + 1e-12
        one = ConvexBlendClassifier(max_models=1).fit(X, y).coef_
        np.testing.assert_array_equal(one, [1.0, 0.0, 0.0])

    @pytest.mark.parametrize(
        ("X", "y", "error", "match"),
        [
            (
                [[0.2, -0.1], [0.5, 0.5]],
                [0, 1],
                InvalidProbabilitiesError,
                "Negative values in data",
            ),
            (
                [[0.2, 1.5], [0.5, 0.5]],
                [0, 1],
                InvalidProbabilitiesError,
                "probability of classes_",
            ),
            (
                [[0.2, 0.3, 0.5, 0.1], [1, 0, 0, 0], [0, 1, 0, 1]],
                [0, 1, 2],
                ShapeError,
                "multiple of 3",
            ),
            (
                [[0.2, 0.3, 0.6], [1, 0, 0], [0, 1, 0]],
                [0, 1, 2],
                InvalidProbabilitiesError,
                "sums to 1.1",
            ),
            ([[0.2], [0.3]], [1, 1], ConvexMixError, "at least 2 classes"),
        ],
    )
    def test_blend_classifier_rejects_what_is_not_probabilities(
        X: Any, y: Any, error: type[Exception], match: str
    ) -> None:
        with pytest.raises(error, match=match):
            ConvexBlendClassifier().fit(X, y)

    def test_predict_checks_probabilities_too() -> None:
        clf = ConvexBlendClassifier().fit([[0.2, 0.7], [0.9, 0.6]], [0, 1])
        with pytest.raises(ValueError, match="Negative values in data"):
            clf.predict([[-0.1, 0.5]])
        with pytest.raises(ValueError, match="2 features"):
            clf.predict([[0.1, 0.5, 0.3]])

    @pytest.mark.parametrize("Est", [ConvexBlendClassifier, ConvexBlendRegressor])
    @pytest.mark.parametrize(
        ("params", "match"),
        [
            ({"max_weight": 0.0}, "max_weight must be"),
            ({"max_weight": 1.5}, "max_weight must be"),
            ({"max_weight": "0.5"}, "max_weight must be"),
            ({"max_models": 0}, "max_models must be"),
            ({"max_models": 1.5}, "max_models must be"),
            ({"max_weight": 0.2}, "infeasible"),
        ],
    )
    def test_bad_parameters_fail_in_fit_not_init(
        Est: Any, params: dict[str, Any], match: str
    ) -> None:
        est = Est(**params)  # scikit-learn: __init__ and set_params never validate
        Est().set_params(**params)
        with pytest.raises(ConvexMixError, match=match):
            est.fit([[0.3, 0.7], [0.6, 0.2]], [0, 1])

    def test_stacking_checks_caps_before_fitting_base_models() -> None:
        fitted: list[int] = []

        class Spy(GaussianNB):  # type: ignore[misc]
            def fit(self, X: Any, y: Any, sample_weight: Any = None) -> Any:
                fitted.append(1)
                return super().fit(X, y, sample_weight)

        stack = ConvexStackingClassifier([("a", Spy()), ("b", Spy())], max_weight=0.4)
        X, y = load_breast_cancer(return_X_y=True)
        with pytest.raises(ConvexMixError, match=r"infeasible: 2 model\(s\)"):
            stack.fit(X, y)
        assert fitted == []

    # --- conventions ----------------------------------------------------------------

    def test_stacking_regressor_weights_drop_and_sample_weight() -> None:
        X, y = load_diabetes(return_X_y=True)
        models = [
            ("ridge", Ridge()),
            ("skip", "drop"),
            ("tree", DecisionTreeRegressor(max_depth=3, random_state=0)),
        ]
        cv = KFold(5, shuffle=True, random_state=0)
        sw = np.random.default_rng(1).uniform(0.5, 2.0, size=len(y))
        stack = ConvexStackingRegressor(models, cv=cv).fit(X, y, sample_weight=sw)
        assert list(stack.weights_) == ["ridge", "tree"]
        oof = np.stack(
            [
                cross_val_predict(m, X, y, cv=cv, params={"sample_weight": sw})
                for m in (Ridge(), DecisionTreeRegressor(max_depth=3, random_state=0))
            ]
        )
        ref = np.asarray(fit_weights(oof, y, loss="mse", sample_weight=sw).weights)
        np.testing.assert_allclose(list(stack.weights_.values()), ref, atol=1e-6)
        base = np.stack([e.predict(X) for e in stack.estimators_])
        np.testing.assert_allclose(stack.predict(X), ref @ base, rtol=1e-6)

    def test_clone_params_pickle_and_html() -> None:
        X, y = load_wine(return_X_y=True)
        stack = small_stack_classifier(max_weight=0.9, n_jobs=2)
        params = stack.get_params()
        assert params["max_weight"] == 0.9
        assert "t0__max_depth" in params
        assert "final_estimator" not in params
        assert "stack_method" not in params
        twin = clone(stack).set_params(t0__max_depth=2, max_models=1)
        assert twin.get_params()["t0__max_depth"] == 2
        assert stack.get_params()["t0__max_depth"] == 3
        stack.fit(X, y)
        again = pickle.loads(pickle.dumps(stack))
        np.testing.assert_array_equal(again.predict_proba(X), stack.predict_proba(X))
        assert again.weights_ == stack.weights_
        html = stack._repr_html_()
        assert "ConvexBlendClassifier" in html
        assert "final_estimator" in html
        assert "t1" in html
        assert "max_weight=0.9" in repr(stack)

    def test_feature_names_in() -> None:
        pd = pytest.importorskip("pandas")
        X, y = load_breast_cancer(return_X_y=True, as_frame=True)
        stack = ConvexStackingClassifier([("nb", GaussianNB())], cv=3).fit(X, y)
        assert list(stack.feature_names_in_) == list(X.columns)
        P = pd.DataFrame({"nb": np.linspace(0, 1, len(y)), "lr": 0.5})
        clf = ConvexBlendClassifier().fit(P, y)
        assert list(clf.feature_names_in_) == ["nb", "lr"]
        assert clf.n_features_in_ == 2

    def test_pipeline_grid_search_and_cross_val_score_with_n_jobs() -> None:
        X, y = load_breast_cancer(return_X_y=True)
        stack = ConvexStackingClassifier(
            [("lr", LogisticRegression(max_iter=500)), ("nb", GaussianNB())], cv=3, n_jobs=2
        )
        pipe = make_pipeline(StandardScaler(), stack)
        scores = cross_val_score(pipe, X, y, cv=3, scoring="neg_log_loss", n_jobs=2)
        assert scores.shape == (3,)
        assert (scores > -0.3).all()
        grid = GridSearchCV(
            pipe, {"convexstackingclassifier__max_models": [1, 2]}, cv=3, scoring="neg_log_loss"
        ).fit(X, y)
        best = grid.best_estimator_[-1]
        assert (
            sum(w > 0 for w in best.weights_.values())
            <= grid.best_params_["convexstackingclassifier__max_models"]
        )

    # --- the documentation's example ------------------------------------------------

    def test_example_runs_quick() -> None:
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "sklearn_stacking.py"), "--quick"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
        for row in (
            "convex stacking",
            "LogisticRegression stacking",
            "equal weights",
            "best single",
            "Caruana",
        ):
            assert row in out
