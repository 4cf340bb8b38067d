"""Probe figures: ROC-AUC by layer with control bands, and the transfer matrix."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator


def plot_auroc_by_layer(table: pd.DataFrame, title: str | None = None, ceilings: pd.DataFrame | None = None):
    """One panel per word; per model: probe AUROC with its bootstrap CI band (solid), the
    random-position control (dashed), the position baseline (dotted); the shuffled-label
    control as a grey band spanning its per-layer range over models. `ceilings`
    (`probes.feature_probes` rows with ``word`` and ``features``): each non-position feature
    set as a dash-dot line with its CI band, in its word's panel."""
    words = list(dict.fromkeys(table["word"]))
    fig, axes = plt.subplots(1, len(words), figsize=(5.2 * len(words), 3.8), squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, word in zip(axes[0], words, strict=True):
        tw = table[table["word"] == word]
        for i, (model, t) in enumerate(tw.groupby("model", sort=False)):
            t = t.sort_values("layer")
            c = colors[i % len(colors)]
            ax.plot(t["layer"], t["auroc"], "-o", color=c, ms=3, label=f"{model}")
            ax.fill_between(t["layer"], t["auroc_lo"], t["auroc_hi"], color=c, alpha=0.18, lw=0)
            if t["control_random_auroc"].notna().any():
                ax.plot(t["layer"], t["control_random_auroc"], "--", color=c, lw=1,
                        label=f"{model}: random positions")
            if t["baseline_auroc"].notna().any():
                ax.plot(t["layer"], t["baseline_auroc"], ":", color=c, lw=1.2, label=f"{model}: position only")
        sh = tw.groupby("layer")["control_shuffled_auroc"]
        if tw["control_shuffled_auroc"].notna().any():
            lo, hi = sh.min(), sh.max()
            ax.fill_between(lo.index, np.minimum(lo, 0.5), np.maximum(hi, 0.5), color="0.6", alpha=0.35,
                            lw=0, label="shuffled labels")
        if ceilings is not None:
            cw = ceilings[(ceilings["word"] == word) & (ceilings["features"] != "position")]
            for k, r in enumerate(cw.itertuples()):
                shade = str(0.15 + 0.3 * k)
                ax.axhline(r.auroc, color=shade, ls="-.", lw=1, label=f"ceiling: {r.features}")
                ax.axhspan(r.auroc_lo, r.auroc_hi, color=shade, alpha=0.08, lw=0)
        ax.axhline(0.5, color="0.4", lw=0.6)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"at '{word}'")
        ax.set_ylim(0.3, 1.0)
        ax.grid(alpha=0.25)
    axes[0, 0].set_ylabel("ROC-AUC (out-of-fold, 95% CI over problems)")
    handles = {}
    for ax in axes[0]:  # one legend for every panel's lines (a ceiling may sit in one panel only)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    axes[0, -1].legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_transfer_matrix(matrix: pd.DataFrame, title: str | None = None):
    """Heatmap of AUROC, rows = train model (at its layer), columns = test model."""
    m = matrix.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * m.shape[1], 1.2 + 0.9 * m.shape[0]))
    im = ax.imshow(m, vmin=0.4, vmax=1.0, cmap="viridis")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center",
                    color="white" if m[i, j] < 0.75 else "black", fontsize=9)
    ax.set_xticks(range(m.shape[1]), [str(c) for c in matrix.columns], rotation=20, ha="right")
    ax.set_yticks(range(m.shape[0]), [str(r) for r in matrix.index])
    ax.set_xlabel("test model (states)")
    ax.set_ylabel("train model (probe, layer)")
    fig.colorbar(im, ax=ax, label="ROC-AUC")
    ax.set_title(title or "probe transfer (cross-validated by problem)")
    fig.tight_layout()
    return fig


def plot_cosine(cosine: pd.DataFrame, title: str | None = None):
    """Cosine between probe directions over (model, layer) x (model, layer)."""
    keys = list(dict.fromkeys(zip(cosine["model_a"], cosine["layer_a"], strict=True)))
    idx = {k: i for i, k in enumerate(keys)}
    C = np.full((len(keys), len(keys)), np.nan)
    for r in cosine.itertuples():
        C[idx[(r.model_a, r.layer_a)], idx[(r.model_b, r.layer_b)]] = r.cosine
    fig, ax = plt.subplots(figsize=(2 + 0.28 * len(keys), 1.6 + 0.28 * len(keys)))
    im = ax.imshow(C, vmin=-1, vmax=1, cmap="RdBu_r")
    labels = [f"{m} L{layer}" for m, layer in keys]
    ax.set_xticks(range(len(keys)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(keys)), labels, fontsize=6)
    fig.colorbar(im, ax=ax, label="cosine (raw units)")
    ax.set_title(title or "probe directions")
    fig.tight_layout()
    return fig
