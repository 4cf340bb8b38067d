"""Probe metrics: ROC-AUC (and its problem-bootstrap CI), paired AUROC differences, and
expected calibration error."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from waitlens.probes.stats import cluster_bootstrap, resample_counts


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC (ties count one half); NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    n1 = int(labels.sum())
    n0 = len(labels) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE with `n_bins` equal-width bins on [0, 1]: sum_b (n_b / n) |mean(y_b) - mean(p_b)|."""
    y = np.asarray(labels, dtype=float)
    p = np.asarray(probs, dtype=float)
    if len(p) == 0:
        return float("nan")
    b = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    gap = np.abs(np.bincount(b, y, n_bins) - np.bincount(b, p, n_bins))
    return float(gap.sum() / len(p)) if count.sum() else float("nan")


def _auroc_dense(rank: np.ndarray, labels: np.ndarray, n_ranks: int) -> float:
    """AUROC from precomputed dense score ranks (0..n_ranks-1), ties counting one half: a
    counting sort, so a bootstrap resample costs O(n) instead of a sort."""
    lab = labels.astype(bool)
    n1 = int(lab.sum())
    n0 = len(lab) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rank.astype(np.int64)
    neg = np.bincount(r[~lab], minlength=n_ranks)
    below = np.cumsum(neg) - neg
    rp = r[lab]
    return float((below[rp].sum() + 0.5 * neg[rp].sum()) / (n1 * n0))


def _dense(scores) -> tuple[np.ndarray, int]:
    uniq, inv = np.unique(np.asarray(scores, dtype=float), return_inverse=True)
    return inv.astype(float), len(uniq)


def _weighted_auroc(counts: np.ndarray, inverse: np.ndarray, rank: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`_auroc_dense` of every resample at once: ``counts[b, g]`` is how often group g is drawn in
    resample b, ``inverse[i]`` row i's group; NaN where a resample has one class. (np.take, not
    fancy indexing: it is many times faster on these [n_boot, n] gathers.)"""
    lab = np.asarray(labels).astype(bool)
    r = np.asarray(rank).astype(np.int64)
    neg, pos = np.flatnonzero(~lab), np.flatnonzero(lab)
    if not len(neg) or not len(pos):
        return np.full(len(counts), np.nan)
    order = neg[np.argsort(r[neg], kind="stable")]
    levels, starts = np.unique(r[order], return_index=True)
    neg_at = np.add.reduceat(np.take(counts, inverse[order], axis=1), starts, axis=1)  # [n_boot, levels]
    below = np.concatenate([np.zeros((len(counts), 1)), np.cumsum(neg_at, axis=1)], axis=1)
    rp = r[pos]
    idx = np.searchsorted(levels, rp)  # how many negative levels lie below each positive row
    clipped = np.minimum(idx, len(levels) - 1)
    tie = levels[clipped] == rp
    wp = np.take(counts, inverse[pos], axis=1)
    num = (wp * (np.take(below, idx, axis=1) + 0.5 * np.take(neg_at, clipped, axis=1) * tie)).sum(1)
    den = wp.sum(1) * below[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _vector_bootstrap(estimate: float, groups, boots_of, n_boot: int, seed: int,
                      alpha: float = 0.05) -> tuple[float, float, float]:
    """`cluster_bootstrap`'s (estimate, lo, hi) from `boots_of(counts [n_boot, groups], inverse)`,
    the statistic of every resample at once under its draws."""
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    if len(uniq) < 2:
        return estimate, float("nan"), float("nan")
    boots = boots_of(resample_counts(len(uniq), n_boot, seed), inverse)
    boots = boots[np.isfinite(boots)]
    if not len(boots):
        return estimate, float("nan"), float("nan")
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return estimate, float(lo), float(hi)


MAX_VECTOR_CELLS = 20_000_000  # resamples x rows above which the bootstraps loop (memory)


def auroc_ci(labels, scores, groups, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(AUROC, lo, hi): 95% CI from `cluster_bootstrap` resampling whole problems (all resamples
    at once, the same draws: equal to the loop up to float rounding)."""
    rank, R = _dense(scores)
    labels = np.asarray(labels)
    if len(rank) == 0 or len(rank) != len(labels) or len(rank) != len(groups) or n_boot * len(rank) > MAX_VECTOR_CELLS:
        return cluster_bootstrap(np.c_[rank, labels], groups, lambda v: _auroc_dense(v[:, 0], v[:, 1], R),
                                 n_boot=n_boot, seed=seed)
    return _vector_bootstrap(_auroc_dense(rank, labels, R), groups,
                             lambda c, inv: _weighted_auroc(c, inv, rank, labels), n_boot, seed)


def paired_auroc_difference(labels_a, scores_a, groups_a, labels_b, scores_b, groups_b, *,
                            n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(AUROC_a - AUROC_b, lo, hi), resampling problems jointly for both (a paired bootstrap; all
    resamples at once, as `auroc_ci`)."""
    ra, Ra = _dense(scores_a)
    rb, Rb = _dense(scores_b)
    v = np.r_[np.c_[ra, labels_a, np.zeros(len(ra))], np.c_[rb, labels_b, np.ones(len(rb))]]
    g = np.r_[np.asarray(groups_a, dtype=object), np.asarray(groups_b, dtype=object)].astype(str)

    def diff(v):
        a = v[:, 2] == 0
        return _auroc_dense(v[a, 0], v[a, 1], Ra) - _auroc_dense(v[~a, 0], v[~a, 1], Rb)

    if len(v) == 0 or len(v) != len(g) or n_boot * len(v) > MAX_VECTOR_CELLS:
        return cluster_bootstrap(v, g, diff, n_boot=n_boot, seed=seed)
    la, lb = np.asarray(labels_a), np.asarray(labels_b)
    na = len(ra)
    return _vector_bootstrap(diff(v), g, lambda c, inv: (_weighted_auroc(c, inv[:na], ra, la)
                                                         - _weighted_auroc(c, inv[na:], rb, lb)), n_boot, seed)


# -- data in ----------------------------------------------------------------------------------
