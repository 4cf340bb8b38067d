"""Statistics shared by every analysis: bootstrap CIs that resample problems (clusters), not
positions; Wilson intervals for rates; Benjamini–Hochberg q-values."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import special as _sp
from scipy import stats as _st


class InsufficientDataError(ValueError):
    """The data cannot support the analysis (one class only, too few problems): a finding about
    the sample, not a bug. A study records the stage as skipped with this message."""


def cluster_bootstrap(
    values: Sequence[float] | np.ndarray,
    groups: Sequence | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, lo, hi): percentile CI of `statistic` resampling whole groups with replacement.

    `values` may be 1-D, or 2-D with rows aligned to `groups` (e.g. [score, label] pairs for an
    AUROC); `statistic` receives the resampled rows. Resamples where the statistic is not
    finite (e.g. a single class) are dropped; if none is finite, or there is only one group,
    the CI is (nan, nan): a CI from a single problem would look certain and mean nothing.
    """
    values = np.asarray(values)
    groups = np.asarray(groups)
    if len(values) != len(groups):
        raise ValueError(f"values ({len(values)}) and groups ({len(groups)}) differ in length")
    if len(values) == 0:
        raise ValueError("cannot bootstrap an empty sample")
    estimate = float(statistic(values))
    uniq, inverse = np.unique(groups, return_inverse=True)
    if len(uniq) < 2:  # one problem: resampling it says nothing about the spread
        return estimate, float("nan"), float("nan")
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[g] for g in pick])
        s = statistic(values[idx])
        if np.isfinite(s):
            boots.append(s)
    if not boots:
        return estimate, float("nan"), float("nan")
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return estimate, float(lo), float(hi)


_COUNTS: dict[tuple[int, int, int], np.ndarray] = {}


def resample_counts(k: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, k]: how often each of k groups is drawn in each resample, from exactly the draws
    `cluster_bootstrap` makes (one ``integers(0, k, k)`` per resample), for bootstraps that run over
    all resamples at once. Read-only (memoised)."""
    key = (k, n_boot, seed)
    if key not in _COUNTS:
        rng = np.random.default_rng(seed)
        picks = np.stack([rng.integers(0, k, k) for _ in range(n_boot)])
        counts = np.bincount((picks + k * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * k)
        if len(_COUNTS) > 64:
            _COUNTS.clear()
        _COUNTS[key] = counts.reshape(n_boot, k).astype(float)
        _COUNTS[key].flags.writeable = False
    return _COUNTS[key]


def wilson_ci(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float, float]:
    """(rate, lo, hi) for a binomial proportion; (nan, nan, nan) when n == 0."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(successes, n, alpha=alpha, method="wilson")
    return successes / n, float(lo), float(hi)


def bh_qvalues(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q); NaN p-values stay NaN and are not counted."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = multipletests(p[ok], method="fdr_bh")[1]
    return q


def mann_whitney_auroc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(AUROC = P(pos > neg) + 0.5 P(tie), two-sided Mann–Whitney p). NaN if a side is empty."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    n1, n2 = len(pos), len(neg)
    xy = np.concatenate([pos, neg])
    finite = bool(np.isfinite(xy).all())
    if finite:
        _, level, t = np.unique(xy, return_inverse=True, return_counts=True)
        t = t.astype(float)
    if not finite or (n1 <= 8 or n2 <= 8) and not (t > 1).any():  # NaN/inf, or scipy's exact p
        res = _st.mannwhitneyu(pos, neg, alternative="two-sided")
        return float(res.statistic / (n1 * n2)), float(res.pvalue)
    # scipy's asymptotic two-sided p with tie and continuity corrections, step for step (its
    # per-call checks cost ~1 ms; a token table calls this for every key); average ranks are
    # half-integers, so they sum exactly in any order
    rank = np.cumsum(t) - (t - 1) / 2
    U1 = rank[level[:n1]].sum() - n1 * (n1 + 1) / 2
    U = max(U1, n1 * n2 - U1)
    n = n1 + n2
    sd = np.sqrt(n1 * n2 / 12 * ((n + 1) - np.sum(t**3 - t) / (n * (n - 1))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (U - n1 * n2 / 2 - 0.5) / sd
    p = float(np.clip(_sp.ndtr(-z) * 2, 0, 1))
    return float(U1 / (n1 * n2)), p
