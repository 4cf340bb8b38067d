"""Summaries of patching and ablation runs: means with problem-clustered bootstrap CIs.

`summarize_patches` turns the per-row table of `hooks.patching.patch` into the
``patch_effects`` table (one row per direction, control, layer, rel_pos, metric);
`wait_vs_random` pairs each wait with its random control; `attribution_agreement` compares
attribution patching with exact patching; `summarize_ablations` does the same for
`hooks.ablations.ablate`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from waitlens.probes.stats import cluster_bootstrap, resample_counts

PATCH_EFFECT_COLUMNS = ["direction", "control", "layer", "rel_pos", "metric", "mean", "lo", "hi", "n"]
SAMPLED_EFFECT_COLUMNS = ["direction", "control", "layer", "rel_pos", "rate", "lo", "hi", "n"]
ABLATION_COLUMNS = ["kind", "metric", "clean_mean", "ablated_mean", "mean", "lo", "hi", "n"]


def _boot(values, groups, n_boot, seed):
    values = np.asarray(values, float)
    ok = np.isfinite(values)
    if not ok.any():
        return float("nan"), float("nan"), float("nan"), 0
    m, lo, hi = mean_bootstrap(values[ok], np.asarray(groups)[ok], n_boot=n_boot, seed=seed)
    return m, lo, hi, int(ok.sum())


def mean_bootstrap(values, groups, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0):
    """``cluster_bootstrap(values, groups, np.mean)`` over all resamples at once: the same draws,
    each resample's mean from its groups' sums and sizes (equal up to float rounding, ~1e-15)."""
    values, groups = np.asarray(values, float), np.asarray(groups)
    if len(values) == 0 or len(values) != len(groups):
        return cluster_bootstrap(values, groups, n_boot=n_boot, alpha=alpha, seed=seed)  # its errors
    uniq, inverse = np.unique(groups, return_inverse=True)
    k = len(uniq)
    if k < 2:
        return float(np.mean(values)), float("nan"), float("nan")
    counts = resample_counts(k, n_boot, seed)
    boots = (counts @ np.bincount(inverse, values, k)) / (counts @ np.bincount(inverse, minlength=k))
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(np.mean(values)), float(lo), float(hi)


def summarize_patches(table: pd.DataFrame, *, value: str = "effect", n_boot: int = 1000,
                      seed: int = 0) -> pd.DataFrame:
    """Mean `value` per (direction, control, layer, rel_pos, metric) with a 95% CI that
    resamples problems (`problem_id`), n = number of (trajectory, wait) rows averaged."""
    keys = ["direction", "control", "layer", "rel_pos", "metric"]
    rows = []
    for k, g in table.groupby(keys, sort=True):
        m, lo, hi, n = _boot(g[value], g["problem_id"], n_boot, seed)
        rows.append((*k, m, lo, hi, n))
    return pd.DataFrame(rows, columns=PATCH_EFFECT_COLUMNS)


def wait_vs_random(table: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired contrast effect(wait) − effect(its random control) per (direction, layer,
    rel_pos, metric), with a problem-clustered CI (only waits that have a control)."""
    keys = ["direction", "layer", "rel_pos", "metric"]
    idx = keys + ["trajectory_id", "anchor"]
    w = table[table["control"] == "none"].set_index(idx)["effect"]
    r = table[table["control"] == "random"].set_index(idx)["effect"]
    prob = table.drop_duplicates("trajectory_id").set_index("trajectory_id")["problem_id"]
    both = pd.concat({"wait": w, "random": r}, axis=1).dropna().reset_index()
    rows = []
    for k, g in both.groupby(keys, sort=True):
        m, lo, hi, n = _boot(g["wait"] - g["random"], prob.loc[g["trajectory_id"]].to_numpy(), n_boot, seed)
        rows.append((*k, m, lo, hi, n))
    return pd.DataFrame(rows, columns=keys + ["mean", "lo", "hi", "n"])


def attribution_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Pearson r between attribution and exact effects per (direction, metric): over the
    individual cells (every trajectory) and over the grid of cell means."""
    t = table[table["attribution"].notna()]
    rows = []
    for (d, m), g in t.groupby(["direction", "metric"], sort=True):
        r_cells = _pearson(g["effect"], g["attribution"])
        means = g.groupby(["control", "layer", "rel_pos"])[["effect", "attribution"]].mean()
        rows.append((d, m, r_cells, _pearson(means["effect"], means["attribution"]), len(g), len(means)))
    return pd.DataFrame(rows, columns=["direction", "metric", "r_cells", "r_grid_means", "n_cells", "n_grid"])


def _pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def summarize_sampled(table: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Rate of sampled continuations that correct the slip, per (direction, control, layer,
    rel_pos) — control "clean" is the unpatched model — with a problem-clustered CI."""
    rows = []
    t = table.assign(layer=table["layer"].astype("float"), rel_pos=table["rel_pos"].astype("float"))
    for k, g in t.groupby(["direction", "control", "layer", "rel_pos"], sort=True, dropna=False):
        m, lo, hi, n = _boot(g["corrected"], g["problem_id"], n_boot, seed)
        rows.append((*k, m, lo, hi, n))
    return pd.DataFrame(rows, columns=SAMPLED_EFFECT_COLUMNS)


def summarize_ablations(table: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (kind, metric): clean and ablated means, and the mean effect (ablated − clean;
    for kl the KL itself) with a problem-clustered CI."""
    rows = []
    for (kind, metric), g in table.groupby(["kind", "metric"], sort=True):
        m, lo, hi, n = _boot(g["effect"], g["problem_id"], n_boot, seed)
        ok = g["effect"].notna()
        rows.append((kind, metric, float(g.loc[ok, "clean"].mean()), float(g.loc[ok, "ablated"].mean()),
                     m, lo, hi, n))
    return pd.DataFrame(rows, columns=ABLATION_COLUMNS)


__all__ = ["ABLATION_COLUMNS", "PATCH_EFFECT_COLUMNS", "SAMPLED_EFFECT_COLUMNS", "attribution_agreement",
           "summarize_ablations", "summarize_patches", "summarize_sampled", "wait_vs_random"]
