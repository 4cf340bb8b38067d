"""Transfer of correctness probes between models that read the same trajectories.

A probe trained on model A's states is evaluated on model B's states at the same positions:
rows are matched on (trajectory_id, rel_index), the token's index within the reasoning (on
token_index where a store's metadata lacks rel_index), so A and B must have captured the same
trajectory text with the same tokenizer (same architecture, same d_model); their chat templates
may differ (the same reasoning after a different prompt). Transfer is
cross-validated with A's problem folds: B's positions of a problem are scored by the probe
A learned on the *other* folds, so a problem's label never reaches its own test rows through
A's training set (A and B share the trajectories and their labels). The diagonal (A -> A) is
exactly A's own cross-validated probe.

Probe directions are compared by cosine similarity in raw feature units (coef / scale of the
probe fitted on all of a model's positions), across layers and models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from waitlens.probes.linear import (
    DEFAULT_CS,
    ProbeResult,
    _torch_threads,
    _word_label,
    fit_layer_probes,
)
from waitlens.probes.metrics import auroc_ci
from waitlens.probes.probe_data import ProbeData, load_probe_data

TRANSFER_COLUMNS = ["train_model", "test_model", "word", "layer", "auroc", "auroc_lo", "auroc_hi",
                    "n_positions"]


@dataclass
class TransferResult:
    """table: AUROC of every train model's probe on every test model, per layer
    (`TRANSFER_COLUMNS`); cosine: (model_a, layer_a, model_b, layer_b, cosine) between probe
    directions; probes: name -> the train model's `ProbeResult`."""

    table: pd.DataFrame
    cosine: pd.DataFrame
    probes: dict[str, ProbeResult]

    def matrix(self, layer: int | str = "best") -> pd.DataFrame:
        """AUROC as a train model x test model table, at one `layer` for all, or at each train
        model's best layer (by its own cross-validated AUROC) with `layer="best"`."""
        rows = {}
        for a, res in self.probes.items():
            at = res.best_layer() if layer == "best" else int(layer)
            t = self.table[(self.table.train_model == a) & (self.table.layer == at)]
            rows[f"{a} (L{at})"] = t.set_index("test_model")["auroc"]
        return pd.DataFrame(rows).T.rename_axis(index="train model (layer)", columns="test model")


def _names(datas: Sequence[ProbeData], names) -> list[str]:
    if names is not None:
        if len(names) != len(datas):
            raise ValueError(f"{len(names)} names for {len(datas)} sources")
        return list(names)
    out = []
    for i, d in enumerate(datas):
        name = d.model or f"model{i}"
        out.append(name if name not in out else f"{name}#{i}")
    return out


def transfer_matrix(
    sources: Sequence, *, names: Sequence[str] | None = None, word: str = "wait",
    layers: Sequence[int] | None = None, probe_results: Sequence[ProbeResult] | None = None,
    n_folds: int = 5, n_inner: int = 3, Cs: Sequence[float] = DEFAULT_CS, n_boot: int = 1000,
    seed: int = 0, threads: int | None = None,
) -> TransferResult:
    """Train on each source, test on every source at matched positions, at every layer.

    sources: store directories, `ActivationStore`s or (states, metadata) pairs — one model
    each. probe_results: already fitted probes for the same sources (with `word`), to avoid
    fitting twice; otherwise probes are fitted here without controls.
    """
    if len(sources) < 2:
        raise ValueError("transfer needs at least two sources (stores or (states, metadata) pairs)")
    word = _word_label(word)
    datas = [load_probe_data(s, words=None if word == "all" else word.split("+"), layers=layers,
                             include_controls=False) for s in sources]
    names = _names(datas, names)
    d0 = datas[0].states.shape[2]
    for nm, d in zip(names, datas, strict=True):
        if d.states.shape[2] != d0:
            raise ValueError(f"d_model differs between sources ({names[0]}: {d0}, {nm}: "
                             f"{d.states.shape[2]}); transfer needs the same architecture")
        if d.layers != datas[0].layers:
            raise ValueError(f"layers differ between sources ({names[0]}: {datas[0].layers}, {nm}: "
                             f"{d.layers}); pass layers= present in both")
    if probe_results is None:
        with _torch_threads(threads):
            probe_results = [fit_layer_probes((d.states, d.metadata), words=word if word != "all" else "all",
                                              n_folds=n_folds, n_inner=n_inner, Cs=Cs, controls=False,
                                              n_boot=n_boot, seed=seed, allow_mixed=True)
                             for d in datas]
    probes = dict(zip(names, probe_results, strict=True))
    col = "rel_index" if all("rel_index" in d.metadata and d.metadata["rel_index"].notna().all()
                             for d in datas) else "token_index"
    rows = []
    for a, (name_a, da) in enumerate(zip(names, datas, strict=True)):
        res = probe_results[a]
        if word not in res.fold_coef:
            raise ValueError(f"probe result for {name_a} has no word {word!r}; it has {list(res.fold_coef)}")
        coef, icpt, fold_of = res.fold_coef[word], res.fold_intercept[word], res.folds[word]
        # A's positions that were probed at `word` (graded rows), as (trajectory_id, col) keys
        ma = da.metadata
        tid_a = ma["trajectory_id"].astype(str)
        key_of = dict(zip(zip(tid_a, ma["token_index"].astype(int), strict=True),
                          zip(tid_a, ma[col].astype(int), strict=True), strict=True))
        oof = res.oof[res.oof["word"] == word] if "word" in res.oof else res.oof
        keys_a = {key_of[(str(t), int(i))] for t, i in zip(oof["trajectory_id"], oof["token_index"], strict=True)}
        for name_b, db in zip(names, datas, strict=True):
            mb = db.metadata
            key_b = list(zip(mb["trajectory_id"].astype(str), mb[col].astype(int), strict=True))
            graded = mb["correct"].notna().to_numpy()
            hit = np.array([k in keys_a for k in key_b]) & graded
            if not hit.any():
                raise ValueError(f"no positions of {name_b} match {name_a}'s on (trajectory_id, {col}); "
                                 "transfer needs both models' states captured on the same trajectories")
            r = np.flatnonzero(hit)
            y = mb["correct"].to_numpy()[r].astype(bool)
            g = mb["problem_id"].astype(str).to_numpy()[r]
            f = np.array([fold_of[p] for p in g])
            Xb = db.states[r].astype(np.float64)  # [m, L, d]
            z = np.einsum("mld,mld->ml", Xb, coef[f]) + icpt[f]
            p = 1 / (1 + np.exp(-z))
            for li, layer in enumerate(da.layers):
                auc, lo, hi = auroc_ci(y, p[:, li], g, n_boot=n_boot, seed=seed)
                rows.append({"train_model": name_a, "test_model": name_b, "word": word, "layer": layer,
                             "auroc": auc, "auroc_lo": lo, "auroc_hi": hi, "n_positions": len(r)})
    table = pd.DataFrame(rows, columns=TRANSFER_COLUMNS)
    return TransferResult(table, probe_cosines(probes, word), probes)


def probe_cosines(probes: dict[str, ProbeResult], word: str = "wait") -> pd.DataFrame:
    """Cosine similarity between raw-unit probe directions of every (model, layer) pair."""
    keys, vecs = [], []
    for name, res in probes.items():
        for li, layer in enumerate(res.layers):
            keys.append((name, layer))
            vecs.append(res.directions[word][li])
    V = np.asarray(vecs, dtype=np.float64)
    V = V / np.clip(np.linalg.norm(V, axis=1, keepdims=True), 1e-300, None)
    C = V @ V.T
    out = [{"model_a": ka[0], "layer_a": ka[1], "model_b": kb[0], "layer_b": kb[1], "cosine": C[i, j]}
           for i, ka in enumerate(keys) for j, kb in enumerate(keys)]
    return pd.DataFrame(out)
