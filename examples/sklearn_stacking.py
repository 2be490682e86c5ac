"""Convex stacking against scikit-learn's StackingClassifier, on scikit-learn's bundled data.

For each data set (digits, breast cancer, wine; nothing is downloaded) and each outer
seed, a stratified quarter of the rows is held out as the test split. On the other three
quarters, six base classifiers are stacked five ways, and every method sees only those
rows (nested: each stacker runs its own 5-fold cross-validation inside):

* ``ConvexStackingClassifier``: the exact log-loss-optimal convex blend of the base
  models' out-of-fold probabilities (``convexmix.sklearn``);
* ``StackingClassifier``: scikit-learn's, with its default final estimator
  (``LogisticRegression()``) on the same out-of-fold probabilities;
* equal weights: the mean of the base models' probabilities;
* the best single model: the one with the lowest out-of-fold log-loss;
* Caruana's ensemble selection (50 picks, ``cx.ensemble.ensemble_selection``) on the
  out-of-fold probabilities.

The two stackers get the same folds; the last three methods use out-of-fold
probabilities computed with those folds too, and the base models refitted on all the
training rows (as the stackers' own ``estimators_`` are). It prints, per data set, the
held-out log-loss and accuracy of each method (mean over the outer seeds) in one
Markdown table, and the convex stacker's log-loss relative to the logistic one.

    python examples/sklearn_stacking.py [--seeds 3] [--quick]

``--quick`` runs one data set (wine), one seed and four base models: the smoke test.
Needs the ``[sklearn]`` extra.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier, StackingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import convexmix as cx
from convexmix.sklearn import ConvexStackingClassifier

DATASETS = {"digits": load_digits, "breast cancer": load_breast_cancer, "wine": load_wine}
METHODS = [
    "convex stacking (ConvexStackingClassifier)",
    "LogisticRegression stacking (StackingClassifier)",
    "equal weights",
    "best single model",
    "Caruana selection (50)",
]


def base_models(seed: int, quick: bool) -> list[tuple[str, Any]]:
    trees = 50 if quick else 100
    models = [
        ("logreg", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))),
        ("nb", GaussianNB()),
        ("knn", make_pipeline(StandardScaler(), KNeighborsClassifier(15))),
        ("forest", RandomForestClassifier(trees, random_state=seed)),
        ("extra", ExtraTreesClassifier(trees, random_state=seed)),
        ("lda", LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")),
    ]
    return models[:4] if quick else models


def evaluate(
    X: np.ndarray, y: np.ndarray, seed: int, quick: bool
) -> dict[str, tuple[float, float]]:
    """{method: (test log-loss, test accuracy)} for one outer split."""
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, stratify=y, random_state=seed)
    models = base_models(seed, quick)
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    probas: dict[str, np.ndarray] = {}

    convex = ConvexStackingClassifier(models, cv=cv).fit(X_tr, y_tr)
    probas[METHODS[0]] = convex.predict_proba(X_te)
    logistic = StackingClassifier(models, cv=cv, stack_method="predict_proba").fit(X_tr, y_tr)
    probas[METHODS[1]] = logistic.predict_proba(X_te)

    # The out-of-fold probabilities on the same folds, and the refitted base models (the
    # convex stacker's estimators_): what the last three methods need.
    oof = np.stack(
        [cross_val_predict(clone(m), X_tr, y_tr, cv=cv, method="predict_proba") for _, m in models]
    )
    test = np.stack([m.predict_proba(X_te) for m in convex.estimators_])
    y_enc = np.searchsorted(convex.classes_, y_tr)
    probas[METHODS[2]] = test.mean(axis=0)
    oof_loss = [log_loss(y_enc, p, labels=range(oof.shape[2])) for p in oof]
    probas[METHODS[3]] = test[int(np.argmin(oof_loss))]
    caruana = cx.ensemble.ensemble_selection(oof, y_enc, size=50)
    probas[METHODS[4]] = np.einsum("knc,k->nc", test, np.asarray(caruana.weights))

    labels = convex.classes_
    return {
        name: (
            log_loss(y_te, np.clip(p, 1e-15, 1), labels=labels),
            accuracy_score(y_te, labels[np.argmax(p, axis=1)]),
        )
        for name, p in probas.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="outer splits per data set")
    parser.add_argument("--quick", action="store_true", help="wine, one seed, four models")
    args = parser.parse_args()
    names = ["wine"] if args.quick else list(DATASETS)
    seeds = range(1 if args.quick else args.seeds)
    start = time.perf_counter()
    print("| data set | method | test log-loss | test accuracy |")
    print("|---|---|---|---|")
    verdicts = []
    for name in names:
        X, y = DATASETS[name](return_X_y=True)
        runs = [evaluate(X, y, seed, args.quick) for seed in seeds]
        mean = {m: np.mean([r[m] for r in runs], axis=0) for m in METHODS}
        for m in METHODS:
            print(f"| {name} | {m} | {mean[m][0]:.4f} | {mean[m][1]:.4f} |")
        rel = mean[METHODS[0]][0] / mean[METHODS[1]][0] - 1
        verdicts.append(
            f"{name}: convex stacking's log-loss is {abs(rel):.1%} "
            f"{'below' if rel < 0 else 'above'} the logistic stacker's"
            + (" (worse than 1% behind)" if rel > 0.01 else "")
        )
    print()
    for line in verdicts:
        print(line)
    print(
        f"\n{len(names)} data set(s) x {len(seeds)} outer split(s), "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
