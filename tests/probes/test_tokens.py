"""Token–correctness association: planted signals are recovered; edge cases give messages."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import tiny_trajectory
from waitlens.hooks.logprobs import token_logprobs, token_occurrences
from waitlens.probes.tokens import (
    compare_regimes,
    to_markdown,
    token_table,
    wait_distribution,
    wait_summary,
)
from waitlens.traces import Trajectory, find_positions


def _synthetic(n_problems: int = 30, seed: int = 0):
    """Occurrences where 'wait' is only in correct trajectories, 'so' is everywhere, 'hmm' rare."""
    rng = np.random.default_rng(seed)
    trajs, occ = [], []
    for p in range(n_problems):
        for s in range(2):
            correct = bool(s == 0)
            tid = f"p{p}-{s}"
            trajs.append({"trajectory_id": tid, "problem_id": f"p{p}", "correct": correct})
            words = ["so"] * int(rng.integers(1, 4)) + (["wait"] * int(rng.integers(1, 3)) if correct else [])
            if p < 2:
                words.append("hmm")
            for i, w in enumerate(words):
                occ.append({"trajectory_id": tid, "problem_id": f"p{p}", "correct": correct, "key": w,
                            "kind": "word", "token_index": i, "n_tokens": 1,
                            "logprob": float(np.log(rng.uniform(0.2, 0.9))), "rel_pos": i / 10})
    return pd.DataFrame(occ), pd.DataFrame(trajs)


def test_planted_association_ranks_first():
    occ, trajs = _synthetic()
    tt = token_table(occ, trajs, model="m", lexicon=["wait", "so", "hmm", "check"], n_boot=200)
    top = tt.table.iloc[0]
    assert top["key"] == "wait" and top["q"] < 1e-6 and top["auroc"] == 1.0 and top["direction"] == "correct"
    assert top["auroc_lo"] > 0.9
    assert "only in correct" in top["note"]
    assert np.isnan(top["prob_incorrect"])  # undefined, and said so in the note
    so = tt.row("so")
    assert so["q"] > 0.05 and np.isfinite(so[["auroc", "auroc_lo", "auroc_hi", "p", "q"]].astype(float)).all()
    # rare and absent lexicon words are filtered with a message, not NaN rows
    assert "hmm" not in set(tt.table["key"]) and "check" not in set(tt.table["key"])
    assert any("'hmm'" in n and "not tested" in n for n in tt.notes)
    assert any("'check': 0 occurrence" in n for n in tt.notes)
    num = tt.table[["auroc", "auroc_lo", "auroc_hi", "rank_biserial", "p", "q"]].to_numpy(float)
    assert np.isfinite(num).all()
    md = to_markdown(tt.table)
    assert md.startswith("| model | rank | key") and "nan" not in md


def test_single_class_is_an_error():
    occ, trajs = _synthetic()
    trajs["correct"] = True
    with pytest.raises(ValueError, match="all 60 trajectories are correct"):
        token_table(occ, trajs, model="m")


def test_compare_regimes_difference():
    occ_a, tr = _synthetic(seed=0)
    occ_b = occ_a[occ_a["key"] != "wait"].copy()
    # in model b, wait appears equally in both classes
    extra = tr.assign(key="wait", kind="word", token_index=0, n_tokens=1, logprob=-1.0, rel_pos=0.0)
    occ_b = pd.concat([occ_b, extra[occ_b.columns]], ignore_index=True)
    tabs = {m: token_table(o, tr, model=m, n_boot=100) for m, o in (("a", occ_a), ("b", occ_b))}
    cmp = compare_regimes({"a": occ_a, "b": occ_b}, {"a": tr, "b": tr}, tabs, n_boot=100)
    w = cmp[cmp["key"] == "wait"].iloc[0]
    assert w["auroc_a"] == 1.0 and w["auroc_b"] == 0.5
    assert w["d_auroc_b"] == pytest.approx(-0.5) and w["d_auroc_b_hi"] < 0


def test_logprobs_and_occurrences_on_tiny(tiny_model):
    trajs = [tiny_trajectory(i, correct=i % 2 == 0) for i in range(4)]
    tl = token_logprobs(tiny_model, trajs[0])
    rd = tiny_model.render(trajs[0])
    assert len(tl) == rd.reasoning_tokens[1] - rd.reasoning_tokens[0]
    assert (tl["logprob"] <= 0).all() and list(tl["token_id"]) == rd.input_ids[slice(*rd.reasoning_tokens)]
    occ = token_occurrences(tiny_model, trajs, ["wait", "so", "therefore"])
    assert set(occ[occ["kind"] == "word"]["key"]) == {"wait", "so", "therefore"}
    assert "wait" not in set(occ[occ["kind"] == "token"]["key"])  # merged into the word
    assert len(occ) == 4 * len(tl)
    # empty reasoning: no rows, no error
    assert token_occurrences(tiny_model, [Trajectory("e", "pe", "Q 1 ;", "", "1", "1", True)]).empty


def test_counted_occurrences_are_the_forward_passes_rows_without_logprobs(tiny_model):
    """`count_occurrences` (no forward pass) gives `token_occurrences`' rows, values and dtypes,
    with logprob NaN; a word's tokens are one row; an ungraded (correct None) trajectory keeps
    None; a trajectory with no reasoning gives no rows."""
    from waitlens.experiments.analyses.tokens import count_occurrences

    trajs = [tiny_trajectory(i, correct=i % 2 == 0) for i in range(3)] + [
        Trajectory("u", "pu", "Q 3 + 4 - 2 ;", "3 + 4 = 7 so 7 - 2 = 5", "5", "5", None),
        Trajectory("e", "pe", "Q 1 ;", "", "1", "1", True)]
    lex = ["wait", "so", "therefore", "3 + 4"]  # a two-token word
    full = token_occurrences(tiny_model, trajs, lex)
    counted, positions = count_occurrences(tiny_model, trajs, lex)
    assert (full["logprob"] < 0).all() and counted["logprob"].isna().all()
    pd.testing.assert_frame_equal(counted.drop(columns="logprob"), full.drop(columns="logprob"), check_exact=True)
    assert (counted.dtypes == full.dtypes).all()
    assert (counted.loc[counted["key"] == "3 + 4", "n_tokens"] == 3).all() and "e" not in set(counted["trajectory_id"])
    assert counted.loc[counted["trajectory_id"] == "u", "correct"].isna().all()
    assert len(positions) == (counted["kind"] == "word").sum()
    for traj in trajs[:4]:  # every reasoning token is in exactly one row, rows in token order
        t0, t1 = tiny_model.render(traj).reasoning_tokens
        rows = counted[counted["trajectory_id"] == traj.id]
        covered = [i for a, k in zip(rows["token_index"], rows["n_tokens"], strict=True) for i in range(a, a + k)]
        assert sorted(covered) == list(range(t0, t1)) and list(rows["kind"]).index("token") == rows["kind"].eq("word").sum()
        assert np.allclose(rows["rel_pos"], (rows["token_index"] - t0) / (t1 - t0), rtol=0, atol=0)


def test_wait_distribution_and_summary(tiny_model):
    trajs = [tiny_trajectory(i, correct=i % 2 == 0,
                             reasoning=None if i % 2 == 0 else "3 + 4 = 7 ; 7 - 2 = 5") for i in range(6)]
    pos = find_positions(tiny_model, trajs, ["wait"])
    wd = wait_distribution(pos, trajs, model="tiny")
    assert len(wd) == 3 and wd["correct"].all() and wd["frac"].between(0, 1).all()
    s = wait_summary(wd, trajs, model="tiny", n_boot=100)
    assert s["count_auroc"]["value"] == 1.0
    assert s["waits_per_traj_incorrect"]["value"] == 0.0
    assert s["accuracy_by_count"]["0"]["value"] == 0.0



def test_cli_tokens_and_answers(tiny_qwen_dir, tmp_path):
    from waitlens.experiments.cli import main
    from waitlens.traces import save_trajectories

    trajs = [tiny_trajectory(i, correct=i % 2 == 0, reasoning=None if i % 3 else "3 + 4 = 7 ; 7 - 2 = 5 so 5")
             for i in range(8)]
    f = save_trajectories(trajs, tmp_path / "t.jsonl")
    out = tmp_path / "out"
    assert main(["tokens", "--model", str(tiny_qwen_dir), "--trajectories", str(f), "--out", str(out),
                 "--n-boot", "20", "--min-count", "2"]) == 0
    for name in ("token_table.csv", "token_table.md", "wait_distribution.csv", "token_top.png", "wait_position.png"):
        assert (out / name).is_file(), name
    assert "nan" not in (out / "token_table.md").read_text().lower()
    assert main(["answers", "--model", str(tiny_qwen_dir), "--trajectories", str(f), "--out", str(out),
                 "--n-boot", "20", "-k", "2", "--every", "3"]) == 0
    for name in ("answer_curves.csv", "transitions.csv", "alignment.json", "alignment.png"):
        assert (out / name).is_file(), name
    # a format without a forcing suffix: a clear CLI error, exit code 2
    assert main(["answers", "--model", str(tiny_qwen_dir), "--trajectories", str(f), "--out", str(out),
                 "--format", "plain", "--suffix", ""]) == 2


def test_cli_refuses_a_model_given_twice(tiny_qwen_dir, tmp_path, capsys):
    from waitlens.experiments.cli import main
    from waitlens.traces import save_trajectories

    f = save_trajectories([tiny_trajectory(i, correct=i % 2 == 0) for i in range(4)], tmp_path / "t.jsonl")
    m = str(tiny_qwen_dir)
    assert main(["tokens", "--model", m, "--model", m, "--trajectories", str(f), "--trajectories", str(f),
                 "--out", str(tmp_path / "o")]) == 2
    assert "is given twice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
