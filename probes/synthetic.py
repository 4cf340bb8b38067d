"""Synthetic activation stores with planted answers: what every probe must first recover.

`planted_states` plants a linear correctness direction at one layer of the discourse-word
rows (control rows and other layers carry none); `leaky_states` plants no correctness signal
at all, only problem identity: every problem's positions are near-identical states sharing
one label, which ungrouped cross-validation mistakes for signal.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from waitlens.traces.positions import CONTROL_WORD


def _metadata(rng, n_problems, traj_per_problem, words_per_traj, y_traj, *, controls, word="wait",
              model="synthetic"):
    rows = []
    for p in range(n_problems):
        for t in range(traj_per_problem):
            tid = f"p{p}-t{t}"
            n_tok = int(rng.integers(40, 200))
            idx = np.sort(rng.choice(np.arange(5, n_tok), words_per_traj, replace=False))
            kinds = [word] * words_per_traj + ([CONTROL_WORD] * words_per_traj if controls else [])
            ctl_idx = np.sort(rng.choice(np.arange(5, n_tok), words_per_traj, replace=False)) if controls else []
            for w, ti in zip(kinds, list(idx) + list(ctl_idx), strict=True):
                rows.append({
                    "trajectory_id": tid, "problem_id": f"p{p}", "word": w, "surface": w,
                    "anchor": "first", "token_index": int(ti), "span_start": int(ti), "span_end": int(ti) + 1,
                    "rel_index": int(ti) - 4, "frac": (int(ti) - 4) / n_tok, "n_reasoning_tokens": n_tok,
                    "correct": bool(y_traj[p * traj_per_problem + t]), "char_start": 0, "char_end": 0,
                    "model": model,
                })
    return pd.DataFrame(rows)


def planted_states(n_problems: int = 60, traj_per_problem: int = 2, words_per_traj: int = 3, *,
                   n_layers: int = 4, d_model: int = 32, planted_layer: int = 2, signal: float = 1.5,
                   controls: bool = True, seed: int = 0, model: str = "synthetic",
                   noise_scale: np.ndarray | None = None):
    """(states float32 [n, layer, d], metadata). Word rows at `planted_layer` carry
    `signal * (+1 correct / -1 incorrect)` along a fixed unit direction; everything else is
    Gaussian noise (per-dimension scale `noise_scale`, default 1)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_problems * traj_per_problem)
    meta = _metadata(rng, n_problems, traj_per_problem, words_per_traj, y, controls=controls, model=model)
    n = len(meta)
    scale = np.ones(d_model) if noise_scale is None else np.asarray(noise_scale)
    states = rng.standard_normal((n, n_layers, d_model)) * scale
    u = np.random.default_rng(12345).standard_normal(d_model)
    u /= np.linalg.norm(u)
    is_word = (meta["word"] != CONTROL_WORD).to_numpy()
    sign = np.where(meta["correct"].to_numpy(), 1.0, -1.0)
    states[is_word, planted_layer] += signal * sign[is_word, None] * u
    return states.astype(np.float32), meta


def leaky_states(n_problems: int = 40, positions_per_problem: int = 20, *, n_layers: int = 2,
                 d_model: int = 64, jitter: float = 0.05, seed: int = 0, model: str = "synthetic"):
    """(states, metadata): each problem = one trajectory with one label and many near-identical
    states (a problem-specific random vector + `jitter` noise); no correctness signal."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n_problems // 2 + 1)[:n_problems]
    rng.shuffle(y)
    meta = _metadata(rng, n_problems, 1, positions_per_problem, y, controls=False, model=model)
    centers = rng.standard_normal((n_problems, n_layers, d_model))
    pid = meta["problem_id"].str[1:].astype(int).to_numpy()
    states = centers[pid] + jitter * rng.standard_normal((len(meta), n_layers, d_model))
    return states.astype(np.float32), meta
