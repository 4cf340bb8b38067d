"""Batched forwards equal one-at-a-time forwards: token log-probs and forced-answer curves
(within 1e-5), on the organism and on SmolLM2, with right and left padding; and the
vectorised bootstrap CIs of the token table equal `cluster_bootstrap`'s."""

from __future__ import annotations

import numpy as np
import pytest

from waitlens.hooks.answer import answer_curves, answer_probabilities, choose_prefixes
from waitlens.hooks.batching import length_batches, pad_batch
from waitlens.hooks.logprobs import token_logprobs, token_logprobs_batch, token_occurrences
from waitlens.traces import Trajectory, find_positions

TOL = 1e-5  # the curves (probabilities) and token log-probs, float32
# Forced-answer log-probs in float32: padding changes the attention's reduction widths, so a
# log-prob near -10 moves by float32 rounding (seen up to 1.0e-5); in float64 both are equal to
# 1e-9 (test_batched_exact_in_float64), so this is rounding, not a different computation.
TOL_LOG32 = 3e-5


@pytest.fixture(scope="module")
def organism():
    from waitlens.hooks import load_model

    return load_model("organism:post-large", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def organism_trajs():
    from waitlens.experiments.organism.task import TRACE_CORPUS, make_trace, random_problem

    rng = np.random.default_rng(0)
    out = []
    for i in range(10):
        prob = random_problem(rng, split="eval")
        reasoning, answer, _ = make_trace(prob, TRACE_CORPUS, rng)
        out.append(Trajectory(id=f"o{i}", problem_id=prob.id, prompt=prob.prompt, reasoning=reasoning,
                              answer=answer, gold=prob.gold, correct=answer == prob.gold))
    # an empty reasoning: no rows, no forward
    out.append(Trajectory(id="empty", problem_id="pe", prompt=out[0].prompt, reasoning="", answer="1",
                          gold="1", correct=True))
    lengths = {len(t.reasoning.split()) for t in out[:-1]}
    assert len(lengths) > 3  # varied lengths: the batches are padded
    return out


def smollm2_trajs():
    """Three lengths (~15-40 reasoning tokens: the batches are padded), each with a "Wait"."""
    base = ("Let me add the numbers step by step. 17 plus 25 is 42. Wait, let me check that again: "
            "17 plus 25, seven plus five is twelve, carry the one, so 42. Hmm, then 42 minus 9 is 33.")
    return [Trajectory(id=f"s{i}", problem_id=f"p{i}", prompt="What is 17 + 25 - 9?",
                       reasoning=base[: 60 + 50 * i].strip(), answer="33", gold="33", correct=bool(i % 2))
            for i in range(3)]


def _check_logprobs(model, trajs, tol=TOL):
    one = [token_logprobs(model, t) for t in trajs]
    for padding in ("right", "left"):
        many = token_logprobs_batch(model, trajs, batch_size=4, padding=padding)
        assert len(many) == len(one)
        for a, b in zip(one, many, strict=True):
            assert list(a["token_index"]) == list(b["token_index"])
            assert list(a["token_id"]) == list(b["token_id"]) and list(a["token"]) == list(b["token"])
            if len(a):
                np.testing.assert_allclose(a["logprob"], b["logprob"], atol=tol, rtol=0)
                assert (b["logprob"] <= 0).all()


def _check_curves(model, trajs, k=2, every=3, tol=TOL, tol_log=TOL_LOG32, **kw):
    centres = {}
    for tid, ti in zip(*(find_positions(model, trajs, ["wait", "so"]).table[c] for c in ("trajectory_id",
                                                                                         "token_index")),
                       strict=True):
        centres.setdefault(tid, []).append(int(ti))
    ref = []
    for t in trajs:
        pref = [p for p in choose_prefixes(model.render(t, include_answer=False), centres.get(t.id, ()), k=k,
                                           every=every) if p >= 1]
        ref.append(answer_probabilities(model, t, pref, **kw))
    for padding in ("right", "left"):
        got = answer_curves(model, trajs, centres, k=k, every=every, batch_size=3, padding=padding, **kw)
        assert list(got["trajectory_id"].unique()) == [t.id for t in trajs]
        for t, r in zip(trajs, ref, strict=True):
            g = got[got["trajectory_id"] == t.id].reset_index(drop=True)
            assert list(g["prefix"]) == list(r["prefix"])
            for c in ("gold_prob", "top_prob"):
                np.testing.assert_allclose(g[c], r[c], atol=tol, rtol=0)
            for c in ("gold_logprob", "top_logprob"):
                np.testing.assert_allclose(g[c], r[c], atol=tol_log, rtol=0)
            assert list(g["top_answer"]) == list(r["top_answer"])


def test_pad_batch_and_length_batches():
    b = pad_batch([[5, 6, 7], [8]], "left", pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]] and b.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert b.flat_index(1, [0]).tolist() == [5]
    r = pad_batch([[5, 6, 7], [8]], "right")
    assert r.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and r.flat_index(1, [0]).tolist() == [3]
    assert pad_batch([[1, 2], [3, 4]]).attention_mask is None
    groups = list(length_batches([10, 3, 50, 4, 4], batch_size=2, max_tokens=60))
    assert groups == [[1, 3], [4, 0], [2]]  # shortest first; a group's padded size stays within 60
    with pytest.raises(ValueError, match="padding must be one of"):
        pad_batch([[1]], "middle")


def test_batched_logprobs_organism(organism, organism_trajs):
    _check_logprobs(organism, organism_trajs)
    assert token_logprobs(organism, organism_trajs[-1]).empty


def test_batched_occurrences_equal_per_trajectory(organism, organism_trajs):
    lex = ["wait", "so", "therefore", "alternatively"]
    whole = token_occurrences(organism, organism_trajs, lex, batch_size=3, padding="left")
    parts = [token_occurrences(organism, [t], lex, batch_size=1) for t in organism_trajs]
    import pandas as pd

    parts = pd.concat([p for p in parts if len(p)], ignore_index=True)
    assert len(whole) == len(parts) and (whole["kind"] == "word").any()
    for c in whole.columns:
        if c == "logprob":
            np.testing.assert_allclose(whole[c], parts[c], atol=TOL, rtol=0)
        else:
            assert list(whole[c]) == list(parts[c]), c


def test_batched_answer_curves_organism(organism, organism_trajs):
    _check_curves(organism, organism_trajs[:-1])


def test_batched_exact_in_float64(organism_trajs):
    from waitlens.hooks import load_model

    model = load_model("organism:sft-1k", device="cpu", dtype="float32")
    model.hf.double()
    _check_logprobs(model, organism_trajs, tol=1e-9)
    _check_curves(model, organism_trajs[:-1], tol=1e-9, tol_log=1e-9)


def test_batched_answer_curves_multi_token_tiny(tiny_model):
    from tests.conftest import tiny_trajectory

    trajs = [tiny_trajectory(i, r) for i, r in enumerate(["3 + 4 = 7 wait 7 - 2 = 5 so 5", "3 + 4 = 7 so 7",
                                                          "3 + 4 = 7 ; wait 3 + 4 = 7 so 7 - 2 = 5 therefore 5"])]
    _check_curves(tiny_model, trajs, k=1, every=2, max_answer_tokens=3, include_close=True)
    _check_curves(tiny_model, trajs, k=1, every=4, suffix=" ", max_answer_tokens=2)  # re-fed prefix token


@pytest.mark.slow
def test_batched_smollm2(smollm2):
    import copy
    import dataclasses

    trajs = smollm2_trajs()
    # 30 float32 layers: rounding reaches 1.0e-5 on a log-prob near -2 (float64 below: 1e-9)
    _check_logprobs(smollm2, trajs, tol=TOL_LOG32)
    _check_curves(smollm2, trajs, k=1, every=24, max_answer_tokens=2)
    # float64 on SmolLM2's first 6 blocks (its embedding, head and tokenizer): the exactness of
    # the padded computation is per block, and 6 of 30 blocks cost ~a third of the CPU
    layers = smollm2.hf.model.layers
    smollm2.hf.model.layers = layers[:6]
    try:
        hf = copy.deepcopy(smollm2.hf).double()
    finally:
        smollm2.hf.model.layers = layers
    hf.config.num_hidden_layers = 6
    exact = dataclasses.replace(smollm2, hf=hf)
    assert exact.n_layers == 6 and smollm2.n_layers == 30
    _check_logprobs(exact, trajs[:2], tol=1e-9)  # two lengths: padded
    _check_curves(exact, trajs[:2], k=1, every=40, max_answer_tokens=2, tol=1e-9, tol_log=1e-9)


def test_vectorised_bootstrap_equals_cluster_bootstrap():
    from waitlens.probes.stats import cluster_bootstrap
    from waitlens.probes.tokens import _auroc_ci, _auroc_stat

    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(4, 200))
        c = rng.poisson(rng.uniform(0.2, 3), n).astype(float)
        y = (rng.random(n) < 0.5).astype(float)
        g = rng.integers(0, max(2, n // 2), n)
        want = cluster_bootstrap(np.column_stack([c, y]), g, _auroc_stat, n_boot=200, seed=trial)[1:]
        np.testing.assert_allclose(_auroc_ci(c, y, g, 200, trial), want, atol=1e-12, rtol=0)


def test_gpu_benchmark_runs_at_toy_size():
    """experiments/benchmarks/gpu.py: the same code as on a GPU, at toy size on the CPU."""
    from waitlens.experiments.benchmarks import gpu

    if not gpu.DEFAULT_CONFIG.is_file():
        pytest.skip(f"the real Qwen2 config is absent: {gpu.DEFAULT_CONFIG} (../shared/realdata beside the repo)")
    full = gpu.build_model(gpu.DEFAULT_CONFIG, size="toy")
    assert full.config.num_key_value_heads == 2 and full.config.rms_norm_eps == 1e-5  # the real config's fields kept
    rows = gpu.run(toy=True, device="cpu")
    names = [r.what for r in rows]
    for part in ("bare forward", "capture", "forced answer", "patch sweep exact", "attribution", "sampling HF"):
        assert any(part in n for n in names), part
    assert all(r.seconds > 0 for r in rows if "vLLM" not in r.what)
    assert "| measurement |" in gpu.table(rows)
