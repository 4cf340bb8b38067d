"""Figures. Every plotting function takes plain tables and returns/saves a matplotlib figure;
`save_figure` writes atomically so an interrupted run never leaves a half-written PNG."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from waitlens.traces.atomic import atomic_write  # noqa: E402


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 130) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight"), fsync=False)
    finally:
        plt.close(fig)
