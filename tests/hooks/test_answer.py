"""Forced-answer probabilities: KV-cache branching equals recompute; suffix tokenization;
clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.conftest import tiny_trajectory
from waitlens.hooks.answer import (
    NoForcingSuffixError,
    answer_curves,
    answer_probabilities,
    choose_prefixes,
    suffix_tokens,
)
from waitlens.traces import Trajectory, find_positions


def _agree(model, traj, prefixes, **kw):
    a = answer_probabilities(model, traj, prefixes, **kw)
    b = answer_probabilities(model, traj, prefixes, method="naive", **kw)
    np.testing.assert_allclose(a["gold_logprob"], b["gold_logprob"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(a["top_logprob"], b["top_logprob"], atol=1e-4, rtol=0)
    assert list(a["top_answer"]) == list(b["top_answer"])
    return a


def test_branching_equals_recompute_tiny(tiny_model):
    traj = tiny_trajectory()
    a = _agree(tiny_model, traj, None, max_answer_tokens=3)
    rd = tiny_model.render(traj, include_answer=False)
    assert list(a["prefix"]) == list(range(rd.reasoning_tokens[0], rd.reasoning_tokens[1] + 1))
    assert (a["gold_prob"] <= 1).all() and (a["gold_logprob"] <= 0).all() and (a["top_logprob"] <= 0).all()
    # the greedy answer's probability is the highest first-token probability: >= gold's for 1 token
    assert (a["top_logprob"] >= a["gold_logprob"] - 1e-6).all() or (a["top_answer"].str.len() > 0).all()


def test_branching_multi_token_answer_and_close(tiny_model):
    traj = tiny_trajectory(reasoning="3 + 4 = 7 wait 7 - 2 = 5 so 5")
    _agree(tiny_model, traj, [9, 12, 15], answer="7 5 5", include_close=True, max_answer_tokens=4)
    # a suffix with no token of its own (whitespace only): the prefix's last token is re-fed
    assert suffix_tokens(tiny_model, "5", " ").forcing == []
    _agree(tiny_model, traj, [9, 12, 15], suffix=" ", max_answer_tokens=2)


def test_suffix_tokens_match_rendering(tiny_model):
    traj = tiny_trajectory()
    full = tiny_model.render(traj)
    t1 = full.reasoning_tokens[1]
    st = suffix_tokens(tiny_model, traj.answer)
    assert full.input_ids == full.input_ids[:t1] + st.forcing + st.answer + st.close
    assert full.input_ids[slice(*full.answer_tokens)] == st.answer


@pytest.mark.slow
def test_branching_equals_recompute_smollm2(smollm2):
    reasoning = ("Let me add the numbers step by step. 17 plus 25 is 42. Wait, let me check that again: "
                 "17 plus 25, seven plus five is twelve, carry the one, so 42. Hmm, then 42 minus 9 is 33.")
    traj = Trajectory(id="s", problem_id="p", prompt="What is 17 + 25 - 9?", reasoning=reasoning,
                      answer="33", gold="33", correct=True)
    rd = smollm2.render(traj, include_answer=False)
    t0, t1 = rd.reasoning_tokens
    assert 40 <= t1 - t0 <= 80
    prefixes = list(np.linspace(t0 + 1, t1, 5).astype(int))
    a = _agree(smollm2, traj, prefixes, max_answer_tokens=2)
    assert (a["gold_prob"] <= 1).all()
    # the suffix+answer tokenized alone equals the rendering here (no merge across the boundary)
    full = smollm2.render(traj)
    st = suffix_tokens(smollm2, traj.answer)
    assert full.input_ids[: full.reasoning_tokens[1]] + st.forcing + st.answer + st.close == full.input_ids


def test_no_forcing_suffix_is_a_clear_error(tiny_model):
    fmt = dataclasses.replace(tiny_model.format, think_close="", answer_prefix="", name="bare")
    bare = dataclasses.replace(tiny_model, format=fmt)
    with pytest.raises(NoForcingSuffixError, match="no answer-forcing suffix.*format="):
        answer_probabilities(bare, tiny_trajectory(), [9])
    # an explicit suffix works
    df = answer_probabilities(bare, tiny_trajectory(), [9], suffix=" A ")
    assert np.isfinite(df["gold_logprob"]).all()


def test_prefix_outside_reasoning_rejected(tiny_model):
    with pytest.raises(ValueError, match="outside its reasoning"):
        answer_probabilities(tiny_model, tiny_trajectory(), [1])


def test_choose_prefixes_and_no_discourse(tiny_model):
    traj = tiny_trajectory()
    rd = tiny_model.render(traj, include_answer=False)
    t0, t1 = rd.reasoning_tokens
    pos = find_positions(tiny_model, [traj], ["wait"]).table
    w = int(pos["token_index"].iloc[0])
    p = choose_prefixes(rd, [w], k=2)
    assert p == list(range(w - 1, w + 4))
    assert choose_prefixes(rd, [], every=5)[-1] == t1 and choose_prefixes(rd, [], every=5)[0] == t0
    # a trajectory with no discourse token still gets a curve (every-n prefixes)
    plain = tiny_trajectory(1, reasoning="3 + 4 = 7 ; 7 - 2 = 5")
    with pytest.warns(UserWarning, match="no lexicon word"):
        assert find_positions(tiny_model, [plain], ["wait"]).table.empty
    curves = answer_curves(tiny_model, [plain], {}, k=2, every=3)
    assert len(curves) >= 3 and curves["trajectory_id"].eq("t1").all()


def _organism_dir(regime: str):
    from pathlib import Path

    d = Path(__file__).resolve().parents[2] / "experiments" / "organism" / "weights" / regime
    return d if (d / "config.json").is_file() else None


@pytest.mark.parametrize("regime", ["post-large", "sft-1k"])
def test_branching_equals_recompute_organism(regime):
    assert _organism_dir(regime) is not None, f"organism weights for {regime} are missing from the repo"
    from waitlens.experiments.organism.task import TRACE_CORPUS, make_trace, random_problem
    from waitlens.hooks import load_model

    model = load_model(f"organism:{regime}", device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    for i in range(3):
        prob = random_problem(rng, split="eval")
        reasoning, answer, _ = make_trace(prob, TRACE_CORPUS, rng)
        traj = Trajectory(id=f"o{i}", problem_id=prob.id, prompt=prob.prompt, reasoning=reasoning,
                          answer=answer, gold=prob.gold, correct=answer == prob.gold)
        a = _agree(model, traj, None)
        assert (a["gold_prob"] <= 1 + 1e-6).all()
        st = suffix_tokens(model, traj.answer)
        full = model.render(traj)
        assert full.input_ids[: full.reasoning_tokens[1]] + st.forcing + st.answer + st.close == full.input_ids
