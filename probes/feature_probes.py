"""Probes on named metadata features instead of states: the position baseline generalized.

A feature probe is the same cross-validated logistic regression as a state probe, with the
same problem-grouped folds, fitted on columns of the positions metadata. Two uses:

- baselines: what position and length alone predict (``frac``, ``rel_index``,
  ``n_reasoning_tokens``), the control every state probe is reported against;
- ceilings: where a task has ground truth (the organism), columns that say what a model
  *could* represent at the position — "the step just written was wrong" — give the AUROC a
  state probe would reach if the states encoded exactly that. A state probe at chance next
  to a high ceiling says the model does not represent it; next to a low ceiling it says the
  question cannot be answered from that feature on this data, whatever the model knows.

    feature_probes(meta, {"position": POSITION_FEATURES,
                          "position + slip": [*POSITION_FEATURES, "after_slip"]}, word="wait")

Each row: the out-of-fold AUROC with a problem-bootstrap CI, and its paired difference from
the reference feature set (default ``"position"``, fitted whether asked for or not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from waitlens.probes.folds import check_labels, make_folds
from waitlens.probes.linear import DEFAULT_CS, POSITION_FEATURES, cross_validate
from waitlens.probes.metrics import auroc_ci, paired_auroc_difference
from waitlens.probes.probe_data import CONTROL, words_list

FEATURE_COLUMNS = ["word", "features", "columns", "n_positions", "n_problems", "auroc", "auroc_lo", "auroc_hi",
                   "margin_vs_reference", "margin_lo", "margin_hi"]


def feature_probes(metadata: pd.DataFrame, features: Mapping[str, Sequence[str]], *, word: str = "wait",
                   reference: str = "position", n_folds: int = 5, n_inner: int = 3, seed: int = 0,
                   n_boot: int = 1000, Cs: Sequence[float] = DEFAULT_CS) -> pd.DataFrame:
    """Cross-validated AUROC of a logistic regression on each named set of metadata columns.

    Rows: the graded positions of `word` ('all': every discourse word) whose feature values
    are all present (a row missing any requested column is left out of every feature set, so
    all sets — and the margins between them — are computed on the same rows). Folds come
    from `probes.make_folds` with the same seed as `fit_layer_probes`, so on the same rows they
    are the state probe's folds. Boolean columns (also "True"/"False" strings, as a CSV round
    trip leaves them) count as 0/1; any other value that is not a number is an error.
    """
    if not features:
        raise ValueError("no feature sets given")
    sets = {reference: list(POSITION_FEATURES)} if reference == "position" else {}
    sets.update({k: list(v) for k, v in features.items()})
    if reference not in sets:
        raise ValueError(f"reference {reference!r} is not one of the feature sets {sorted(sets)}")
    needed = sorted({c for cols in sets.values() for c in cols} | {"word", "correct", "problem_id"})
    missing = [c for c in needed if c not in metadata.columns]
    if missing:
        raise ValueError(f"metadata lacks column(s) {missing}; it has {sorted(metadata.columns)}")
    wl = words_list(word)
    wcol = metadata["word"].astype(str).str.lower()
    is_word = (wcol != CONTROL) if wl is None else wcol.isin(wl)
    if not is_word.any():
        raise ValueError(f"no positions of word {word!r}; the metadata holds words {sorted(set(wcol) - {CONTROL})}")
    cols = sorted({c for v in sets.values() for c in v})
    values = pd.DataFrame({c: _numeric(metadata[c], c) for c in cols}, index=metadata.index)
    keep = is_word & metadata["correct"].notna() & values.notna().all(axis=1)
    m = metadata[keep].reset_index(drop=True)
    v = values[keep].reset_index(drop=True)
    y = m["correct"].astype(bool).to_numpy().astype(int)
    groups = m["problem_id"].astype(str).to_numpy()
    check_labels(y, groups, n_folds, what=f"'{word}' positions with every feature")
    folds = make_folds(y, groups, n_folds, n_inner, seed)
    oof = {name: cross_validate(np.array(v[c], dtype=np.float32)[:, None, :], [y], folds, Cs=Cs).oof[0, :, 0]
           for name, c in sets.items()}
    rows = []
    for name, c in sets.items():
        a, lo, hi = auroc_ci(y, oof[name], groups, n_boot=n_boot, seed=seed)
        d = paired_auroc_difference(y, oof[name], groups, y, oof[reference], groups, n_boot=n_boot, seed=seed) \
            if name != reference else (0.0, 0.0, 0.0)
        rows.append({"word": word, "features": name, "columns": " ".join(c), "n_positions": len(y),
                     "n_problems": len(np.unique(groups)), "auroc": a, "auroc_lo": lo, "auroc_hi": hi,
                     "margin_vs_reference": d[0], "margin_lo": d[1], "margin_hi": d[2]})
    return pd.DataFrame(rows, columns=FEATURE_COLUMNS)


def _numeric(column: pd.Series, name: str) -> pd.Series:
    """A feature column as floats: NaN stays missing, anything else must be a number or a bool."""
    lowered = column.map(lambda v: v.strip().lower() if isinstance(v, str) else v)
    values = pd.to_numeric(lowered.replace({"true": 1, "false": 0}), errors="coerce").astype(float)
    bad = values.isna() & column.notna()
    if bad.any():
        examples = sorted({repr(v) for v in column[bad]})[:3]
        raise ValueError(f"feature column {name!r} holds values that are not numbers or booleans: "
                         f"{', '.join(examples)}")
    return values
