"""Forced-wait interventions for one or more models: the library side of `waitlens intervene`
and of the study stage `interventions`.

`interventions_to_dir` re-runs each model's trajectories with a forced word (`hooks.force_wait`),
grades them again, and writes into `out`:

- ``<model>.jsonl``: the re-run trajectories (``extra["intervention"]`` says of which, where, what)
- ``changes.csv``: one row per re-run (before/after correctness and answers, the change; on the
  organism also the ground truth's change and the forced wait's recheck facts)
- ``rates.csv``: per model, fix rate, break rate, unchanged, delta accuracy (problem-bootstrap CIs)
- ``comparison.csv``: every pair of models, the difference of each rate (paired bootstrap)
- ``interventions.png``: fix and break rates per model with their CIs
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from waitlens.traces.trajectory import Trajectory, save_trajectories


def interventions_to_dir(
    runs: Sequence[tuple[str, Any, list[Trajectory]]],
    out: str | Path,
    *,
    at: str = "end",
    word: str | None = None,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    n_boot: int = 1000,
    progress: bool = False,
) -> dict[str, Any]:
    """runs: (name, model or engine, its trajectories). Returns the summary (also summary.json)."""
    from waitlens.experiments.organism import interventions as org
    from waitlens.hooks.interventions import force_wait
    from waitlens.hooks.store import write_csv, write_json
    from waitlens.probes.interventions import change_rates, compare_models

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    summary: dict[str, Any] = {"at": at, "n": n, "models": {}}
    for name, model, trajs in runs:
        organism = org.is_organism(trajs)
        res = force_wait(model, trajs, at=at, word=word, n=n, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                         boundaries=org.step_boundaries if organism else None, progress=progress)
        by_id = {t.id: t for t in trajs}
        reruns = []
        for r in res:
            row = {**r.row(), "model": name}
            if organism:
                chk = org.truth_check(by_id[r.trajectory_id], r.rerun)
                row.update(chk, mechanism=org.mechanism(chk))
            rows.append(row)
            reruns.append(r.rerun)
        if reruns:
            save_trajectories(reruns, out / f"{name}.jsonl")
        summary["models"][name] = {"n_trajectories": len(trajs), "n_rerun": len(res),
                                   "word": res[0].word if res else word}
    table = pd.DataFrame(rows)
    write_csv(out / "changes.csv", table)
    rates = change_rates(table, n_boot=n_boot, seed=seed)
    write_csv(out / "rates.csv", rates)
    names = list(dict.fromkeys(table["model"]))
    comps = [compare_models(table, a, b, n_boot=n_boot, seed=seed) for a, b in itertools.combinations(names, 2)]
    comparison = pd.concat(comps, ignore_index=True) if comps else pd.DataFrame()
    write_csv(out / "comparison.csv", comparison)
    for name in names:
        r = rates[rates["model"] == name].set_index("metric")
        s = summary["models"][name]
        for m in ("fix_rate", "break_rate", "unchanged", "delta_accuracy", "accuracy_before", "accuracy_after"):
            s[m] = [round(float(r.loc[m, k]), 4) for k in ("value", "lo", "hi")]
        s.update({k: int(r.iloc[0][k]) for k in ("n_wrong_before", "n_fixed", "n_right_before", "n_broken")})
        sub = table[table["model"] == name]
        if "agree" in sub:
            s["truth_agrees_with_grading"] = round(float(sub["agree"].mean()), 4)
            s["mechanisms"] = {c: sub[sub["change"] == c]["mechanism"].value_counts().to_dict()
                               for c in ("fix", "break")}
            fr = sub[sub["forced_found"]]
            s["forced_wait_rechecked"] = round(float(fr["forced_rechecked"].mean()), 4) if len(fr) else None
            # the ground truth's question: when the forced wait re-checks a slip, does it fix it?
            slip = sub[sub["forced_after_slip"].astype(object).eq(True)]
            if len(slip) and (~slip["before_correct"].astype(bool)).any():
                r2 = change_rates(slip, n_boot=n_boot, seed=seed).set_index("metric")
                s["fix_rate_when_rechecking_a_slip"] = [round(float(r2.loc["fix_rate", k]), 4)
                                                        for k in ("value", "lo", "hi")]
                s["n_wrong_rechecking_a_slip"] = int(r2.iloc[0]["n_wrong_before"])
    summary["comparison"] = comparison.to_dict("records")
    plot_rates(rates, out / "interventions.png", title=f"forced '{summary['models'][names[0]]['word']}' at {at}")
    write_json(out / "summary.json", summary)
    return summary


def plot_rates(rates: pd.DataFrame, path: Path, *, title: str = "") -> Path:
    """Fix and break rates per model, 95% CI error bars."""
    import numpy as np

    from waitlens.experiments.plots import plt, save_figure

    models = list(dict.fromkeys(rates["model"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(models), 3.2))
    width = 0.38
    for k, (metric, label) in enumerate([("fix_rate", "fix (wrong → right)"), ("break_rate", "break (right → wrong)")]):
        r = rates[rates["metric"] == metric].set_index("model").reindex(models)
        x = np.arange(len(models)) + (k - 0.5) * width
        err = np.vstack([r["value"] - r["lo"], r["hi"] - r["value"]]).clip(min=0)
        ax.bar(x, r["value"], width, yerr=np.nan_to_num(err), capsize=3, label=label)
    ax.set_xticks(np.arange(len(models)), models)
    ax.set_ylabel("rate (95% CI, problems resampled)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    return save_figure(fig, path)
