"""Ground truth at each "wait" position: what a model *could* know there.

For every "wait" row of a positions/metadata table, from the organism's `truth`:

- ``after_slip``: the step just written was a slip (its value wrong given the running value
  before it) — what a perfect *local* slip detector would represent at the wait;
- ``value_wrong``: the running value just written differs from the true running value (a slip
  here or an uncaught one earlier) — what a model that tracks whether its current answer is
  right would represent (Zhang et al.'s "intermediate answer correctness").

`probes.feature_probes` turns these into ceilings for the state probes: the AUROC a probe at
"wait" would reach if the states encoded exactly that feature.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from waitlens.traces.trajectory import Trajectory

TRUTH_COLUMNS = ("after_slip", "value_wrong")


def _wait_facts(t: Trajectory) -> list[tuple[float, float]]:
    """(after_slip, value_wrong) for each "wait" word of the reasoning, in text order (NaN
    where the ground truth has no entry for it, e.g. in a malformed text)."""
    truth = t.extra.get("truth") or {}
    words = t.reasoning.split()
    by_word = {w["word"]: w for w in truth.get("waits", [])}
    steps = truth.get("steps", [])
    out = []
    for i, w in enumerate(words):
        if w != "wait":
            continue
        rec = by_word.get(i)
        before = [s for s in steps if s["word"] < i]
        if rec is None or not before:
            out.append((np.nan, np.nan))
            continue
        last = before[-1]
        out.append((float(rec["after_slip"]), float(last["after"] != last["true"])))
    return out


def add_wait_truth(metadata: pd.DataFrame, trajectories: list[Trajectory]) -> pd.DataFrame:
    """A copy of `metadata` with `after_slip` and `value_wrong` on its "wait" rows (NaN on
    every other row, and on a wait the ground truth does not cover).

    The k-th "wait" row of a trajectory (by token index) is its k-th "wait" word.
    """
    missing = [t.id for t in trajectories if "truth" not in t.extra]
    if missing:
        raise ValueError(f"{len(missing)} trajectories have no organism ground truth ('truth'), e.g. {missing[:3]}")
    facts = {t.id: _wait_facts(t) for t in trajectories}
    out = metadata.copy()
    for c in TRUTH_COLUMNS:
        out[c] = np.nan
    is_wait = (out["word"].astype(str).str.lower() == "wait").to_numpy()
    tids = np.asarray(out["trajectory_id"].astype(str).to_numpy()[is_wait], dtype=str)
    if not len(tids):
        return out
    # the wait rows sorted by trajectory, then token index (ties in row order): each
    # trajectory's rows are consecutive, its k-th row gets its k-th fact, in one assignment
    rows = np.flatnonzero(is_wait)
    order = np.lexsort((rows, out["token_index"].to_numpy()[rows], tids))
    rows, tids = rows[order], tids[order]
    start = np.r_[True, tids[1:] != tids[:-1]]
    first = np.flatnonzero(start)
    counts = np.diff(np.r_[first, len(tids)])
    values = np.full((len(tids), len(TRUTH_COLUMNS)), np.nan)
    keep = np.zeros(len(tids), dtype=bool)
    for tid, a, n in zip(tids[first], first, counts, strict=True):
        f = facts.get(tid)
        if f is None:
            continue
        if n != len(f):
            raise ValueError(f"trajectory {tid}: {n} 'wait' positions but {len(f)} 'wait' words")
        if n:
            values[a:a + n] = f
            keep[a:a + n] = True
    cols = [out.columns.get_loc(c) for c in TRUTH_COLUMNS]
    out.iloc[rows[keep], cols] = values[keep]
    return out
