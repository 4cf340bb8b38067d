"""The probes' AUROC bootstraps over all resamples at once are `cluster_bootstrap`'s loop."""

from __future__ import annotations

import numpy as np
import pytest

from waitlens.probes import metrics
from waitlens.probes.metrics import _auroc_dense, _dense, auroc_ci, paired_auroc_difference
from waitlens.probes.stats import cluster_bootstrap


def loop_auroc_ci(y, p, g, **kw):
    rank, R = _dense(p)
    return cluster_bootstrap(np.c_[rank, y], g, lambda v: _auroc_dense(v[:, 0], v[:, 1], R), **kw)


def loop_paired(y, p, g, yb, q, gb, **kw):
    ra, Ra = _dense(p)
    rb, Rb = _dense(q)
    v = np.r_[np.c_[ra, y, np.zeros(len(ra))], np.c_[rb, yb, np.ones(len(rb))]]

    def diff(v):
        a = v[:, 2] == 0
        return _auroc_dense(v[a, 0], v[a, 1], Ra) - _auroc_dense(v[~a, 0], v[~a, 1], Rb)

    return cluster_bootstrap(v, np.r_[np.asarray(g, object), np.asarray(gb, object)].astype(str), diff, **kw)


@pytest.mark.parametrize("n, k, discrete", [(400, 120, False), (300, 40, True), (60, 3, True), (40, 40, False)])
def test_vectorised_auroc_bootstraps_equal_the_loop(n, k, discrete):
    rng = np.random.default_rng(n + k)
    y = rng.integers(0, 2, n)
    p = rng.random(n) + 0.3 * y
    q = rng.random(n)
    if discrete:  # ties within and across classes
        p, q = np.round(p * 4), np.round(q * 3)
    g = rng.integers(0, k, n).astype(str)
    for seed in (0, 3):
        np.testing.assert_allclose(auroc_ci(y, p, g, n_boot=400, seed=seed),
                                   loop_auroc_ci(y, p, g, n_boot=400, seed=seed), rtol=0, atol=1e-12)
        yb, gb = y[: n // 2], g[: n // 2]  # b on other rows: unpaired sizes
        np.testing.assert_allclose(paired_auroc_difference(y, p, g, yb, q[: n // 2], gb, n_boot=400, seed=seed),
                                   loop_paired(y, p, g, yb, q[: n // 2], gb, n_boot=400, seed=seed), rtol=0, atol=1e-12)


def test_one_class_resamples_dropped_and_large_inputs_loop(monkeypatch):
    y = np.array([1, 0, 0, 0, 0, 0])  # most resamples have no positive: dropped, as the loop drops them
    p = np.arange(6.0)
    g = np.array(list("abcdef"))
    np.testing.assert_allclose(auroc_ci(y, p, g, n_boot=200), loop_auroc_ci(y, p, g, n_boot=200), atol=1e-12)
    assert np.isnan(auroc_ci(y, p, np.zeros(6))[1])  # one problem: no CI
    monkeypatch.setattr(metrics, "MAX_VECTOR_CELLS", 10)  # above the cap the loop runs: the same numbers
    rng = np.random.default_rng(1)
    y, p, g = rng.integers(0, 2, 80), rng.random(80), rng.integers(0, 9, 80)
    want = loop_auroc_ci(y, p, g, n_boot=100)
    np.testing.assert_allclose(auroc_ci(y, p, g, n_boot=100), want, atol=0)


def one_key_weighted_auroc(w, scores, labels):
    """The AUROC (ties count half) of one key's `scores` under each row of weights `w`, one
    one-hot matrix of its own levels (what the token table computed per key before)."""
    levels, lv = np.unique(scores, return_inverse=True)
    onehot = np.zeros((len(scores), len(levels)))
    onehot[np.arange(len(scores)), lv] = 1.0
    pos = labels.astype(bool)
    wp, wn = (w * pos) @ onehot, (w * ~pos) @ onehot
    below = np.cumsum(wn, axis=1) - wn
    den = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (wp * (below + 0.5 * wn)).sum(1) / den, np.nan)


@pytest.mark.parametrize("max_levels", [1, 7, 2048])  # a block per key, a few keys a block, one block
def test_token_table_aurocs_of_every_key_at_once_equal_one_key_at_a_time(max_levels):
    """The token table's bootstrap AUROCs of all keys in blocks (`_weighted_aurocs`) and their CIs
    (`_percentile_cis`) are bitwise those of one key at a time (`one_key_weighted_auroc`): constant
    keys, many-level keys, and resamples with one class (a NaN row for every key) included."""
    from waitlens.probes.tokens import (
        _percentile_ci,
        _percentile_cis,
        _resample_weights,
        _weighted_aurocs,
    )

    rng = np.random.default_rng(3)
    n = 40
    g = np.arange(n) % 4
    y = g < 2  # four problems, two all correct: a resample of those two alone has one class
    scores = np.vstack([rng.poisson(rng.uniform(0.1, 4), n) for _ in range(25)]
                       + [np.zeros(n), np.full(n, 2.0), rng.permutation(n)]).astype(float)
    w = _resample_weights(g, 300, 0)
    per_key = np.column_stack([one_key_weighted_auroc(w, s, y) for s in scores])
    assert np.isnan(per_key).all(1).any() and not np.isnan(per_key).all()  # both kinds of resample
    got = _weighted_aurocs(w, scores, y, max_levels=max_levels)
    np.testing.assert_array_equal(got, per_key)
    np.testing.assert_array_equal(_percentile_cis(got), [_percentile_ci(b) for b in per_key.T])
    ragged = got.copy()
    ragged[0, 0] = np.nan  # one column's own NaN: the column-by-column fallback
    np.testing.assert_array_equal(_percentile_cis(ragged), [_percentile_ci(b) for b in ragged.T])


def test_token_table_cis_loop_over_resamples_for_a_key_with_a_large_level_table(monkeypatch):
    """`_auroc_cis` resamples (`cluster_bootstrap`) a key whose level table exceeds `_LOOP_CELLS`
    and batches the others; both give the same CIs."""
    from waitlens.probes import tokens

    rng = np.random.default_rng(1)
    n = 60
    g, y = np.arange(n) % 12, rng.random(n) < 0.5
    scores = np.vstack([rng.poisson(2, n), rng.permutation(n), np.zeros(n)]).astype(float)  # 60 levels in row 1
    batched = tokens._auroc_cis(scores, y, g, 200, 0)
    monkeypatch.setattr(tokens, "_LOOP_CELLS", 40 * n)  # row 1 (60 levels) loops, rows 0 and 2 stay batched
    mixed = tokens._auroc_cis(scores, y, g, 200, 0)
    np.testing.assert_allclose(mixed, batched, rtol=0, atol=1e-12)
    assert np.isfinite(batched).all()
