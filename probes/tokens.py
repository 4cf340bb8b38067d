"""Token–correctness association and the distribution of "wait" (no forward passes here).

Input: the occurrence table from `hooks.token_occurrences` (one row per token or lexicon-word
occurrence, with the model's log-prob of it) and the trajectories (id, problem, correct).

For every key (a lexicon word with its variants merged, or a token's stripped text):

- occurrences per trajectory, correct vs incorrect (``rate_*``; zeros where absent), and
  the share of trajectories containing it (``present_*``);
- the model's probability of it where it occurs: each trajectory's mean over its
  occurrences, then averaged over the trajectories of a class (``prob_*``);
- effect size: AUROC of the per-trajectory count, correct (positive) vs incorrect, with its
  rank-biserial ``2·AUROC − 1``; AUROC > 0.5 means more frequent in correct trajectories.
  95% CI by a cluster bootstrap that resamples problems, not tokens or trajectories;
  two-sided Mann–Whitney p; Benjamini–Hochberg q over every key tested;
- the same for the probability (``prob_auroc``, over trajectories containing the key).

Keys with fewer than `min_count` occurrences are not tested (listed in `notes`). A key that
occurs in one class only keeps a finite AUROC (its count is compared with the other class's
zeros); its probability in the class where it never occurs is undefined, left blank, and the
row's ``note`` says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from waitlens.probes.stats import (
    InsufficientDataError,
    bh_qvalues,
    cluster_bootstrap,
    mann_whitney_auroc,
    wilson_ci,
)

TABLE_COLUMNS = [
    "model", "rank", "key", "kind", "n_occurrences", "n_traj_correct", "n_traj_incorrect",
    "rate_correct", "rate_incorrect", "rate_gap", "present_correct", "present_incorrect",
    "prob_correct", "prob_incorrect", "prob_gap", "auroc", "auroc_lo", "auroc_hi",
    "rank_biserial", "p", "q", "prob_auroc", "prob_p", "prob_q", "direction", "note",
]


@dataclass
class TokenTable:
    """The ranked association table of one model, and what was left out and why."""

    model: str
    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    n_correct: int = 0
    n_incorrect: int = 0

    def row(self, key: str) -> pd.Series:
        hit = self.table[self.table["key"] == key]
        if hit.empty:
            raise KeyError(f"{key!r} not in the token table of {self.model} (see .notes)")
        return hit.iloc[0]


def trajectory_frame(trajectories) -> pd.DataFrame:
    """trajectory_id, problem_id, correct from Trajectory objects or a DataFrame."""
    if isinstance(trajectories, pd.DataFrame):
        df = trajectories[["trajectory_id", "problem_id", "correct"]].copy()
    else:
        df = pd.DataFrame([{"trajectory_id": t.id, "problem_id": t.problem_id, "correct": t.correct}
                           for t in trajectories])
    if df.empty:
        raise ValueError("no trajectories given")
    if df["correct"].isna().any():
        n = int(df["correct"].isna().sum())
        raise ValueError(f"{n} trajectories are ungraded (correct is missing); grade them first")
    df["correct"] = df["correct"].astype(bool)
    return df.drop_duplicates("trajectory_id").reset_index(drop=True)


def _check_classes(tf: pd.DataFrame, model: str) -> tuple[int, int]:
    n_c, n_i = int(tf["correct"].sum()), int((~tf["correct"]).sum())
    if n_c == 0 or n_i == 0:
        which = "correct" if n_i == 0 else "incorrect"
        raise InsufficientDataError(
            f"model {model!r}: all {len(tf)} trajectories are {which}; a token–correctness "
            "association needs both correct and incorrect trajectories"
        )
    return n_c, n_i


def _auroc_stat(v: np.ndarray) -> float:
    """AUROC of column 0 with column 1 as the label: `mann_whitney_auroc`'s statistic from ranks
    directly, without its p-value (the cluster bootstraps call this thousands of times)."""
    pos = v[:, 1] == 1
    n1 = int(pos.sum())
    n0 = len(v) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(v[:, 0])
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _resample_weights(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray | None:
    """[n_boot, n] multiplicity of each row in each resample, from exactly the draws
    `cluster_bootstrap` makes (so the CIs are its CIs); None for fewer than two groups."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    k = len(uniq)
    if k < 2:
        return None
    key = (inverse.tobytes(), k, n_boot, seed)  # the same for every key of one token table
    if key not in _WEIGHTS:
        rng = np.random.default_rng(seed)
        picks = np.stack([rng.integers(0, k, k) for _ in range(n_boot)])
        counts = np.bincount((picks + k * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * k)
        _WEIGHTS.clear()  # keep one: tables are built one model at a time
        _WEIGHTS[key] = counts.reshape(n_boot, k)[:, inverse].astype(float)
        _WEIGHTS[key].flags.writeable = False
    return _WEIGHTS[key]


_WEIGHTS: dict[tuple, np.ndarray] = {}


def _weighted_aurocs(w: np.ndarray, scores: np.ndarray, labels: np.ndarray, max_levels: int = 2048) -> np.ndarray:
    """AUROC (ties count half) of every row of `scores` [k, n] under each row of weights `w`
    [n_boot, n], with the same `labels`: [n_boot, k], what `_auroc_stat` gives on the resampled
    rows; NaN for a resample with one class. The rows' levels side by side make one one-hot
    matrix (in blocks of about `max_levels` columns), so a whole token table is a few matrix
    products; every sum is of whole or half weights, exact in any order."""
    pos = labels.astype(bool)
    wpos, wneg = w * pos, w * ~pos
    den = wpos.sum(1) * wneg.sum(1)  # the same for every row: each level's weights sum to the class's
    out = np.full((len(w), len(scores)), np.nan)
    if not (den > 0).any():
        return out
    inverse, n_levels = [], []
    for row in scores:
        _, lv = np.unique(row, return_inverse=True)
        inverse.append(lv)
        n_levels.append(int(lv.max()) + 1)
    start = 0
    while start < len(scores):
        stop, width = start, 0
        while stop < len(scores) and (stop == start or width + n_levels[stop] <= max_levels):
            width += n_levels[stop]
            stop += 1
        offsets = np.cumsum([0] + n_levels[start:stop])
        onehot = np.zeros((scores.shape[1], width))
        cols = np.concatenate([offsets[j] + inverse[start + j] for j in range(stop - start)])
        onehot[np.tile(np.arange(scores.shape[1]), stop - start), cols] = 1.0
        wp, wn = wpos @ onehot, wneg @ onehot  # weight of each class at each level of each row
        run = np.cumsum(wn, axis=1)
        before = np.concatenate([np.zeros((len(w), 1)), run[:, offsets[1:-1] - 1]], axis=1)  # at each row's start
        below = run - np.repeat(before, np.diff(offsets), axis=1) - wn
        num = np.add.reduceat(wp * (below + 0.5 * wn), offsets[:-1], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, start:stop] = np.where(den[:, None] > 0, num / den[:, None], np.nan)
        start = stop
    return out


def _percentile_cis(boots: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """`_percentile_ci` of every column of `boots` [n_boot, k] whose non-finite rows are whole
    rows (a resample with one class): [k, 2]."""
    finite = np.isfinite(boots)
    rows = finite.all(1)
    if not (finite == rows[:, None]).all():  # some column has its own non-finite rows
        return np.array([_percentile_ci(b, alpha) for b in boots.T]).reshape(-1, 2)
    if not rows.any():
        return np.full((boots.shape[1], 2), np.nan)
    return np.quantile(boots[rows], [alpha / 2, 1 - alpha / 2], axis=0).T


def _percentile_ci(boots: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    boots = boots[np.isfinite(boots)]
    if not len(boots):
        return float("nan"), float("nan")
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


_LOOP_CELLS = 4_000_000  # a row whose level table (levels x n) is larger bootstraps by resampling


def _auroc_cis(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[k, 2]: (lo, hi) of ``cluster_bootstrap(column_stack([row, labels]), groups, _auroc_stat)``
    for every row of `scores` [k, n], vectorised over resamples and rows (a row whose level table
    would be large falls back to the loop)."""
    scores, labels, groups = np.asarray(scores, float), np.asarray(labels, float), np.asarray(groups)
    out = np.full((len(scores), 2), np.nan)
    loop = np.array([len(np.unique(row)) * len(row) > _LOOP_CELLS for row in scores], dtype=bool)
    for i in np.flatnonzero(loop):
        out[i] = cluster_bootstrap(np.column_stack([scores[i], labels]), groups, _auroc_stat, n_boot=n_boot,
                                   seed=seed)[1:]
    w = _resample_weights(groups, n_boot, seed)
    if w is not None and not loop.all():
        out[~loop] = _percentile_cis(_weighted_aurocs(w, scores[~loop], labels))
    return out


def _auroc_ci(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_boot: int, seed: int):
    """`_auroc_cis` of one row of scores: (lo, hi)."""
    lo, hi = _auroc_cis(np.asarray(scores, float)[None], labels, groups, n_boot, seed)[0]
    return float(lo), float(hi)


def _mw(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """AUROC and p, with p = 1 when every value is the same (no evidence either way)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    allv = np.concatenate([pos, neg])
    if np.all(allv == allv[0]):
        return 0.5, 1.0
    return mann_whitney_auroc(pos, neg)


def token_table(
    occurrences: pd.DataFrame,
    trajectories,
    *,
    model: str = "",
    lexicon: Sequence[str] = (),
    min_count: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> TokenTable:
    """The ranked token–correctness table (see module docstring). Sorted by q, then |effect|."""
    tf = trajectory_frame(trajectories)
    n_c, n_i = _check_classes(tf, model)
    tids = tf["trajectory_id"].to_numpy()
    y = tf["correct"].to_numpy()
    groups = tf["problem_id"].to_numpy()
    occ = occurrences[occurrences["trajectory_id"].isin(set(tids))].copy()
    occ["prob"] = np.exp(occ["logprob"])
    notes: list[str] = []
    totals = occ.groupby("key").size()
    kinds = occ.groupby("key")["kind"].first()
    tested = sorted(k for k, n in totals.items() if n >= min_count)
    skipped = [k for k, n in totals.items() if n < min_count]
    for w in lexicon:
        n = int(totals.get(w, 0))
        if n < min_count:
            notes.append(f"lexicon word {w!r}: {n} occurrence(s) (< min_count {min_count}), not tested")
    n_lex = len([w for w in lexicon if w in skipped])
    if len(skipped) > n_lex:
        notes.append(f"{len(skipped) - n_lex} other key(s) with < {min_count} occurrences not tested")
    if not tested:
        notes.append("no key reaches min_count; the table is empty")
        return TokenTable(model, pd.DataFrame(columns=TABLE_COLUMNS), notes, n_c, n_i)
    occ = occ[occ["key"].isin(tested)]
    counts = (occ.groupby(["key", "trajectory_id"]).size().unstack(fill_value=0)
              .reindex(index=tested, columns=tids, fill_value=0))
    probs = occ.groupby(["key", "trajectory_id"])["prob"].mean().unstack().reindex(index=tested, columns=tids)
    count_rows, prob_rows = counts.to_numpy(float), probs.to_numpy(float)
    cis = _auroc_cis(count_rows, y, groups, n_boot, seed)
    rows = []
    for key, c, pr, (lo, hi) in zip(tested, count_rows, prob_rows, cis, strict=True):
        lo, hi = float(lo), float(hi)
        has = c > 0
        auc, p = _mw(c[y], c[~y])
        pc, pi = pr[y & has], pr[~y & has]
        pauc, pp = _mw(pc, pi)
        note = []
        if not has[~y].any():
            note.append(f"only in correct trajectories (0 of {n_i} incorrect): probability gap undefined")
        elif not has[y].any():
            note.append(f"only in incorrect trajectories (0 of {n_c} correct): probability gap undefined")
        if not np.isfinite(lo):
            note.append("bootstrap CI undefined (too few problems of both classes)")
        rows.append({
            "model": model, "key": key, "kind": kinds[key], "n_occurrences": int(c.sum()),
            "n_traj_correct": int(has[y].sum()), "n_traj_incorrect": int(has[~y].sum()),
            "rate_correct": c[y].mean(), "rate_incorrect": c[~y].mean(),
            "rate_gap": c[y].mean() - c[~y].mean(),
            "present_correct": has[y].mean(), "present_incorrect": has[~y].mean(),
            "prob_correct": pc.mean() if len(pc) else np.nan,
            "prob_incorrect": pi.mean() if len(pi) else np.nan,
            "prob_gap": (pc.mean() - pi.mean()) if len(pc) and len(pi) else np.nan,
            "auroc": auc, "auroc_lo": lo, "auroc_hi": hi, "rank_biserial": 2 * auc - 1, "p": p,
            "prob_auroc": pauc, "prob_p": pp,
            "direction": "correct" if auc > 0.5 else "incorrect" if auc < 0.5 else "none",
            "note": "; ".join(note),
        })
    t = pd.DataFrame(rows)
    t["q"] = bh_qvalues(t["p"].to_numpy())
    t["prob_q"] = bh_qvalues(t["prob_p"].to_numpy())
    t["_abs"] = (t["auroc"] - 0.5).abs()
    t = t.sort_values(["q", "_abs", "key"], ascending=[True, False, True]).drop(columns="_abs")
    t["rank"] = np.arange(1, len(t) + 1)
    return TokenTable(model, t[TABLE_COLUMNS].reset_index(drop=True), notes, n_c, n_i)


def compare_regimes(
    occurrences: Mapping[str, pd.DataFrame],
    trajectories: Mapping[str, object],
    tables: Mapping[str, TokenTable],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per key tested in every model: each model's AUROC, and the difference of each later
    model from the first (``d_auroc_<m>``) with a cluster-bootstrap CI over shared problems."""
    names = list(tables)
    if len(names) < 2:
        raise ValueError("compare_regimes needs two or more models")
    common = set.intersection(*(set(tables[m].table["key"]) for m in names))
    out = []
    frames = {m: trajectory_frame(trajectories[m]) for m in names}
    counts = {}
    for m in names:
        occ = occurrences[m]
        counts[m] = (occ[occ["key"].isin(common)].groupby(["key", "trajectory_id"]).size().unstack(fill_value=0)
                     .reindex(columns=frames[m]["trajectory_id"], fill_value=0))
    aurocs = {m: tables[m].table.drop_duplicates("key").set_index("key")["auroc"].to_dict() for m in names}
    keys = sorted(common)
    base = names[0]

    def key_counts(m):  # [key, trajectory] counts, zeros for a key the model never says
        f = frames[m]
        return counts[m].reindex(index=keys, fill_value=0).to_numpy(float), f["correct"].to_numpy(float)

    diffs = {}
    c0, y0 = key_counts(base)
    for m in names[1:]:
        c1, y1 = key_counts(m)
        est = [_auroc_stat(np.column_stack([a, y1])) - _auroc_stat(np.column_stack([b, y0]))
               for a, b in zip(c1, c0, strict=True)]
        g = np.concatenate([frames[base]["problem_id"].to_numpy(), frames[m]["problem_id"].to_numpy()])
        w = _resample_weights(g, n_boot, seed)  # the draws cluster_bootstrap over both models' rows makes
        if w is None:
            cis = np.full((len(keys), 2), np.nan)
        else:
            n0 = len(y0)
            cis = _percentile_cis(_weighted_aurocs(w[:, n0:], c1, y1) - _weighted_aurocs(w[:, :n0], c0, y0))
        diffs[m] = (est, cis)
    for i, key in enumerate(keys):
        row = {"key": key}
        for m in names:
            row[f"auroc_{m}"] = float(aurocs[m][key])  # TokenTable.row(key)["auroc"], without a scan per key
        for m in names[1:]:
            est, cis = diffs[m]
            row[f"d_auroc_{m}"], row[f"d_auroc_{m}_lo"], row[f"d_auroc_{m}_hi"] = est[i], *map(float, cis[i])
        out.append(row)
    df = pd.DataFrame(out)
    if not df.empty and len(names) > 1:
        df = df.reindex(df[f"d_auroc_{names[1]}"].abs().sort_values(ascending=False).index)
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
def wait_distribution(positions: pd.DataFrame, trajectories, *, model: str = "", word: str = "wait") -> pd.DataFrame:
    """One row per occurrence of `word`: where it falls (``frac`` of the reasoning) and the
    trajectory's correctness. `positions` is a `traces.Positions` table (or the object)."""
    table = getattr(positions, "table", positions)
    tf = trajectory_frame(trajectories)
    w = table[table["word"] == word.lower()]
    w = w[w["trajectory_id"].isin(set(tf["trajectory_id"]))]
    out = w[["trajectory_id", "problem_id", "token_index", "rel_index", "frac", "n_reasoning_tokens"]].copy()
    out["correct"] = out["trajectory_id"].map(dict(zip(tf["trajectory_id"], tf["correct"], strict=True)))
    out.insert(0, "model", model)
    out.insert(1, "word", word.lower())
    return out.reset_index(drop=True)


def wait_summary(waits: pd.DataFrame, trajectories, *, model: str = "", n_boot: int = 1000,
                 seed: int = 0, word: str = "wait") -> dict:
    """Waits per trajectory vs correctness: means per class with problem-bootstrap CIs, the
    AUROC of the count (correct vs incorrect) with CI and p, and accuracy by count (Wilson)."""
    tf = trajectory_frame(trajectories)
    n_c, n_i = _check_classes(tf, model)
    n = waits.groupby("trajectory_id").size().reindex(tf["trajectory_id"], fill_value=0).to_numpy(float)
    y = tf["correct"].to_numpy()
    g = tf["problem_id"].to_numpy()
    out: dict = {"model": model, "word": word, "n_trajectories": len(tf), "n_correct": n_c,
                 "n_incorrect": n_i, "n_waits": int(n.sum())}
    for name, sel in (("correct", y), ("incorrect", ~y)):
        est, lo, hi = cluster_bootstrap(n[sel], g[sel], np.mean, n_boot=n_boot, seed=seed)
        out[f"waits_per_traj_{name}"] = {"value": est, "lo": lo, "hi": hi}
    auc, p = _mw(n[y], n[~y])
    lo, hi = _auroc_ci(n, y, g, n_boot, seed)
    out["count_auroc"] = {"value": auc, "lo": lo, "hi": hi, "p": p}
    acc = {}
    for label, sel in (("0", n == 0), ("1", n == 1), ("2", n == 2), ("3+", n >= 3)):
        k, m = int(y[sel].sum()), int(sel.sum())
        if m:
            v, lo, hi = wilson_ci(k, m)
            acc[label] = {"value": v, "lo": lo, "hi": hi, "k": k, "n": m}
    out["accuracy_by_count"] = acc
    if out["n_waits"] == 0:
        out["note"] = f"no {word!r} in any trajectory of {model}"
    return out


def to_markdown(df: pd.DataFrame, *, floatfmt: str = ".3g", max_rows: int | None = None) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs `tabulate`, which we do not depend on).
    Missing values print as an em dash."""
    if max_rows is not None:
        df = df.head(max_rows)
    cols = [str(c) for c in df.columns]

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "—"
        if isinstance(v, (float, np.floating)):
            return format(float(v), floatfmt)
        return str(v).replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rec in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in rec) + " |")
    return "\n".join(lines) + "\n"
