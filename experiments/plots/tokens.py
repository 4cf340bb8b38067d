"""Figures for token signals: top associated tokens per model, where "wait" falls, answer
probability around waits, and wait/transition alignment per model."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from waitlens.experiments.plots import plt


def plot_top_tokens(tables: Mapping[str, pd.DataFrame], *, n: int = 15):
    """Horizontal bars of rank-biserial (2·AUROC−1, CI) for the top-n keys, one panel per model."""
    names = list(tables)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 0.32 * n + 1.5), squeeze=False)
    for ax, m in zip(axes[0], names, strict=True):
        t = tables[m].head(n).iloc[::-1]
        if t.empty:
            ax.text(0.5, 0.5, "no key passes min-count", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(m)
            continue
        rb = t["rank_biserial"].to_numpy(float)
        lo, hi = 2 * t["auroc_lo"].to_numpy(float) - 1, 2 * t["auroc_hi"].to_numpy(float) - 1
        err = np.nan_to_num(np.vstack([rb - lo, hi - rb]), nan=0.0).clip(min=0)
        colors = ["tab:green" if v > 0 else "tab:red" for v in rb]
        ax.barh(range(len(t)), rb, xerr=err, color=colors, alpha=0.8, capsize=2)
        labels = [f"{k}{'*' if q < 0.05 else ''}" for k, q in zip(t["key"], t["q"], strict=True)]
        ax.set_yticks(range(len(t)), labels)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("rank-biserial of count (+: more in correct)")
        ax.set_title(f"{m}\n(* q < 0.05)")
    fig.tight_layout()
    return fig


def plot_wait_histograms(waits: pd.DataFrame, *, word: str = "wait", bins: int = 10):
    """Position of each wait (fraction of the reasoning), correct vs incorrect, per model."""
    names = list(dict.fromkeys(waits["model"])) or ["(none)"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for ax, m in zip(axes[0], names, strict=True):
        w = waits[waits["model"] == m]
        for corr, color in ((True, "tab:green"), (False, "tab:red")):
            x = w.loc[w["correct"] == corr, "frac"].to_numpy(float)
            if len(x):
                ax.hist(x, bins=edges, density=True, histtype="step", lw=2, color=color,
                        label=f"{'correct' if corr else 'incorrect'} (n={len(x)})")
        if w.empty:
            ax.text(0.5, 0.5, f"no {word!r}", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"position of {word!r} (fraction of reasoning)")
        ax.set_ylabel("density")
        ax.set_title(m)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves_around(around: Mapping[str, Mapping[str, pd.DataFrame]], *, ylabel: str = "P(gold answer)"):
    """Mean forced-answer probability aligned at the event (offset 0 = prefix just read the
    event), with bootstrap bands; one panel per model, waits vs controls."""
    names = list(around)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], names, strict=True):
        for label, color in (("wait", "tab:blue"), ("control", "tab:gray")):
            d = around[m].get(label)
            if d is None or d.empty:
                continue
            ax.plot(d["offset"], d["mean"], color=color, label=label)
            ax.fill_between(d["offset"], d["lo"], d["hi"], color=color, alpha=0.25)
        ax.axvline(0, color="k", lw=0.8, ls=":")
        ax.set_xlabel("tokens from event")
        ax.set_title(m)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def plot_alignment(summaries: Mapping[str, dict]):
    """Fraction of waits (vs matched controls) followed by a high-confidence transition, per model."""
    names = list(summaries)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.2))
    width = 0.38
    for j, (key, color) in enumerate((("wait", "tab:blue"), ("control", "tab:gray"))):
        vals, errs = [], [[], []]
        for m in names:
            r = summaries[m].get(key) or {}
            v = r.get("value")
            v = np.nan if v is None else v
            vals.append(v)
            errs[0].append(max(v - (r.get("lo") if r.get("lo") is not None else v), 0) if np.isfinite(v) else 0)
            errs[1].append(max((r.get("hi") if r.get("hi") is not None else v) - v, 0) if np.isfinite(v) else 0)
        ax.bar(np.arange(len(names)) + (j - 0.5) * width, vals, width, yerr=errs, color=color, label=key,
               capsize=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("P(high-confidence transition\nwithin k tokens)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
