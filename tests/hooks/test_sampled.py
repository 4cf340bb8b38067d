"""Sampled (greedy) corrections after a wait that follows a slip, on the shipped organism."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from waitlens import hooks
from waitlens.experiments.organism.metrics import sampled_corrections
from waitlens.hooks.generate import continue_texts
from waitlens.hooks.sampled import SAMPLED_COLUMNS


@pytest.fixture(scope="module")
def sft():
    return hooks.load_model("organism:sft-1k")


@pytest.fixture(scope="module")
def post():
    return hooks.load_model("organism:post-large")


@pytest.fixture(scope="module")
def slip_trajs(sft):
    from waitlens.experiments.organism.sample import sample

    trajs = sample(sft, 60, seed=1, progress=False)
    chosen = [t for t in trajs if any(w["after_slip"] for w in t.extra["truth"]["waits"])][:4]
    assert chosen, "the sample should hold a wait after a slip"
    return chosen


def test_self_patch_gives_the_clean_continuation(sft, slip_trajs):
    df = sampled_corrections(sft, sft, slip_trajs, rel_positions=(-2, -1, 0))
    assert set(df["control"]) == {"clean", "none", "random"}
    clean = df[df["control"] == "clean"].set_index(["trajectory_id", "wait_word"])["continuation"]
    merged = df.join(clean.rename("clean_text"), on=["trajectory_id", "wait_word"])
    assert (merged["continuation"] == merged["clean_text"]).all()
    n_waits = sum(w["after_slip"] for t in slip_trajs for w in t.extra["truth"]["waits"])
    assert len(clean) == n_waits
    # every wait has all 4 layers x 3 rel_pos patched cells
    assert (df[df["control"] == "none"].groupby(["trajectory_id", "wait_word"]).size() == 12).all()


def test_columns_and_clean_matches_hf_generate(sft, post, slip_trajs):
    df = sampled_corrections(post, sft, slip_trajs[:2], layers=[0, 3], rel_positions=(-1, 0), max_new_tokens=6)
    assert list(df.columns) == SAMPLED_COLUMNS
    assert set(df["direction"]) == {"organism:sft-1k<-organism:post-large"}
    assert set(df["corrected"]) <= {0, 1}
    assert set(df["layer"].dropna()) <= {0, 3} and set(df["rel_pos"].dropna()) <= {-1, 0}
    # the clean continuation is HF's own greedy decoding of the prefix ending at the wait
    row = df[df["control"] == "clean"].iloc[0]
    traj = next(t for t in slip_trajs if t.id == row["trajectory_id"])
    rd = sft.render(dataclasses.replace(traj, answer=traj.gold))
    words = traj.reasoning.split()
    r0 = rd.reasoning_chars[0]
    wait_char = r0 + len(" ".join(words[: row["wait_word"] + 1]))
    head = rd.text[:wait_char]
    (hf_text,) = continue_texts(sft, [head], temperature=0, max_new_tokens=6)
    assert hf_text == row["continuation"]


def test_no_wait_after_a_slip_raises(sft, post, slip_trajs):
    from waitlens.experiments.organism.sample import sample

    none = [t for t in sample(sft, 60, seed=1, progress=False)
            if not any(w["after_slip"] for w in t.extra["truth"]["waits"])][:5]
    with pytest.raises(ValueError, match="wait after a slip"):
        sampled_corrections(post, sft, none)
    stripped = [dataclasses.replace(t, extra={}) for t in slip_trajs]
    with pytest.warns(UserWarning, match="without organism truth"), pytest.raises(ValueError):
        sampled_corrections(post, sft, stripped)


def test_summarize_sampled_rates_per_cell():
    import pandas as pd

    from waitlens.probes.patching import SAMPLED_EFFECT_COLUMNS, summarize_sampled

    t = pd.DataFrame({
        "direction": ["a<-b"] * 6, "problem_id": ["p0", "p1", "p0", "p1", "p0", "p1"],
        "control": ["clean", "clean", "none", "none", "random", "random"],
        "layer": pd.array([None, None, 0, 0, 0, 0], dtype="Int64"),
        "rel_pos": pd.array([None, None, 0, 0, -1, -1], dtype="Int64"),
        "corrected": [0, 1, 1, 1, 0, 0],
    })
    s = summarize_sampled(t, n_boot=200)
    assert list(s.columns) == SAMPLED_EFFECT_COLUMNS
    rate = {c: r for c, r in zip(s["control"], s["rate"], strict=True)}
    assert rate == {"clean": 0.5, "none": 1.0, "random": 0.0}
    assert (s["n"] == 2).all()


def test_shared_prefix_prefill_gives_the_same_tokens_as_the_full_prefill(sft, post, slip_trajs, monkeypatch):
    """The prefix before the first patched position runs once and its cache is repeated per row;
    every continuation (clean, patched, random) must equal the full per-row prefill's."""
    import functools

    from waitlens.hooks import sampled

    shared = sampled_corrections(post, sft, slip_trajs, rel_positions=(-2, -1, 0))
    monkeypatch.setattr(sampled, "_greedy_batch", functools.partial(sampled._greedy_batch, share_prefix=False))
    full = sampled_corrections(post, sft, slip_trajs, rel_positions=(-2, -1, 0))
    pd.testing.assert_frame_equal(shared, full)
    clean = full[full["control"] == "clean"].set_index(["trajectory_id", "wait_word"])["continuation"]
    merged = full.join(clean.rename("clean_text"), on=["trajectory_id", "wait_word"])
    assert (merged["continuation"] != merged["clean_text"]).any(), "some patch must change a continuation"
