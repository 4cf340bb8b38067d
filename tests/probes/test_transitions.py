"""Answer transitions and wait alignment on synthetic curves with planted transitions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from waitlens.probes.transitions import (
    align_events,
    alignment_summary,
    compare_alignment,
    curves_around,
    find_transitions,
)


def _curve(tid: str, pid: str, n: int, switch: int | None, conf: float = 0.9) -> list[dict]:
    """A curve over prefixes 10..10+n whose top answer switches from '3' to '5' (gold) at `switch`."""
    rows = []
    for p in range(10, 10 + n + 1):
        after = switch is not None and p >= switch
        rows.append({"trajectory_id": tid, "problem_id": pid, "correct": True, "gold": "5", "prefix": p,
                     "gold_prob": 0.9 if after else 0.05, "top_answer": "5" if after else "3",
                     "top_prob": conf if after else 0.8, "top_is_gold": after})
    return rows


def _planted(n: int = 40, lag: int = 3, aligned_every: int = 1, seed: int = 0):
    """Each trajectory has one wait at token 20; its transition follows it by `lag` tokens for
    every `aligned_every`-th trajectory, else happens far from it (token 40)."""
    rng = np.random.default_rng(seed)
    curves, waits, controls = [], [], []
    for i in range(n):
        tid, pid = f"t{i}", f"p{i // 2}"
        at = 20 + lag + 1 if i % aligned_every == 0 else 41
        curves += _curve(tid, pid, 50, at)
        waits.append({"trajectory_id": tid, "problem_id": pid, "token_index": 20, "word": "wait"})
        controls.append({"trajectory_id": tid, "problem_id": pid, "token_index": int(rng.integers(45, 55)),
                         "word": "<control>"})
    return pd.DataFrame(curves), pd.DataFrame(waits), pd.DataFrame(controls)


def test_find_transitions():
    curves = pd.DataFrame(_curve("t", "p", 20, 15) + _curve("u", "q", 20, None))
    tr = find_transitions(curves, delta=0.3)
    assert len(tr) == 1
    r = tr.iloc[0]
    assert r["prefix"] == 15 and r["token_index"] == 14 and r["kind"] == "answer_change+gold_jump"
    assert r["old_answer"] == "3" and r["new_answer"] == "5" and r["to_gold"] and r["confidence"] == 0.9


def test_alignment_separates_planted_from_baseline():
    curves, waits, controls = _planted(lag=3)
    tr = find_transitions(curves)
    w = align_events(tr, waits, k=8, curves=curves)
    c = align_events(tr, controls, k=8, curves=curves)
    assert w["aligned"].all() and (w["lag"] == 3).all() and not c["aligned"].any()
    s = alignment_summary(w, c, model="m", n_boot=200)
    assert s["wait"]["value"] == 1.0 and s["control"]["value"] == 0.0 and s["excess"]["lo"] > 0.9
    # a transition beyond k tokens is not aligned; a low-confidence one is not counted
    assert not align_events(tr, waits, k=2)["aligned"].any()
    assert not align_events(tr, waits, k=8, min_confidence=0.95)["aligned"].any()


def test_compare_alignment_between_models():
    a = _planted(aligned_every=1)
    b = _planted(aligned_every=3)
    ev = {}
    for name, (curves, waits, controls) in (("post", a), ("sft", b)):
        tr = find_transitions(curves)
        ev[name] = (align_events(tr, waits, k=8), align_events(tr, controls, k=8))
    (cmp,) = compare_alignment(ev, n_boot=200)
    assert cmp["model"] == "sft" and cmp["d_wait_rate"]["value"] < -0.5 and cmp["d_wait_rate"]["hi"] < 0


def test_no_waits_is_a_message_and_curves_around():
    curves, waits, controls = _planted(n=6)
    tr = find_transitions(curves)
    s = alignment_summary(waits.iloc[:0].assign(aligned=[], to_gold=[]), controls.assign(aligned=False), model="m")
    assert "no waits" in s["note"]
    around = curves_around(curves, waits, k=5, n_boot=50)
    assert list(around["offset"]) == list(range(-5, 6))
    assert around.loc[around["offset"] == -5, "mean"].iloc[0] == pytest.approx(0.05)
    assert around.loc[around["offset"] == 5, "mean"].iloc[0] == pytest.approx(0.9)
    assert len(tr) == 6


def test_truth_annotation_and_comparison():
    from waitlens.probes.transitions import annotate_truth, compare_rates, truth_alignment

    curves, waits, controls = _planted(n=20)
    tr = find_transitions(curves)
    w = align_events(tr, waits, k=8)
    truth = {f"t{i}": [{"after_slip": i % 2 == 0, "changed_answer": True, "recheck_correct": True}]
             for i in range(19)}  # t19 has no truth: unannotated, not an error
    a = annotate_truth(w, truth)
    assert a["real_correction"].isna().sum() == 1 and a["real_correction"].sum() == 10
    s = truth_alignment(a, n_boot=100)
    assert s["aligned_given_real"]["value"] == 1.0 and s["n_unmatched"] == 1
    assert s["aligned_and_real"]["value"] == pytest.approx(10 / 19)
    (d,) = compare_rates({"a": (np.ones(20), np.arange(20) // 2), "b": (np.zeros(20), np.arange(20) // 2)},
                         n_boot=100)
    assert d["value"] == -1.0 and d["hi"] == -1.0
