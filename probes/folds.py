"""Folds grouped by problem (outer and inner), the label checks a probe cannot run past, and
the within-fold label shuffle of the selectivity control."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from waitlens.probes.stats import InsufficientDataError


@dataclass
class Folds:
    """Outer fold of every row (problem-grouped) and, per outer fold (+1 for 'all rows'),
    the inner fold of every training row (-1 = not a training row of that outer fold)."""

    outer: np.ndarray  # [n]
    inner: np.ndarray  # [n_folds + 1, n]
    n_folds: int
    n_inner: int
    problems: np.ndarray | None = None

    def problem_map(self, problems: np.ndarray) -> tuple[dict, list[dict]]:
        """problem -> outer fold, and per outer fold problem -> inner fold."""
        outer = dict(zip(problems, self.outer, strict=True))
        inner = []
        for f in range(self.n_folds + 1):
            m = self.inner[f] >= 0
            inner.append(dict(zip(problems[m], self.inner[f][m], strict=True)))
        return outer, inner

    def apply(self, problems: np.ndarray) -> Folds:
        """The same problem-level split for other rows (e.g. control positions)."""
        pm, inner = self.problem_map(self.problems)
        problems = np.asarray(problems).astype(str)
        unknown = sorted(set(problems) - set(pm))
        if unknown:
            raise ValueError(f"{len(unknown)} problem(s) not in the probe's rows, e.g. {unknown[:3]}")
        outer = np.array([pm[p] for p in problems])
        inn = np.array([[im.get(p, -1) for p in problems] for im in inner]).reshape(self.n_folds + 1, -1)
        return Folds(outer, inn, self.n_folds, self.n_inner, problems)


def check_labels(y: np.ndarray, groups: np.ndarray, n_folds: int, what: str = "positions") -> None:
    """The errors a probe cannot run past: a single class; fewer problems than folds."""
    y = np.asarray(y).astype(bool)
    if len(y) == 0:
        raise InsufficientDataError(f"no {what} to probe: check the word(s) asked for and the store")
    if y.all() or not y.any():
        cls = "correct" if y.all() else "incorrect"
        raise InsufficientDataError(
            f"all {len(y)} {what} come from {cls} trajectories (a single class); a correctness probe "
            "needs both correct and incorrect trajectories: sample more or harder problems, or a "
            "weaker model, and capture again"
        )
    groups = np.asarray(groups)
    n_prob = len(np.unique(groups))
    pos_prob = len(np.unique(groups[y]))
    neg_prob = len(np.unique(groups[~y]))
    if n_prob < n_folds:
        raise InsufficientDataError(
            f"only {n_prob} problem(s) in the {what} but {n_folds}-fold CV grouped by problem needs at "
            f"least {n_folds} (and 2 per class for inner CV); lower n_folds (CLI: --folds) or capture "
            "more problems"
        )
    if min(pos_prob, neg_prob) < 2:
        raise InsufficientDataError(
            f"only {pos_prob} problem(s) with correct and {neg_prob} with incorrect trajectories; "
            "grouped CV needs at least 2 problems of each class: capture more problems"
        )


_FOLD_CACHE: dict[tuple, Folds] = {}
_FOLD_CACHE_SIZE = 32


def make_folds(y: np.ndarray, groups: np.ndarray, n_folds: int = 5, n_inner: int = 3,
               seed: int = 0) -> Folds:
    """Outer StratifiedGroupKFold by problem, and a grouped inner split inside every outer
    training set (and inside all rows, for the final probe).

    The split is a function of its arguments only, so a repeat (every model's probe on the
    same pooled rows) is answered from a small cache, as copies."""
    y = np.asarray(y).astype(int)
    groups = np.asarray(groups).astype(str)
    check_labels(y, groups, n_folds)
    key = (y.tobytes(), groups.dtype.str, groups.tobytes(), len(y), int(n_folds), int(n_inner), int(seed))
    hit = _FOLD_CACHE.get(key)
    if hit is None:
        hit = _make_folds(y, groups, n_folds, n_inner, seed)
        if len(_FOLD_CACHE) >= _FOLD_CACHE_SIZE:
            _FOLD_CACHE.pop(next(iter(_FOLD_CACHE)))
        _FOLD_CACHE[key] = hit
    return Folds(hit.outer.copy(), hit.inner.copy(), hit.n_folds, hit.n_inner, hit.problems.copy())


def _make_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, n_inner: int, seed: int) -> Folds:
    n = len(y)
    outer = np.full(n, -1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        for f, (_, te) in enumerate(StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
                                    .split(np.zeros(n), y, groups)):
            outer[te] = f
        inner = np.full((n_folds + 1, n), -1)
        for f in range(n_folds + 1):
            tr = np.flatnonzero(outer != f)
            k = min(n_inner, len(np.unique(groups[tr])))
            if len(np.unique(y[tr])) < 2:
                raise InsufficientDataError(f"outer fold {f} leaves a training set with one class; lower n_folds")
            for j, (_, te) in enumerate(StratifiedGroupKFold(k, shuffle=True, random_state=seed + 1 + f)
                                        .split(np.zeros(len(tr)), y[tr], groups[tr])):
                inner[f, tr[te]] = j
    return Folds(outer, inner, n_folds, n_inner, groups)


def shuffle_labels(y: np.ndarray, units: np.ndarray, seed: int = 0,
                   strata: np.ndarray | None = None) -> np.ndarray:
    """Labels permuted across `units` (trajectories): every row of a unit gets one label,
    drawn by permuting the units' labels, within each stratum when `strata` (one value per
    row, constant within a unit — e.g. the outer fold) is given, so every stratum keeps its
    class balance exactly."""
    y = np.asarray(y).astype(int)
    uniq, first, inv = np.unique(np.asarray(units).astype(str), return_index=True, return_inverse=True)
    unit_label = np.zeros(len(uniq), dtype=int)
    unit_label[inv] = y  # the label of a unit (constant within a trajectory)
    unit_stratum = np.zeros(len(uniq), dtype=int) if strata is None else np.asarray(strata)[first]
    rng = np.random.default_rng(seed)
    perm = unit_label.copy()
    for s in np.unique(unit_stratum):
        idx = np.flatnonzero(unit_stratum == s)
        perm[idx] = unit_label[rng.permutation(idx)]
    return perm[inv]


# -- the cross-validated fit ------------------------------------------------------------------
