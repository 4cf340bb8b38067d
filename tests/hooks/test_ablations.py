"""Within-model ablations: the text edits, and the metrics they are measured with."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_qwen, tiny_trajectory
from waitlens.hooks import load_model
from waitlens.hooks.ablations import ablate, ablate_text, neutral_word, split_steps
from waitlens.traces import Trajectory

SEPS = (";", "so", "therefore")


def org(reasoning, waits=()):
    return Trajectory("x", "p", "Q 3 + 7 - 8 + 6 ;", reasoning, "8", "8",
                      extra={"truth": {"waits": [{"word": w, "after_slip": True} for w in waits], "steps": []}})


def test_text_edits():
    t = org("3 + 7 = 1 wait 3 + 7 = 0 ; 0 - 8 = 2 so 2 + 6 = 8 wait 2 + 6 = 8", waits=[5])
    assert ablate_text(t, "replace-wait", neutral=";") == ("3 + 7 = 1 ; 3 + 7 = 0 ; 0 - 8 = 2 so 2 + 6 = 8 wait 2 + 6 = 8", 10)
    assert ablate_text(t, "remove-wait")[0] == "3 + 7 = 1 3 + 7 = 0 ; 0 - 8 = 2 so 2 + 6 = 8 wait 2 + 6 = 8"
    shuffled, _ = ablate_text(t, "shuffle-steps", separators=SEPS)
    assert sorted(split_steps(shuffled, SEPS)[0]) == sorted(split_steps(t.reasoning, SEPS)[0])
    assert shuffled != t.reasoning and split_steps(shuffled, SEPS)[1] == [";", "so"]
    deleted, _ = ablate_text(t, "delete-steps", separators=SEPS)
    assert len(split_steps(deleted, SEPS)[0]) == 2 and deleted.endswith("2 + 6 = 8 wait 2 + 6 = 8")
    assert ablate_text(org("3 + 7 = 0 ; 0 - 8 = 2"), "remove-wait") is None
    assert ablate_text(org("3 + 7 = 0"), "shuffle-steps", separators=SEPS) is None
    assert split_steps("I add. Then I check!\nWait, no.", None)[0] == ["I add.", "Then I check!", "Wait, no."]
    with pytest.raises(ValueError, match="unknown ablation"):
        ablate_text(t, "scramble")


@pytest.mark.slow
def test_ablate_metrics(tmp_path):
    torch.set_num_threads(1)
    m = load_model(str(make_tiny_qwen(tmp_path / "m")), device="cpu", dtype="float32")
    assert neutral_word(m.tokenizer) == ";"  # "then"/"and" are not in the tiny vocabulary
    trajs = [tiny_trajectory(i) for i in range(3)] + [tiny_trajectory(9, reasoning="3 + 4 = 7 so 7 - 2 = 5")]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t, info = ablate(m, trajs, "remove-wait")
    assert info["n_skipped"] == 1 and any("skipped 1 of 4" in str(x.message) for x in w)
    g = t[t["metric"] == "gold_prob"]
    assert len(g) == 3 and (g["clean"] > 0).all() and (g["clean"] != g["ablated"]).all()
    kl = t[t["metric"] == "kl"]["effect"]
    assert np.isfinite(kl).all() and (kl > 0).all()
    # the default read-out: probability of the wait's own continuation, aligned after the edit
    assert t[t["metric"] == "continuation"]["effect"].notna().all()
    t2, _ = ablate(m, trajs[:3], "shuffle-steps", separators=SEPS)
    assert t2[t2["metric"] == "gold_prob"]["effect"].notna().all()


def test_row_logprobs_equal_full_logprobs(tmp_path, monkeypatch):
    """With a large vocabulary only the rows read are unembedded: the same numbers as all rows."""
    import waitlens.hooks.ablations as ab

    torch.set_num_threads(1)
    m = load_model(str(make_tiny_qwen(tmp_path / "m")), device="cpu", dtype="float32")
    trajs = [tiny_trajectory(i) for i in range(3)]
    full = {k: ablate(m, trajs, k, separators=SEPS)[0] for k in ("remove-wait", "shuffle-steps")}
    monkeypatch.setattr(ab, "FULL_LOGPROBS_MAX", 0)
    for k, t in full.items():
        rows = ablate(m, trajs, k, separators=SEPS)[0]
        np.testing.assert_allclose(rows[["clean", "ablated", "effect"]].to_numpy(float),
                                   t[["clean", "ablated", "effect"]].to_numpy(float), atol=1e-6, rtol=1e-5)
