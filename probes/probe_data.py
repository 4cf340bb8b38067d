"""What a probe reads: states [n, layer, d] and their metadata from a store or plain arrays,
the rows of the asked words, one model at a time, and the matched control rows."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from waitlens.traces.positions import CONTROL_WORD

CONTROL = CONTROL_WORD  # the `word` of control positions


@dataclass
class ProbeData:
    """States [n, layer, d] (float32 numpy), their metadata, layer numbers and model name."""

    states: np.ndarray
    metadata: pd.DataFrame
    layers: list[int]
    model: str


def _as_numpy(states) -> np.ndarray:
    if isinstance(states, torch.Tensor):
        states = states.detach().cpu().float().numpy()
    states = np.asarray(states, dtype=np.float32)
    if states.ndim == 2:
        states = states[:, None, :]
    if states.ndim != 3:
        raise ValueError(f"states must be [n_positions, n_layers, d_model], got shape {states.shape}")
    return states


def load_probe_data(source, metadata: pd.DataFrame | None = None, *, words=None, layers=None,
                    model: str | None = None, allow_mixed: bool = False,
                    include_controls: bool = True) -> ProbeData:
    """States and metadata from a store directory, an `ActivationStore`, or (states, metadata).

    Reads the store once, only the rows needed (the words asked for, plus control rows),
    only the layers asked for. Checks that the positions come from one model: metadata with
    several `model` values is an error unless `model=` picks one or `allow_mixed=True`.
    """
    if isinstance(source, tuple) and metadata is None:
        source, metadata = source
    if isinstance(source, (str, os.PathLike)):
        from waitlens.hooks.store import ActivationStore

        source = ActivationStore(Path(source))
    if metadata is None:  # a store
        meta = source.metadata.reset_index(drop=True)
        store_layers = list(source.layers)
        keep = _row_filter(meta, words, include_controls)
        model_name = str(getattr(source, "model", "") or "")
        meta, keep, model_name = _check_models(meta, keep, model, allow_mixed, model_name, str(source.path))
        rows = np.flatnonzero(keep)
        use_layers = store_layers if layers is None else [int(x) for x in layers]
        states = _as_numpy(source.states(layers=use_layers, rows=rows))
        return ProbeData(states, meta.iloc[rows].reset_index(drop=True), use_layers, model_name)
    states = _as_numpy(source)
    meta = metadata.reset_index(drop=True)
    if len(meta) != states.shape[0]:
        raise ValueError(f"metadata has {len(meta)} rows but states has {states.shape[0]}")
    all_layers = list(range(states.shape[1]))
    if layers is not None:
        layers = [int(x) for x in layers]
        bad = [x for x in layers if x not in all_layers]
        if bad:
            raise ValueError(f"layer(s) {bad} not in states with {states.shape[1]} layers")
        states = states[:, layers]
    keep = _row_filter(meta, words, include_controls)
    meta, keep, model_name = _check_models(meta, keep, model, allow_mixed, "", "the metadata")
    rows = np.flatnonzero(keep)
    return ProbeData(states[rows], meta.iloc[rows].reset_index(drop=True),
                     list(layers) if layers is not None else all_layers, model_name)


def words_list(words) -> list[str] | None:
    if words is None:
        return None
    words = [words] if isinstance(words, str) else list(words)
    return None if "all" in words else [w.lower() for w in words]


def _row_filter(meta: pd.DataFrame, words, include_controls: bool) -> np.ndarray:
    missing = [c for c in ("trajectory_id", "problem_id", "word", "correct") if c not in meta.columns]
    if missing:
        raise ValueError(f"metadata lacks column(s) {missing}; a probe needs trajectory_id, problem_id, word, correct")
    w = meta["word"].astype(str).str.lower()
    wl = words_list(words)
    keep = (w != CONTROL) if wl is None else w.isin(wl)
    if include_controls:
        keep |= w == CONTROL
    return keep.to_numpy(dtype=bool)


def _check_models(meta, keep, model, allow_mixed, default, where):
    if "model" not in meta.columns:
        return meta, keep, model or default
    names = sorted(meta.loc[keep, "model"].astype(str).unique())
    if model is not None:
        if model not in names:
            raise ValueError(f"model {model!r} not in {where}; it holds {names}")
        keep = keep & (meta["model"].astype(str) == model).to_numpy()
        return meta, keep, model
    if len(names) > 1 and not allow_mixed:
        raise ValueError(
            f"{where} mixes positions from {len(names)} models {names}; a probe over mixed states "
            "learns which model a state came from. Pass model=NAME (CLI: --model NAME) to probe one "
            "of them, or allow_mixed=True (CLI: --allow-mixed) if mixing is what you mean"
        )
    return meta, keep, (names[0] if len(names) == 1 else "+".join(names)) or default


# -- folds ------------------------------------------------------------------------------------

def match_controls(meta: pd.DataFrame, word_rows: np.ndarray, control_rows: np.ndarray) -> np.ndarray:
    """For every word row, a control row of the same trajectory at the nearest `frac`
    (without reuse while unused ones remain). Returns control row indices (-1: none)."""
    out = np.full(len(word_rows), -1)
    tid = meta["trajectory_id"].astype(str).to_numpy()
    frac = meta["frac"].to_numpy(dtype=float)
    ctl_by_t: dict[str, list[int]] = {}
    for r in control_rows:
        ctl_by_t.setdefault(tid[r], []).append(r)
    pos_of = {r: i for i, r in enumerate(word_rows)}
    by_t: dict[str, list[int]] = {}
    for r in word_rows:
        by_t.setdefault(tid[r], []).append(r)
    for t, rows in by_t.items():
        cands = np.array(ctl_by_t.get(t, []), dtype=int)
        if len(cands) == 0:
            continue
        used = np.zeros(len(cands), dtype=bool)
        for r in rows:
            dist = np.abs(frac[cands] - frac[r])
            if (~used).any():
                dist = np.where(used, np.inf, dist)
            j = int(np.argmin(dist))
            used[j] = True
            out[pos_of[r]] = cands[j]
    return out


# -- the result -------------------------------------------------------------------------------
