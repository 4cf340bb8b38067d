"""Per-layer linear probes for eventual correctness, with leak-free CV and their controls.

The question: does the residual state at a discourse token ("wait") already say whether the
trajectory will end correct? A probe is standardized features + L2 logistic regression with
the strength C chosen by inner cross-validation, one per layer. Every estimate is
out-of-fold under cross-validation grouped by problem: no problem has positions on both
sides of a split (positions of one problem share most of their state and often the label;
ungrouped CV reads that shared identity as "signal" — see the planted-leakage test).

Each probe is reported beside three controls, fitted with the same folds:

- random positions: the same probe on states at non-discourse positions of the same
  trajectories, matched for relative position (rows with ``word == "<control>"``);
- shuffled labels (Hewitt & Liang's selectivity): labels permuted across trajectories —
  the unit that carries the real label — within each outer fold, so the control task has the
  real label's structure (one label for every position of a trajectory, each fold's class
  balance) but no relation to the states. (Permuting across folds would let fold base rates
  drift apart, and pooled out-of-fold AUROC of a near-constant probe then falls below 0.5:
  each fold's intercept follows its training rate, which is anti-correlated with its test
  rate.) A probe expressive enough to memorize trajectories could fit it on training
  folds; under problem-grouped CV it must score 0.5, and it is fitted with the C chosen for
  the real task (same capacity). `control_shuffled_auroc` pools 5 permutations; selectivity
  (AUROC - shuffled AUROC, with a paired-bootstrap CI) is taken against the first.
- position baseline: the same logistic regression on [frac, rel_index, n_reasoning_tokens]
  only — what position and length alone predict.

Performance: states are read once ([n, layer, d]); each outer fold standardizes all layers
at once and fits every (layer x inner fold x C) problem together in one batched Newton
solve (`probes.solver`); there is no per-layer loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from waitlens.probes.folds import Folds, check_labels, make_folds, shuffle_labels
from waitlens.probes.metrics import (
    auroc,
    auroc_ci,
    expected_calibration_error,
    paired_auroc_difference,
)
from waitlens.probes.probe_data import (
    CONTROL,
    ProbeData,
    load_probe_data,
    match_controls,
    words_list,
)
from waitlens.probes.solver import fit_logistic_batched

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 1, 6))
CSV_COLUMNS = [
    "model", "word", "layer", "auroc", "auroc_lo", "auroc_hi", "accuracy", "ece",
    "control_random_auroc", "control_shuffled_auroc", "baseline_auroc",
]
MARGIN_COLUMNS = [
    "model", "word", "layer", "C", "n_positions", "n_problems",
    "margin_random", "margin_random_lo", "margin_random_hi",
    "margin_baseline", "margin_baseline_lo", "margin_baseline_hi",
    "selectivity", "selectivity_lo", "selectivity_hi",
]
POSITION_FEATURES = ("frac", "rel_index", "n_reasoning_tokens")


# -- metrics ----------------------------------------------------------------------------------
@contextmanager
def _torch_threads(n: int | None):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class CVFit:
    """Out-of-fold probabilities [task, n, layer], chosen C per (fold, layer) and raw-unit
    weights per (fold, task, layer) — fold `n_folds` is the fit on all rows."""

    oof: np.ndarray
    C: np.ndarray
    coef: np.ndarray  # [F+1, T, L, d]
    intercept: np.ndarray  # [F+1, T, L]
    info: list = field(default_factory=list)


def cross_validate(
    X: Float[np.ndarray, "n layer d"], labels: Sequence[np.ndarray], folds: Folds, *,
    Cs: Sequence[float] = DEFAULT_CS, dtype=torch.float64, tol: float = 1e-7,
    select_dtype=torch.float32, select_tol: float = 1e-5,
) -> CVFit:
    """Nested grouped CV of an L2 logistic probe at every layer, batched over layers.

    labels[0] chooses C (inner CV, mean held-out log loss, first best in ascending C); every
    label vector in `labels` is then fitted with that C on the outer training rows (the
    shuffled-label control rides along here, at the real task's capacity). The inner
    selection runs in `select_dtype` to `select_tol` (it only has to rank the Cs); the
    final fits run in `dtype` to `tol`, warm-started from the inner solutions.
    """
    X = np.asarray(X)
    n, L, d = X.shape
    T = len(labels)
    Ys = [torch.as_tensor(np.asarray(y, dtype=float), dtype=dtype) for y in labels]
    Cs = np.asarray(sorted(Cs), dtype=float)
    nC = len(Cs)
    F = folds.n_folds
    oof = np.full((T, n, L), np.nan)
    C_chosen = np.zeros((F + 1, L))
    coef = np.zeros((F + 1, T, L, d))
    intercept = np.zeros((F + 1, T, L))
    info = []
    Xall = torch.from_numpy(einops.rearrange(X, "n l d -> l n d").astype(np.float32, copy=False))
    warm = None  # the previous fold's inner solutions: folds share most rows, so a close start
    for f in range(F + 1):
        tr = np.flatnonzero(folds.outer != f) if f < F else np.arange(n)
        te = np.flatnonzero(folds.outer == f) if f < F else np.array([], dtype=int)
        Xtr = Xall[:, torch.from_numpy(tr)].to(dtype)  # [L, n_tr, d]
        mu = Xtr.mean(1, keepdim=True)
        sd = Xtr.std(1, keepdim=True, unbiased=False)
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        Xs = (Xtr - mu) / sd
        inner = folds.inner[f][tr]
        ks = np.unique(inner)
        # inner problems: q = k * nC + c
        M = torch.zeros(len(tr), len(ks) * nC, dtype=dtype)
        lam = torch.zeros(len(ks) * nC, dtype=dtype)
        for j, k in enumerate(ks):
            m = torch.from_numpy(inner != k).to(dtype)
            M[:, j * nC:(j + 1) * nC] = m[:, None]
            lam[j * nC:(j + 1) * nC] = torch.from_numpy(1.0 / (Cs * float(m.sum())))
        y0 = Ys[0][tr]
        Xsel = Xs.to(select_dtype)
        if warm is not None and warm[0].shape[-1] != M.shape[1]:
            warm = None
        W, b, inf1 = fit_logistic_batched(Xsel, y0[:, None].expand(-1, M.shape[1]), M.to(select_dtype),
                                          lam.to(select_dtype), tol=select_tol,
                                          W0=None if warm is None else warm[0], b0=None if warm is None else warm[1])
        warm = (W, b)
        Z = torch.baddbmm(b[:, None, :], Xsel, W).to(dtype)  # [L, n_tr, Q]
        W, b = W.to(dtype), b.to(dtype)
        ll = torch.nn.functional.softplus(Z) - y0[None, :, None] * Z
        held = torch.stack([torch.from_numpy(inner == k) for k in ks], 1)  # [n_tr, K]
        score = torch.zeros(L, len(ks), nC, dtype=dtype)
        for j in range(len(ks)):
            h = held[:, j].to(dtype)
            score[:, j] = (ll[:, :, j * nC:(j + 1) * nC] * h[None, :, None]).sum(1) / h.sum()
        best = score.mean(1).argmin(1)  # [L] (first best: smallest C on ties)
        C_chosen[f] = Cs[best.numpy()]
        # warm start: mean of the inner solutions at the chosen C
        idx = torch.stack([j * nC + best for j in range(len(ks))], 1)  # [L, K]
        W0 = torch.stack([W[torch.arange(L), :, idx[:, j]] for j in range(len(ks))], 0).mean(0)  # [L, d]
        b0 = torch.stack([b[torch.arange(L), idx[:, j]] for j in range(len(ks))], 0).mean(0)
        lam2 = torch.from_numpy(1.0 / (C_chosen[f] * len(tr))).to(dtype)[:, None].expand(L, T)
        Y2 = torch.stack([y[tr] for y in Ys], 1)
        M2 = torch.ones(len(tr), T, dtype=dtype)
        W2, b2, inf2 = fit_logistic_batched(Xs, Y2, M2, lam2, W0=W0[:, :, None].expand(-1, -1, T),
                                            b0=b0[:, None].expand(-1, T), tol=tol)
        info.append((inf1, inf2))
        wr = W2 / sd.transpose(1, 2)  # raw units [L, d, T]
        br = b2 - (mu.transpose(1, 2) * wr).sum(1)  # [L, T]
        coef[f] = einops.rearrange(wr.numpy(), "l d t -> t l d")
        intercept[f] = br.numpy().T
        if len(te):
            Xte = Xall[:, torch.from_numpy(te)].to(dtype)
            Zt = torch.baddbmm(br[:, None, :], Xte, wr)  # [L, n_te, T]
            oof[:, te, :] = einops.rearrange(torch.sigmoid(Zt).numpy(), "l n t -> t n l")
    return CVFit(oof, C_chosen, coef, intercept, info)


@dataclass
class ProbeResult:
    """Per-layer probe results for one model.

    table: one row per (word, layer) with `CSV_COLUMNS`; margins: each probe's margin over
    its controls with paired-bootstrap CIs (`MARGIN_COLUMNS`); oof: out-of-fold predictions
    (one row per position and layer); directions: word -> [layer, d] probe weights in raw
    feature units (coef / scale, fitted on all rows), intercepts likewise; fold_coef /
    fold_intercept: word -> per-fold raw weights [fold, layer, d] for transfer; folds:
    word -> problem -> outer fold.
    """

    model: str
    layers: list[int]
    table: pd.DataFrame
    margins: pd.DataFrame
    oof: pd.DataFrame
    directions: dict[str, np.ndarray]
    intercepts: dict[str, np.ndarray]
    fold_coef: dict[str, np.ndarray] = field(default_factory=dict)
    fold_intercept: dict[str, np.ndarray] = field(default_factory=dict)
    folds: dict[str, dict] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def to_csv(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.table[CSV_COLUMNS].to_csv(path, index=False)
        return path

    def best_layer(self, word: str | None = None) -> int:
        t = self.table if word is None else self.table[self.table["word"] == word]
        return int(t.loc[t["auroc"].idxmax(), "layer"])


def _word_label(w) -> str:
    wl = words_list(w)
    return "all" if wl is None else "+".join(wl)


def fit_layer_probes(
    store, metadata: pd.DataFrame | None = None, *,
    words: str | Sequence[str] = "wait",
    layers: Sequence[int] | None = None,
    model: str | None = None,
    allow_mixed: bool = False,
    n_folds: int = 5,
    n_inner: int = 3,
    Cs: Sequence[float] = DEFAULT_CS,
    controls: bool = True,
    n_shuffles: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    threads: int | None = None,
    dtype=torch.float64,
    tol: float = 1e-7,
    label: str = "correct",
    margins: bool = True,
) -> ProbeResult:
    """Cross-validated linear probes for eventual correctness at every layer.

    store: a store directory, an `hooks.store.ActivationStore`, or plain states
    [n, layer, d] with `metadata` (a DataFrame with the store's metadata columns).
    words: one word, several (each probed on its own), or "all" (all lexicon words pooled);
    e.g. ``["wait", "so", "all"]``. Controls (random positions, shuffled labels, position
    baseline) are fitted with the same folds when `controls` is true; the shuffled-label
    control pools `n_shuffles` permutations (they ride along in the batched final fit).
    label: the metadata column to predict (boolean; rows where it is missing are left out):
    ``"correct"`` by default, or any other per-position fact, e.g. the organism's
    ``after_slip`` (probe *what the states encode*, not only what they predict).
    margins: False skips the margins' paired bootstraps (`res.margins` then holds NaN in the
    margin and selectivity columns; `res.table` is unchanged).
    """
    word_groups = [words] if isinstance(words, str) else list(words)
    union = None if any(words_list(w) is None for w in word_groups) else sorted(
        {x for w in word_groups for x in words_list(w)})
    data = load_probe_data(store, metadata, words=union if union is not None else "all", layers=layers,
                           model=model, allow_mixed=allow_mixed, include_controls=controls)
    tables, margin_tables, oofs = [], [], []
    res = ProbeResult(data.model, data.layers, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), {}, {})
    with _torch_threads(threads):
        for w in word_groups:
            t, m, o = _probe_word(data, w, res, n_folds=n_folds, n_inner=n_inner, Cs=Cs,
                                  controls=controls, n_boot=n_boot, seed=seed, dtype=dtype, tol=tol,
                                  n_shuffles=n_shuffles, label=label, margins=margins)
            tables.append(t)
            margin_tables.append(m)
            oofs.append(o)
    res.table = pd.concat(tables, ignore_index=True)[CSV_COLUMNS]
    res.margins = pd.concat(margin_tables, ignore_index=True)[MARGIN_COLUMNS]
    res.oof = pd.concat(oofs, ignore_index=True)
    return res


def _position_features(meta: pd.DataFrame) -> np.ndarray:
    missing = [c for c in POSITION_FEATURES if c not in meta.columns]
    if missing:
        raise ValueError(f"metadata lacks column(s) {missing} needed by the position baseline")
    return meta[list(POSITION_FEATURES)].to_numpy(dtype=np.float32)[:, None, :]


def _labels(meta: pd.DataFrame, label: str = "correct") -> tuple[np.ndarray, np.ndarray]:
    if label not in meta.columns:
        raise ValueError(f"metadata has no label column {label!r}")
    c = meta[label]
    ok = c.notna().to_numpy()
    y = np.zeros(len(c), dtype=int)
    y[ok] = c[ok].astype(bool).to_numpy().astype(int)
    return y, ok


def _probe_word(data: ProbeData, w, res: ProbeResult, *, n_folds, n_inner, Cs, controls, n_boot,
                seed, dtype, tol, n_shuffles, label="correct", margins=True):
    meta = data.metadata
    wl = words_list(w)
    word = _word_label(w)
    wcol = meta["word"].astype(str).str.lower()
    is_word = (wcol != CONTROL) if wl is None else wcol.isin(wl)
    y_all, graded = _labels(meta, label)
    if (is_word & ~graded).any():
        warnings.warn(f"{int((is_word & ~graded).sum())} '{word}' positions have no {label!r} "
                      "label and are left out", stacklevel=3)
    rows = np.flatnonzero(is_word.to_numpy() & graded)
    if len(rows) == 0:
        from waitlens.probes.stats import InsufficientDataError

        raise InsufficientDataError(f"no graded positions of word {word!r}; the metadata holds words "
                         f"{sorted(set(wcol) - {CONTROL})}")
    wm = meta.iloc[rows].reset_index(drop=True)
    y = y_all[rows]
    groups = wm["problem_id"].astype(str).to_numpy()
    check_labels(y, groups, n_folds, what=f"'{word}' positions")
    folds = make_folds(y, groups, n_folds, n_inner, seed)
    labels = [y]
    if controls:
        # shuffle at the level the label lives: whole trajectories for a trajectory-level label
        # (correctness), single positions for one that varies within a trajectory (a per-step fact)
        traj = wm["trajectory_id"].astype(str).to_numpy()
        per_traj = pd.Series(y).groupby(traj).nunique().max() <= 1
        units = traj if per_traj else np.arange(len(y)).astype(str)
        for k in range(n_shuffles):
            labels.append(shuffle_labels(y, units, seed + k, strata=folds.outer))
    fit = cross_validate(data.states[rows], labels, folds, Cs=Cs, dtype=dtype, tol=tol)
    L = len(data.layers)
    res.directions[word] = fit.coef[n_folds, 0]
    res.intercepts[word] = fit.intercept[n_folds, 0]
    res.fold_coef[word] = fit.coef[:n_folds, 0]
    res.fold_intercept[word] = fit.intercept[:n_folds, 0]
    res.folds[word] = dict(zip(groups, folds.outer, strict=True))
    res.info.setdefault("solver", {})[word] = fit.info

    ctl_fit = base_fit = None
    ctl_rows = np.array([], dtype=int)
    if controls:
        cands = np.flatnonzero((wcol == CONTROL).to_numpy() & graded)
        matched = match_controls(meta, rows, cands)
        ctl_rows = matched[matched >= 0]
        if len(ctl_rows) == 0:
            has = (wcol == CONTROL).any()
            warnings.warn(f"no control positions (word '{CONTROL}') "
                          + (f"with a {label!r} label" if has else "in the store")
                          + f" for the '{word}' trajectories"
                          + ("" if has else "; capture with --controls for the random-position control"),
                          stacklevel=3)
        else:
            cm = meta.iloc[ctl_rows]
            cf = folds.apply(cm["problem_id"].astype(str).to_numpy())
            try:
                ctl_fit = cross_validate(data.states[ctl_rows], [y_all[ctl_rows]], cf, Cs=Cs,
                                         dtype=dtype, tol=tol)
            except ValueError as e:
                warnings.warn(f"random-position control not fitted: {e}", stacklevel=3)
        base_fit = cross_validate(_position_features(wm), [y], folds, Cs=Cs, dtype=dtype, tol=tol)

    # metrics
    trows, mrows = [], []
    base_auc = np.nan
    if base_fit is not None:
        base_auc = auroc(y, base_fit.oof[0, :, 0])
    for li, layer in enumerate(data.layers):
        p = fit.oof[0, :, li]
        a, lo, hi = auroc_ci(y, p, groups, n_boot=n_boot, seed=seed)
        row = {"model": data.model, "word": word, "layer": layer, "auroc": a, "auroc_lo": lo,
               "auroc_hi": hi, "accuracy": float(np.mean((p >= 0.5) == y)),
               "ece": expected_calibration_error(y, p), "control_random_auroc": np.nan,
               "control_shuffled_auroc": np.nan, "baseline_auroc": base_auc}
        mrow = {"model": data.model, "word": word, "layer": layer, "C": fit.C[n_folds, li],
                "n_positions": len(y), "n_problems": len(np.unique(groups))}
        for k in MARGIN_COLUMNS[6:]:
            mrow[k] = np.nan
        if controls:  # the shuffles pooled: each is fitted and scored with the same folds
            ps = fit.oof[1:, :, li].reshape(-1)
            ys = np.concatenate(labels[1:])
            row["control_shuffled_auroc"] = auroc(ys, ps)
            # selectivity with its CI against the first permutation (a paired bootstrap over the
            # pooled permutations costs n_shuffles times more for little gain)
            if margins:
                mrow["selectivity"], mrow["selectivity_lo"], mrow["selectivity_hi"] = paired_auroc_difference(
                    y, p, groups, labels[1], fit.oof[1, :, li], groups, n_boot=n_boot, seed=seed)
            if ctl_fit is not None:
                pc = ctl_fit.oof[0, :, li]
                yc = y_all[ctl_rows]
                gc = meta["problem_id"].astype(str).to_numpy()[ctl_rows]
                row["control_random_auroc"] = auroc(yc, pc)
                if margins:
                    (mrow["margin_random"], mrow["margin_random_lo"],
                     mrow["margin_random_hi"]) = paired_auroc_difference(y, p, groups, yc, pc, gc,
                                                                         n_boot=n_boot, seed=seed)
            if margins:
                pb = base_fit.oof[0, :, 0]
                (mrow["margin_baseline"], mrow["margin_baseline_lo"],
                 mrow["margin_baseline_hi"]) = paired_auroc_difference(y, p, groups, y, pb, groups,
                                                                       n_boot=n_boot, seed=seed)
        trows.append(row)
        mrows.append(mrow)

    oof = pd.DataFrame({
        "word": word, "layer": np.repeat(data.layers, len(y)),
        "trajectory_id": np.tile(wm["trajectory_id"].astype(str).to_numpy(), L),
        "problem_id": np.tile(groups, L),
        "token_index": np.tile(wm["token_index"].to_numpy() if "token_index" in wm else np.full(len(y), -1), L),
        "fold": np.tile(folds.outer, L), "correct": np.tile(y, L),
        "prob": einops.rearrange(fit.oof[0], "n l -> (l n)"),
    })
    return pd.DataFrame(trows), pd.DataFrame(mrows), oof
