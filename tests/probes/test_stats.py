"""The shared statistics: the bootstrap resamples problems, not rows."""

import numpy as np
import pytest

from waitlens.probes.stats import bh_qvalues, cluster_bootstrap, mann_whitney_auroc, wilson_ci


def test_cluster_bootstrap_width_follows_groups_not_rows():
    rng = np.random.default_rng(0)
    per_problem = rng.normal(size=30)
    one_row_each = cluster_bootstrap(per_problem, np.arange(30), n_boot=2000)
    # the same 30 problems, each repeated 50 times: more rows, no more information
    many = cluster_bootstrap(np.repeat(per_problem, 50), np.repeat(np.arange(30), 50), n_boot=2000)
    assert many[0] == pytest.approx(one_row_each[0])
    assert many[2] - many[1] == pytest.approx(one_row_each[2] - one_row_each[1], rel=0.15)
    # treating the repeated rows as independent would have shrunk the CI about sqrt(50)-fold
    naive = cluster_bootstrap(np.repeat(per_problem, 50), np.arange(1500), n_boot=2000)
    assert naive[2] - naive[1] < 0.3 * (many[2] - many[1])


def test_single_problem_has_no_ci():
    est, lo, hi = cluster_bootstrap([0.2, 0.4, 0.9], ["p0", "p0", "p0"])
    assert est == pytest.approx(0.5) and np.isnan(lo) and np.isnan(hi)


def test_bootstrap_input_errors():
    with pytest.raises(ValueError, match="differ in length"):
        cluster_bootstrap([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="empty"):
        cluster_bootstrap([], [])


def test_wilson_bh_and_auroc():
    rate, lo, hi = wilson_ci(5, 10)
    assert rate == 0.5 and lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert all(np.isnan(wilson_ci(0, 0)))
    q = bh_qvalues([0.01, 0.04, np.nan, 0.03])
    assert np.isnan(q[2]) and q[0] == pytest.approx(0.03) and q[1] == pytest.approx(0.04)
    assert mann_whitney_auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0]))[0] == 1.0
    assert np.isnan(mann_whitney_auroc(np.array([1.0]), np.array([]))[0])


def test_mann_whitney_auroc_is_scipys_to_the_bit():
    """The inlined asymptotic p (ties, continuity) gives scipy's numbers exactly; small samples
    without ties (scipy's exact p) and NaN go to scipy itself."""
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    n_asym = 0
    for i in range(400):
        n1, n2 = rng.integers(1, 40, 2)
        levels = [2, 5, 50, 10**6][i % 4]  # count-like ties .. almost no ties
        pos, neg = rng.integers(0, levels, n1).astype(float), rng.integers(0, levels, n2).astype(float)
        if i % 50 == 7:
            pos[0] = np.nan
        ref = mannwhitneyu(pos, neg, alternative="two-sided")
        got = mann_whitney_auroc(pos, neg)
        n_asym += n1 > 8 and n2 > 8
        np.testing.assert_array_equal(got, (ref.statistic / (n1 * n2), ref.pvalue))
    assert n_asym > 100
