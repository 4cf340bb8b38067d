"""A single linear probe as a scikit-learn estimator: `LinearProbe().fit(X, y, groups)`.

Standardized features + L2 logistic regression with C chosen by (grouped) inner CV — the
same solver and selection as `probes.fit_layer_probes`, for one feature matrix. It is a
`BaseEstimator`/`ClassifierMixin`, so `sklearn.base.clone`, `cross_val_score`, `GridSearchCV`
and `Pipeline` work with it. To group the inner CV by problem inside `cross_val_score`, route
the groups to `fit` with scikit-learn's metadata routing::

    sklearn.set_config(enable_metadata_routing=True)
    cross_val_score(LinearProbe().set_fit_request(groups=True), X, y, cv=GroupKFold(5),
                    params={"groups": g}, scoring="roc_auc")
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils.validation import check_is_fitted

from waitlens.probes.folds import Folds, check_labels
from waitlens.probes.linear import DEFAULT_CS, cross_validate


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Standardized features + L2 logistic regression, C chosen by inner CV (grouped when
    `groups` is given to `fit`). `fit(X [n, d], y, groups=None)`, `predict_proba`, `predict`,
    `decision_function`, `score` (accuracy, as scikit-learn classifiers do; use
    `scoring="roc_auc"` or `probes.auroc` for ranking quality). Binary labels only."""

    def __init__(self, Cs: Sequence[float] = DEFAULT_CS, n_inner: int = 3, seed: int = 0,
                 tol: float = 1e-7):
        self.Cs = Cs
        self.n_inner = n_inner
        self.seed = seed
        self.tol = tol

    def fit(self, X, y, groups=None):
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"LinearProbe.fit: X must be 2-D [n, d], got shape {X.shape}")
        classes, y = np.unique(np.asarray(y), return_inverse=True)
        if len(classes) > 2:
            raise ValueError(f"LinearProbe is a binary probe; y has {len(classes)} classes")
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
        self.classes_ = classes
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X):
        check_is_fitted(self, "coef_")
        return np.asarray(X, dtype=np.float64) @ self.coef_ + self.intercept_

    def predict_proba(self, X):
        p = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.c_[1 - p, p]

    def predict(self, X):
        return self.classes_[(self.decision_function(X) >= 0).astype(int)]
