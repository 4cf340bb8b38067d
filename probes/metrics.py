"""Probe metrics: ROC-AUC (and its problem-bootstrap CI), paired AUROC differences, and
expected calibration error."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from waitlens.probes.stats import cluster_bootstrap


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


def auroc_ci(labels, scores, groups, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(AUROC, lo, hi): 95% CI from `cluster_bootstrap` resampling whole problems."""
    rank, R = _dense(scores)
    return cluster_bootstrap(np.c_[rank, labels], groups, lambda v: _auroc_dense(v[:, 0], v[:, 1], R),
                             n_boot=n_boot, seed=seed)


def paired_auroc_difference(labels_a, scores_a, groups_a, labels_b, scores_b, groups_b, *,
                            n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(AUROC_a - AUROC_b, lo, hi), resampling problems jointly for both (a paired bootstrap)."""
    ra, Ra = _dense(scores_a)
    rb, Rb = _dense(scores_b)
    v = np.r_[np.c_[ra, labels_a, np.zeros(len(ra))], np.c_[rb, labels_b, np.ones(len(rb))]]
    g = np.r_[np.asarray(groups_a, dtype=object), np.asarray(groups_b, dtype=object)].astype(str)

    def diff(v):
        a = v[:, 2] == 0
        return _auroc_dense(v[a, 0], v[a, 1], Ra) - _auroc_dense(v[~a, 0], v[~a, 1], Rb)

    return cluster_bootstrap(v, g, diff, n_boot=n_boot, seed=seed)


# -- data in ----------------------------------------------------------------------------------
