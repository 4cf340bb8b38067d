"""Answer transitions in forced-answer curves, and whether "wait" precedes them.

Input: the long curve table of `hooks.answer_curves` (one row per trajectory and prefix).

A *transition* is found between consecutive prefixes of a trajectory when the model's most
likely answer changes (``answer_change``) or the gold answer's probability moves by at least
`delta` (``gold_jump``, either sign; ``d_gold`` keeps the sign). It is located at the last
token read when it is first seen (``token_index = prefix - 1``); prefixes are dense (every
token) within ±k of every wait and every control position, so a transition within k tokens
of either is located exactly. Its *confidence* is the probability of the model's answer
after it (``top_prob`` at the new prefix).

*Alignment*: the fraction of events (waits) followed by a high-confidence transition
(confidence ≥ `min_confidence`) within k tokens, counting the wait token itself
(``0 ≤ token_index − wait ≤ k``), against the same fraction for a matched baseline of random
non-discourse positions from the same trajectories (`traces.control_positions`). CIs come
from a cluster bootstrap over problems.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from waitlens.probes.stats import cluster_bootstrap

TRANSITION_COLUMNS = [
    "trajectory_id", "problem_id", "correct", "prefix", "prev_prefix", "token_index", "kind",
    "old_answer", "new_answer", "confidence", "gold_before", "gold_after", "d_gold", "to_gold",
]


def find_transitions(curves: pd.DataFrame, *, delta: float = 0.3) -> pd.DataFrame:
    """Every transition in every trajectory's curve (see module docstring)."""
    rows = []
    for tid, c in curves.groupby("trajectory_id", sort=False):
        c = c.sort_values("prefix")
        ans, top, gold, pre = (c["top_answer"].to_numpy(), c["top_prob"].to_numpy(),
                               c["gold_prob"].to_numpy(), c["prefix"].to_numpy())
        tog = c["top_is_gold"].to_numpy()
        pid, corr = c["problem_id"].iloc[0], c["correct"].iloc[0]
        for i in range(1, len(c)):
            changed = ans[i] != ans[i - 1]
            jump = abs(gold[i] - gold[i - 1]) >= delta
            if not (changed or jump):
                continue
            kind = "answer_change+gold_jump" if changed and jump else "answer_change" if changed else "gold_jump"
            rows.append((tid, pid, corr, int(pre[i]), int(pre[i - 1]), int(pre[i]) - 1, kind, ans[i - 1],
                         ans[i], float(top[i]), float(gold[i - 1]), float(gold[i]),
                         float(gold[i] - gold[i - 1]), bool(tog[i])))
    return pd.DataFrame(rows, columns=TRANSITION_COLUMNS)


def align_events(
    transitions: pd.DataFrame,
    events: pd.DataFrame,
    *,
    k: int = 8,
    min_confidence: float = 0.5,
    curves: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per event (rows with trajectory_id, problem_id, token_index, word): is a high-confidence
    transition located within [token_index, token_index + k]? Adds ``aligned``, ``lag`` (tokens
    to the first such transition, or -1) and ``to_gold`` (that transition lands on the gold).
    Events of trajectories without a curve (when `curves` is given) are dropped."""
    ev = events.copy()
    if curves is not None:
        ev = ev[ev["trajectory_id"].isin(set(curves["trajectory_id"]))]
    hi = transitions[transitions["confidence"] >= min_confidence]
    by = {t: g["token_index"].to_numpy() for t, g in hi.groupby("trajectory_id")}
    gold_by = {t: g["to_gold"].to_numpy() for t, g in hi.groupby("trajectory_id")}
    aligned, lag, to_gold = [], [], []
    for tid, w in zip(ev["trajectory_id"], ev["token_index"], strict=True):
        loc = by.get(tid, np.array([], dtype=int))
        d = loc - int(w)
        ok = (d >= 0) & (d <= k)
        aligned.append(bool(ok.any()))
        if ok.any():
            j = np.flatnonzero(ok)[np.argmin(d[ok])]
            lag.append(int(d[j]))
            to_gold.append(bool(gold_by[tid][j]))
        else:
            lag.append(-1)
            to_gold.append(False)
    ev["aligned"], ev["lag"], ev["to_gold"] = aligned, lag, to_gold
    return ev.reset_index(drop=True)


def _rate(v: np.ndarray, g: np.ndarray, n_boot: int, seed: int) -> dict:
    if len(v) == 0:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    est, lo, hi = cluster_bootstrap(v.astype(float), g, np.mean, n_boot=n_boot, seed=seed)
    return {"value": est, "lo": lo, "hi": hi, "n": int(len(v))}


def _excess(a: np.ndarray) -> float:
    w, c = a[a[:, 1] == 1, 0], a[a[:, 1] == 0, 0]
    return float(w.mean() - c.mean()) if len(w) and len(c) else float("nan")


def alignment_summary(waits: pd.DataFrame, controls: pd.DataFrame, *, model: str = "",
                      n_boot: int = 1000, seed: int = 0) -> dict:
    """Alignment of waits vs controls (outputs of `align_events`), with problem-bootstrap CIs."""
    out: dict = {"model": model, "n_waits": int(len(waits)), "n_controls": int(len(controls))}
    if len(waits) == 0:
        out["note"] = f"{model}: no waits in trajectories with answer curves; alignment undefined"
        return out
    out["wait"] = _rate(waits["aligned"].to_numpy(), waits["problem_id"].to_numpy(), n_boot, seed)
    out["wait_to_gold"] = _rate((waits["aligned"] & waits["to_gold"]).to_numpy(),
                                waits["problem_id"].to_numpy(), n_boot, seed)
    out["control"] = _rate(controls["aligned"].to_numpy(), controls["problem_id"].to_numpy(), n_boot, seed)
    if len(controls):
        v = np.column_stack([np.r_[waits["aligned"], controls["aligned"]].astype(float),
                             np.r_[np.ones(len(waits)), np.zeros(len(controls))]])
        g = np.r_[waits["problem_id"], controls["problem_id"]]
        est, lo, hi = cluster_bootstrap(v, g, _excess, n_boot=n_boot, seed=seed)
        out["excess"] = {"value": est, "lo": lo, "hi": hi}
    else:
        out["note"] = "no control positions (every reasoning token is a discourse token?)"
    return out


def compare_alignment(events: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]], *, n_boot: int = 1000,
                      seed: int = 0) -> list[dict]:
    """For each model after the first: the difference from the first model in wait alignment
    and in excess over controls, with a bootstrap over problems (shared problems resample
    together). events: model -> (aligned waits, aligned controls)."""
    names = list(events)
    out = []
    for m in names[1:]:
        parts, groups = [], []
        for j, mm in enumerate((names[0], m)):
            w, c = events[mm]
            for is_wait, df in ((1, w), (0, c)):
                parts.append(np.column_stack([df["aligned"].to_numpy(float), np.full(len(df), is_wait),
                                              np.full(len(df), j)]))
                groups.append(df["problem_id"].to_numpy())
        v, g = np.vstack(parts), np.concatenate(groups)

        def d_rate(a: np.ndarray) -> float:
            x = [a[(a[:, 2] == j) & (a[:, 1] == 1), 0] for j in (0, 1)]
            return float(x[1].mean() - x[0].mean()) if len(x[0]) and len(x[1]) else float("nan")

        def d_excess(a: np.ndarray) -> float:
            return _excess(a[a[:, 2] == 1, :2]) - _excess(a[a[:, 2] == 0, :2])

        r = {"model": m, "vs": names[0]}
        for name, fn in (("d_wait_rate", d_rate), ("d_excess", d_excess)):
            est, lo, hi = cluster_bootstrap(v, g, fn, n_boot=n_boot, seed=seed)
            r[name] = {"value": est, "lo": lo, "hi": hi}
        out.append(r)
    return out


def curves_around(curves: pd.DataFrame, events: pd.DataFrame, *, k: int = 8, column: str = "gold_prob",
                  n_boot: int = 300, seed: int = 0) -> pd.DataFrame:
    """`column` of the curve at offsets -k..k from each event, aligned so offset 0 is the prefix
    that has just read the event token; mean with a problem-bootstrap CI per offset."""
    idx = curves.set_index(["trajectory_id", "prefix"])[column]
    rows = []
    for tid, pid, w in zip(events["trajectory_id"], events["problem_id"], events["token_index"], strict=True):
        for off in range(-k, k + 1):
            key = (tid, int(w) + 1 + off)
            if key in idx.index:
                rows.append((pid, off, float(idx.loc[key])))
    df = pd.DataFrame(rows, columns=["problem_id", "offset", column])
    out = []
    for off, g in df.groupby("offset"):
        est, lo, hi = cluster_bootstrap(g[column].to_numpy(), g["problem_id"].to_numpy(), np.mean,
                                        n_boot=n_boot, seed=seed)
        out.append({"offset": int(off), "mean": est, "lo": lo, "hi": hi, "n": len(g)})
    return pd.DataFrame(out, columns=["offset", "mean", "lo", "hi", "n"])


def annotate_truth(waits: pd.DataFrame, truth_waits: Mapping[str, list[dict]]) -> pd.DataFrame:
    """Attach known ground truth to aligned wait events (e.g. the organism's ``truth["waits"]``).

    The n-th wait of a trajectory (by token position) is matched with the n-th truth entry; a
    trajectory whose counts differ is left unannotated (``real_correction`` NA). Adds
    ``after_slip``, ``changed_answer``, ``recheck_correct`` and ``real_correction`` (a wait after
    a slip whose recheck changed the running value to the correct one)."""
    out = waits.sort_values(["trajectory_id", "token_index"]).copy()
    cols = {c: [] for c in ("after_slip", "changed_answer", "recheck_correct", "real_correction")}
    for tid, g in out.groupby("trajectory_id", sort=False):
        tw = truth_waits.get(tid)
        ok = tw is not None and len(tw) == len(g)
        for j in range(len(g)):
            e = tw[j] if ok else None
            vals = (None, None, None, None) if e is None else (
                bool(e["after_slip"]), bool(e["changed_answer"]), bool(e["recheck_correct"]),
                bool(e["after_slip"] and e["changed_answer"] and e["recheck_correct"]))
            for c, v in zip(cols, vals, strict=True):
                cols[c].append(v)
    for c, v in cols.items():
        out[c] = pd.array(v, dtype="boolean")
    return out.reset_index(drop=True)


def truth_alignment(waits: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """With `annotate_truth` columns: how often a wait is aligned *and* a real correction, the
    recall P(aligned | real correction) and precision P(real correction | aligned), with CIs."""
    w = waits[waits["real_correction"].notna()]
    out: dict = {"n_annotated": int(len(w)), "n_unmatched": int(len(waits) - len(w))}
    if w.empty:
        out["note"] = "no wait could be matched to its ground truth"
        return out
    real = w["real_correction"].to_numpy(bool)
    al = w["aligned"].to_numpy(bool)
    g = w["problem_id"].to_numpy()
    out["real_correction"] = _rate(real, g, n_boot, seed)
    out["aligned_and_real"] = _rate(al & real, g, n_boot, seed)
    out["aligned_given_real"] = _rate(al[real], g[real], n_boot, seed)
    out["real_given_aligned"] = _rate(real[al], g[al], n_boot, seed)
    out["aligned_given_changed"] = _rate(al[w["changed_answer"].to_numpy(bool)],
                                         g[w["changed_answer"].to_numpy(bool)], n_boot, seed)
    return out


def compare_rates(values: Mapping[str, tuple[np.ndarray, np.ndarray]], *, n_boot: int = 1000,
                  seed: int = 0) -> list[dict]:
    """Difference of a rate between each later model and the first, bootstrapping problems.
    values: model -> (0/1 values, problem ids)."""
    names = list(values)
    out = []
    for m in names[1:]:
        parts = [np.column_stack([np.asarray(values[mm][0], float), np.full(len(values[mm][0]), j)])
                 for j, mm in enumerate((names[0], m))]
        g = np.concatenate([values[names[0]][1], values[m][1]])

        def diff(a: np.ndarray) -> float:
            x, y = a[a[:, 1] == 0, 0], a[a[:, 1] == 1, 0]
            return float(y.mean() - x.mean()) if len(x) and len(y) else float("nan")

        est, lo, hi = cluster_bootstrap(np.vstack(parts), g, diff, n_boot=n_boot, seed=seed)
        out.append({"model": m, "vs": names[0], "value": est, "lo": lo, "hi": hi})
    return out
