"""A single linear probe in scikit-learn's habits: `LinearProbe().fit(X, y, groups)`.

Standardized features + L2 logistic regression with C chosen by (grouped) inner CV — the
same solver and selection as `probes.fit_layer_probes`, for one feature matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from waitlens.probes.folds import Folds, check_labels
from waitlens.probes.linear import DEFAULT_CS, cross_validate


class LinearProbe:
    """Standardized features + L2 logistic regression, C chosen by inner CV (grouped when
    `groups` is given to `fit`). `fit(X [n, d], y, groups=None)`, `predict_proba`, `predict`,
    `score` (accuracy, as scikit-learn classifiers do; use `auroc` for ranking quality)."""

    def __init__(self, Cs: Sequence[float] = DEFAULT_CS, n_inner: int = 3, seed: int = 0,
                 tol: float = 1e-7):
        self.Cs = Cs
        self.n_inner = n_inner
        self.seed = seed
        self.tol = tol

    def fit(self, X, y, groups=None):
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y).astype(int)
        groups = np.arange(len(y)).astype(str) if groups is None else np.asarray(groups).astype(str)
        check_labels(y, groups, self.n_inner, what="rows")
        inner = np.full((1, len(y)), -1)
        for j, (_, te) in enumerate(StratifiedGroupKFold(self.n_inner, shuffle=True, random_state=self.seed)
                                    .split(np.zeros(len(y)), y, groups)):
            inner[0, te] = j
        folds = Folds(np.full(len(y), -1), inner, 0, self.n_inner, groups)
        fit = cross_validate(X[:, None, :], [y], folds, Cs=self.Cs, tol=self.tol)
        self.coef_ = fit.coef[-1, 0, 0]
        self.intercept_ = float(fit.intercept[-1, 0, 0])
        self.C_ = float(fit.C[-1, 0])
        self.classes_ = np.array([0, 1])
        return self

    def decision_function(self, X):
        return np.asarray(X, dtype=np.float64) @ self.coef_ + self.intercept_

    def predict_proba(self, X):
        p = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.c_[1 - p, p]

    def predict(self, X):
        return (self.decision_function(X) >= 0).astype(int)

    def score(self, X, y):
        return float(np.mean(self.predict(X) == np.asarray(y).astype(int)))
