"""The ``convexmix demo`` job: blend weights for scikit-learn classifiers (private).

For each dataset bundled with scikit-learn (nothing is downloaded):

1. split off a stratified test set;
2. train a set of different classifiers and take their out-of-fold class probabilities
   on the training split (5-fold ``cross_val_predict``), then refit each on the whole
   training split and predict the test split;
3. fit blend weights on the out-of-fold predictions with every method, and score each
   blend on the test split. The fit times are each method's first call on the dataset
   (for the first dataset the first call of the process, with any set-up it pays).

Needs the ``[demo]`` extra (scikit-learn, matplotlib).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from convexmix._optional import require
from convexmix.ensemble import ensemble_selection, fit_weights

__all__: list[str] = []

DATASETS = ("digits", "breast_cancer")


def _sklearn() -> Any:
    return require("sklearn", extra="demo", purpose="convexmix demo")


def models(seed: int) -> dict[str, Any]:
    """Eight classifiers of different families, from well to poorly calibrated."""
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    def scaled(model: Any) -> Any:
        return make_pipeline(StandardScaler(), model)

    return {
        "logistic": scaled(LogisticRegression(C=0.5, max_iter=3000)),
        "svm_rbf": scaled(SVC(probability=True, random_state=seed)),
        "knn": scaled(KNeighborsClassifier(n_neighbors=10)),
        "random_forest": RandomForestClassifier(n_estimators=200, random_state=seed),
        "extra_trees": ExtraTreesClassifier(n_estimators=200, random_state=seed),
        "mlp": scaled(MLPClassifier((64,), alpha=1e-3, max_iter=400, random_state=seed)),
        "naive_bayes": GaussianNB(),
        "decision_tree": DecisionTreeClassifier(max_depth=6, random_state=seed),
    }


@dataclass
class MethodScore:
    method: str
    weights: Tensor
    val_loss: float
    test_loss: float
    test_accuracy: float
    fit_seconds: float


@dataclass
class DatasetReport:
    dataset: str
    n_train: int
    n_test: int
    n_classes: int
    model_names: list[str]
    scores: list[MethodScore] = field(default_factory=list)
    plot: str | None = None


def _log_loss(p: Tensor, y: Tensor) -> float:
    q = p.gather(1, y[:, None]).squeeze(1).clamp_min(1e-15)
    return float(-q.log().mean())


def _slsqp(val: Tensor, y: Tensor) -> Tensor:
    """scipy SLSQP with the analytic gradient: the usual way to fit blend weights."""
    import numpy as np
    from scipy.optimize import minimize

    q = val.gather(2, y[None, :, None].expand(val.shape[0], -1, 1))[..., 0].numpy()
    q = np.maximum(q, 1e-15)
    K = q.shape[0]

    def objective(w: Any) -> tuple[float, Any]:
        u = w @ q
        return float(-np.log(u).mean()), -(q / u).mean(1)

    res = minimize(
        objective,
        np.full(K, 1.0 / K),
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * K,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(K)}],
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    w = np.clip(res.x, 0.0, None)
    return torch.from_numpy(w / w.sum())


@dataclass
class Predictions:
    """Out-of-fold predictions on the training split and test-split predictions."""

    dataset: str
    model_names: list[str]
    val: Tensor  # (K, N_train, C)
    y_val: Tensor  # (N_train,)
    test: Tensor  # (K, N_test, C)
    y_test: Tensor  # (N_test,)


def predictions(name: str, seed: int, progress: Callable[[str], None]) -> Predictions:
    """Train the classifiers of :func:`models` on ``name`` and collect their predictions."""
    import numpy as np
    from sklearn import datasets
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split

    loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}[name]
    X, y = loader(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.4, stratify=y, random_state=seed)
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    val, test = [], []
    for model_name, model in models(seed).items():
        progress(f"{name}: {model_name}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter of the MLP and friends
            val.append(cross_val_predict(clone(model), X_tr, y_tr, cv=cv, method="predict_proba"))
            test.append(clone(model).fit(X_tr, y_tr).predict_proba(X_te))
    return Predictions(
        name,
        list(models(seed)),
        torch.from_numpy(np.stack(val)).double(),
        torch.from_numpy(y_tr).long(),
        torch.from_numpy(np.stack(test)).double(),
        torch.from_numpy(y_te).long(),
    )


def run_dataset(
    name: str, seed: int, progress: Callable[[str], None], out_dir: str | None
) -> DatasetReport:
    data = predictions(name, seed, progress)
    P_val, yv, P_test, yt, names = data.val, data.y_val, data.test, data.y_test, data.model_names
    K = len(names)
    report = DatasetReport(name, len(yv), len(yt), int(P_val.shape[2]), names)

    def score(method: str, fit: Callable[[], Tensor]) -> None:
        start = time.perf_counter()
        w = fit().double()
        seconds = time.perf_counter() - start
        blend_val = torch.tensordot(w, P_val, 1)
        blend_test = torch.tensordot(w, P_test, 1)
        acc = float((blend_test.argmax(1) == yt).double().mean())
        report.scores.append(
            MethodScore(
                method,
                w,
                _log_loss(blend_val, yv),
                _log_loss(blend_test, yt),
                acc,
                seconds,
            )
        )

    progress(f"{name}: fitting weights")
    # No untimed warm-up: each method's time is its first call on this dataset, and on the
    # first dataset the first call of the process, set-up included, as a user meets it.
    score("convexmix", lambda: fit_weights(P_val, yv).weights)
    score("convexmix, cv guard", lambda: fit_weights(P_val, yv, regularization="cv").weights)
    score("SLSQP (scipy)", lambda: _slsqp(P_val, yv))
    score("Caruana (50)", lambda: ensemble_selection(P_val, yv, size=50).weights)
    score("equal weights", lambda: torch.full((K,), 1.0 / K, dtype=torch.float64))
    single = [_log_loss(P_val[k], yv) for k in range(K)]
    best = int(torch.tensor(single).argmin())
    score(f"best single ({names[best]})", lambda: torch.eye(K, dtype=torch.float64)[best])
    if out_dir is not None:
        from convexmix.plot import plot_ensemble_weights

        shown = {s.method: s.weights for s in report.scores[:4] if s.method != "SLSQP (scipy)"}
        path = plot_ensemble_weights(
            shown,
            names,
            f"{out_dir}/{name}_weights.png",
            losses={s.method: s.test_loss for s in report.scores},
            title=f"{name}: blend weights (top) and test log-loss (bottom)",
        )
        report.plot = str(path)
    return report


def run(seed: int, out_dir: str | None, progress: Callable[[str], None]) -> list[DatasetReport]:
    """Run the demo on every dataset in :data:`DATASETS`."""
    _sklearn()
    return [run_dataset(name, seed, progress, out_dir) for name in DATASETS]
