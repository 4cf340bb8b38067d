"""The vectorised mean bootstrap of the patching summaries is `cluster_bootstrap`'s."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from waitlens.probes.patching import mean_bootstrap, summarize_patches
from waitlens.probes.stats import cluster_bootstrap


@pytest.mark.parametrize("n_groups", [2, 7, 40])
def test_mean_bootstrap_equals_cluster_bootstrap(n_groups):
    rng = np.random.default_rng(n_groups)
    groups = rng.integers(0, n_groups, 300).astype(str)
    groups[:n_groups] = np.arange(n_groups).astype(str)  # every group present
    values = rng.normal(size=300) + (groups.astype(int) % 3)
    for seed in (0, 5):
        want = cluster_bootstrap(values, groups, n_boot=500, seed=seed)
        got = mean_bootstrap(values, groups, n_boot=500, seed=seed)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    one = mean_bootstrap(values, np.zeros(300))
    assert one[0] == pytest.approx(values.mean()) and np.isnan(one[1]) and np.isnan(one[2])
    with pytest.raises(ValueError, match="empty"):
        mean_bootstrap([], [])


def test_summarize_patches_cis_are_cluster_bootstraps():
    rng = np.random.default_rng(0)
    n = 120
    t = pd.DataFrame({"direction": "a<-b", "control": rng.choice(["none", "random"], n), "layer": rng.integers(0, 2, n),
                      "rel_pos": 0, "metric": "kl", "problem_id": rng.integers(0, 9, n).astype(str),
                      "effect": rng.normal(size=n)})
    s = summarize_patches(t, n_boot=300, seed=3)
    for _, row in s.iterrows():
        g = t[(t["control"] == row["control"]) & (t["layer"] == row["layer"])]
        want = cluster_bootstrap(g["effect"].to_numpy(), g["problem_id"].to_numpy(), n_boot=300, seed=3)
        np.testing.assert_allclose([row["mean"], row["lo"], row["hi"]], want, rtol=1e-12, atol=1e-12)
