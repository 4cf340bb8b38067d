"""`organism.wait_truth.add_wait_truth` (the truth probes' labels) assigns each trajectory's
wait facts in one vectorised step: it must give the table the row-by-row reference gives."""

import numpy as np
import pandas as pd
import pytest


def _reference(metadata, trajectories):
    """The row-by-row assignment add_wait_truth replaced (one .loc write per trajectory)."""
    from waitlens.experiments.organism.wait_truth import TRUTH_COLUMNS, _wait_facts

    facts = {t.id: _wait_facts(t) for t in trajectories}
    out = metadata.copy()
    for c in TRUTH_COLUMNS:
        out[c] = np.nan
    waits = out[out["word"].astype(str).str.lower() == "wait"]
    for tid, rows in waits.groupby(waits["trajectory_id"].astype(str)):
        f = facts.get(tid)
        if f is None:
            continue
        order = rows.sort_values("token_index").index
        if len(order) != len(f):
            raise ValueError(f"trajectory {tid}: {len(order)} 'wait' positions but {len(f)} 'wait' words")
        out.loc[order, list(TRUTH_COLUMNS)] = np.array(f, dtype=float)
    return out


@pytest.fixture(scope="module")
def organism_positions():
    from waitlens import load_model, sample_organism
    from waitlens.traces import find_positions

    model = load_model("organism:post-large")
    trajs = sample_organism(model, 60, progress=False)
    return trajs, find_positions(model, trajs, ["wait", "so", "therefore"]).table


def test_add_wait_truth_equals_row_by_row_reference(organism_positions):
    from waitlens.experiments.organism.wait_truth import add_wait_truth

    trajs, table = organism_positions
    waits = table["word"] == "wait"
    assert waits.sum() >= 10 and table.loc[waits, "trajectory_id"].duplicated().any()  # several per trajectory
    got = add_wait_truth(table, trajs)
    pd.testing.assert_frame_equal(got, _reference(table, trajs))
    assert got.loc[waits, "after_slip"].notna().any() and got.loc[~waits, "after_slip"].isna().all()
    # rows in another order, under another (unique) index; a trajectory with no ground truth entry
    rng = np.random.default_rng(0)
    shuffled = table.iloc[rng.permutation(len(table))].set_index(pd.Index(rng.permutation(len(table)) * 7 + 3))
    pd.testing.assert_frame_equal(add_wait_truth(shuffled, trajs), _reference(shuffled, trajs))
    missing = {table.loc[waits, "trajectory_id"].iloc[0]}
    fewer = [t for t in trajs if t.id not in missing]
    pd.testing.assert_frame_equal(add_wait_truth(table, fewer), _reference(table, fewer))


def test_add_wait_truth_refuses_a_count_mismatch(organism_positions):
    from waitlens.experiments.organism.wait_truth import add_wait_truth

    trajs, table = organism_positions
    extra = table[table["word"] == "wait"].iloc[:1].assign(token_index=10_000)
    with pytest.raises(ValueError, match="'wait' positions but"):
        add_wait_truth(pd.concat([table, extra], ignore_index=True), trajs)
