"""Fix and break rates of forced-word interventions, with CIs that resample problems.

Input: one row per re-run trajectory — the model, the problem, and whether the trajectory was
right before and after the forced word. Rates:

- fix rate: P(right after | wrong before)
- break rate: P(wrong after | right before)
- unchanged: P(same correctness after as before)
- delta accuracy: accuracy after - accuracy before

Every CI is a percentile bootstrap over problems (`stats.cluster_bootstrap`); the comparison
between two models resamples the problems both were run on together (a paired bootstrap).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from waitlens.probes.stats import InsufficientDataError, cluster_bootstrap

METRICS = ("fix_rate", "break_rate", "unchanged", "delta_accuracy", "accuracy_before", "accuracy_after")


def _metric(name: str, before: np.ndarray, after: np.ndarray) -> float:
    if name == "fix_rate":
        m = before == 0
        return float(after[m].mean()) if m.any() else float("nan")
    if name == "break_rate":
        m = before == 1
        return float(1 - after[m].mean()) if m.any() else float("nan")
    if name == "unchanged":
        return float((before == after).mean())
    if name == "delta_accuracy":
        return float(after.mean() - before.mean())
    if name == "accuracy_before":
        return float(before.mean())
    if name == "accuracy_after":
        return float(after.mean())
    raise ValueError(f"unknown intervention metric {name!r}; metrics: {', '.join(METRICS)}")


def _check(rows: pd.DataFrame) -> pd.DataFrame:
    need = {"model", "problem_id", "before_correct", "after_correct"}
    missing = sorted(need - set(rows.columns))
    if missing:
        raise ValueError(f"intervention rows lack column(s) {missing}; need {sorted(need)}")
    if not len(rows):
        raise InsufficientDataError("no intervention rows: nothing was re-run")
    rows = rows.copy()
    rows["model"] = rows["model"].astype(str)
    return rows


def change_rates(rows: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per model and metric: value, lo, hi (95%, problems resampled), n trajectories,
    n problems, and the counts behind the rates (n_wrong_before, n_fixed, n_right_before, n_broken)."""
    rows = _check(rows)
    out = []
    for model, g in rows.groupby("model", sort=False):
        vals = g[["before_correct", "after_correct"]].to_numpy(dtype=float)
        groups = g["problem_id"].astype(str).to_numpy()
        b, a = vals[:, 0], vals[:, 1]
        counts = {"n": len(g), "n_problems": int(pd.unique(groups).size),
                  "n_wrong_before": int((b == 0).sum()), "n_fixed": int(((b == 0) & (a == 1)).sum()),
                  "n_right_before": int((b == 1).sum()), "n_broken": int(((b == 1) & (a == 0)).sum())}
        for m in METRICS:
            est, lo, hi = cluster_bootstrap(vals, groups, lambda v, m=m: _metric(m, v[:, 0], v[:, 1]),
                                            n_boot=n_boot, seed=seed)
            out.append({"model": model, "metric": m, "value": est, "lo": lo, "hi": hi, **counts})
    return pd.DataFrame(out)


def compare_models(rows: pd.DataFrame, a: str, b: str, *, metrics: Sequence[str] = ("fix_rate", "break_rate",
                   "delta_accuracy"), n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """`metric(a) - metric(b)` with a paired problem bootstrap (each resample draws problems and
    takes every row of both models on them). Columns: a, b, metric, diff, lo, hi, separated
    (the CI excludes 0)."""
    rows = _check(rows)
    for name in (a, b):
        if name not in set(rows["model"]):
            raise ValueError(f"model {name!r} has no intervention rows (models: {sorted(set(rows['model']))})")
    sub = rows[rows["model"].isin([a, b])]
    vals = np.column_stack([(sub["model"] == a).to_numpy(float), sub["before_correct"].to_numpy(float),
                            sub["after_correct"].to_numpy(float)])
    groups = sub["problem_id"].astype(str).to_numpy()
    out = []
    for m in metrics:
        def stat(v, m=m):
            x, y = v[v[:, 0] == 1], v[v[:, 0] == 0]
            if not len(x) or not len(y):
                return float("nan")
            return _metric(m, x[:, 1], x[:, 2]) - _metric(m, y[:, 1], y[:, 2])

        d, lo, hi = cluster_bootstrap(vals, groups, stat, n_boot=n_boot, seed=seed)
        out.append({"a": a, "b": b, "metric": m, "diff": d, "lo": lo, "hi": hi,
                    "separated": bool(np.isfinite(lo) and (lo > 0 or hi < 0))})
    return pd.DataFrame(out)
