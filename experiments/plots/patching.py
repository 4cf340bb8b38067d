"""Patching figures: layer × rel_pos heatmaps per direction, effect-by-layer curves with CIs,
and attribution vs exact patching. All take the plain tables of `probes.patching`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from waitlens.experiments.plots import plt


def _short(direction: str) -> str:
    return " ← ".join(p.rstrip("/").split("/")[-1] for p in direction.split("<-"))


def heatmaps(effects: pd.DataFrame, metric: str):
    """One row per direction: wait positions | random control, colour = mean effect."""
    t = effects[effects["metric"] == metric]
    dirs = sorted(t["direction"].unique())
    fig, axes = plt.subplots(len(dirs), 2, figsize=(9, 2.6 * len(dirs) + 0.6), squeeze=False)
    vmax = np.nanmax(np.abs(t["mean"].to_numpy())) if len(t) else 1.0
    cmap, vmin = ("viridis", 0.0) if metric == "kl" else ("RdBu_r", -vmax)
    for i, d in enumerate(dirs):
        for j, ctrl in enumerate(("none", "random")):
            ax = axes[i, j]
            g = t[(t["direction"] == d) & (t["control"] == ctrl)]
            grid = g.pivot(index="layer", columns="rel_pos", values="mean")
            im = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_xticks(range(grid.shape[1]), grid.columns)
            ax.set_yticks(range(grid.shape[0]), grid.index)
            ax.set_xlabel("position relative to 'wait'" if ctrl == "none" else "relative to random control")
            ax.set_ylabel("layer (resid_pre)")
            ax.set_title(f"{_short(d)} — {'wait' if ctrl == 'none' else 'random control'}", fontsize=9)
            fig.colorbar(im, ax=ax, label=f"mean {metric} effect")
    fig.tight_layout()
    return fig


def layer_curves(effects: pd.DataFrame, metric: str, rel_pos: int = 0):
    """Mean effect by layer at one relative position, wait vs random control, with 95% CIs."""
    t = effects[(effects["metric"] == metric) & (effects["rel_pos"] == rel_pos)]
    dirs = sorted(t["direction"].unique())
    fig, axes = plt.subplots(1, len(dirs), figsize=(4.5 * len(dirs), 3.2), squeeze=False)
    for ax, d in zip(axes[0], dirs, strict=False):
        for ctrl, colour in (("none", "C3"), ("random", "C7")):
            g = t[(t["direction"] == d) & (t["control"] == ctrl)].sort_values("layer")
            ax.plot(g["layer"], g["mean"], "o-", color=colour, label="wait" if ctrl == "none" else "random")
            ax.fill_between(g["layer"], g["lo"], g["hi"], color=colour, alpha=0.2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("layer (resid_pre)")
        ax.set_ylabel(f"{metric} effect at rel_pos {rel_pos}")
        ax.set_title(_short(d), fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def attribution_scatter(table: pd.DataFrame, agreement: pd.DataFrame):
    """Exact vs attribution effect per cell, one panel per (direction, metric), with r."""
    t = table[table["attribution"].notna()]
    keys = list(t.groupby(["direction", "metric"]).groups)
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.8 * max(len(keys), 1), 3.5), squeeze=False)
    for ax, (d, m) in zip(axes[0], keys, strict=False):
        g = t[(t["direction"] == d) & (t["metric"] == m)]
        ax.scatter(g["effect"], g["attribution"], s=5, alpha=0.4)
        lim = np.nanmax(np.abs(g[["effect", "attribution"]].to_numpy())) or 1.0
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.5)
        r = agreement[(agreement["direction"] == d) & (agreement["metric"] == m)]["r_cells"]
        ax.set_title(f"{_short(d)}\n{m}: r = {float(r.iloc[0]) if len(r) else float('nan'):.3f}", fontsize=9)
        ax.set_xlabel("exact patching effect")
        ax.set_ylabel("attribution estimate")
    fig.tight_layout()
    return fig


def ablation_bars(summary: pd.DataFrame):
    """Mean effect of each ablation per metric with 95% CIs."""
    metrics = list(summary["metric"].unique())
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=False):
        g = summary[summary["metric"] == m]
        x = np.arange(len(g))
        ax.bar(x, g["mean"], color="C0")
        ax.errorbar(x, g["mean"], yerr=[g["mean"] - g["lo"], g["hi"] - g["mean"]], fmt="none", color="k")
        ax.set_xticks(x, g["kind"], rotation=30, ha="right")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(m)
    fig.tight_layout()
    return fig
