"""Batched patching and ablations equal their one-case-at-a-time reference paths
(`max_batch_tokens=None`): patch effects, clean and patched values and attribution estimates
within 1e-5, on the organism and on SmolLM2, with right and left padding; and data-parallel
patching under torchrun: tests/hooks/test_torchrun.py."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch

from waitlens.hooks import load_model
from waitlens.hooks.ablations import KINDS, ablate
from waitlens.hooks.patching import patch
from waitlens.traces import Trajectory

TOL = 1e-5
KEYS = ["direction", "trajectory_id", "problem_id", "anchor", "control", "layer", "rel_pos", "position", "metric"]
VALUES = ["clean", "patched", "effect", "attribution"]


pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def org_metrics(names):
    from waitlens.experiments.analyses.patch import resolve_study_metrics

    return resolve_study_metrics(names)


def assert_same_rows(ref, got, tol=TOL, exact=False):
    """The same rows in the same order; values within `tol` (NaN where the reference has NaN)."""
    assert len(ref) == len(got) > 0
    for c in KEYS:
        assert list(ref[c]) == list(got[c]), c
    for c in VALUES if "attribution" in ref else ["clean", "ablated", "effect"]:
        a, b = ref[c].to_numpy(float), got[c].to_numpy(float)
        assert (np.isnan(a) == np.isnan(b)).all(), c
        if exact:
            assert (a[~np.isnan(a)] == b[~np.isnan(b)]).all(), c
        else:
            np.testing.assert_allclose(b, a, atol=tol, rtol=0, err_msg=c)


@pytest.fixture(scope="module")
def organism_pair():
    from waitlens.experiments.organism.sample import sample

    sft, post = load_model("organism:sft-1k", device="cpu"), load_model("organism:post-large", device="cpu")
    ts = [t for t in sample(sft, 40, seed=1, progress=False) if " wait " in f" {t.reasoning} "]
    assert len(ts) >= 6 and len({len(t.reasoning.split()) for t in ts[:6]}) > 2  # varied lengths: padded
    return post, sft, ts[:6]


@pytest.mark.parametrize("names", [["kl", "gold_prob", "correction"],
                                   pytest.param(["forced_answer", "next_token_kl", "recheck"], marks=pytest.mark.slow)])
def test_batched_patch_equals_one_at_a_time_organism(organism_pair, names):
    post, sft, ts = organism_pair
    metrics = org_metrics(names)
    attribution = "gold_prob" in names
    run = lambda ts=ts, **kw: quiet(patch, post, sft, ts, layers="all", window="-1:2", metrics=metrics,  # noqa: E731
                                    attribution=attribution, **kw)
    ref = run(max_batch_tokens=None)
    assert ref.info["cost"]["forward_calls"] > 40  # the reference: a forward per patched position
    if "forced_answer" in names:
        assert ref.info["cost"]["branch_rows"] > 0  # branches (the forced answer) are patched too
    for kw in (dict(padding="right"), dict(padding="left"), dict(max_batch_tokens=300, use_cache=False),
               dict(skip_lower_layers=False)):
        got = run(**kw)
        assert got.info["skip_lower_layers"] == ("skip_lower_layers" not in kw)  # tails start at the patched block
        if "max_batch_tokens" not in kw:  # far fewer forwards (300 tokens: a few rows each)
            assert got.info["cost"]["forward_calls"] < ref.info["cost"]["forward_calls"] / 5, kw
        assert_same_rows(ref.table, got.table)
    # one case and one row per forward: the reference's forwards exactly, so its floats exactly
    # (two cases of different lengths: a forward per row is ~half the test's CPU on all six)
    assert_same_rows(run(ts[:2], max_batch_tokens=None, batch_size=1).table,
                     run(ts[:2], batch_size=1, skip_lower_layers=False).table, exact=True)


def test_batched_ablations_equal_one_at_a_time_organism(organism_pair):
    from waitlens.experiments.analyses.patch import ablation_options

    post, _, ts = organism_pair
    seps, pick, readouts = ablation_options(post)
    for kind in KINDS:
        run = lambda kind=kind, **kw: quiet(ablate, post, ts, kind, separators=seps, pick_wait=pick,  # noqa: E731
                                            readouts=readouts, **kw)[0]
        ref = run(max_batch_tokens=None)
        for kw in (dict(padding="right"), dict(padding="left"), dict(max_batch_tokens=200, batch_size=3)):
            got = run(**kw)
            assert_same_ablations(ref, got)


def assert_same_ablations(ref, got):
    assert len(ref) == len(got) > 0
    for c in ("trajectory_id", "kind", "metric"):
        assert list(ref[c]) == list(got[c])
    for c in ("clean", "ablated", "effect"):
        a, b = ref[c].to_numpy(float), got[c].to_numpy(float)
        assert (np.isnan(a) == np.isnan(b)).all(), c
        np.testing.assert_allclose(b, a, atol=TOL, rtol=0, err_msg=c)


def smollm2_trajs():
    """Two lengths (~20 and ~40 reasoning tokens: the batches are padded), one "Wait" each."""
    base = ("Let me add the numbers step by step. 17 plus 25 is 42. Wait, let me check that again: "
            "17 plus 25, seven plus five is twelve, carry the one, so 42. Hmm, then 42 minus 9 is 33.")
    return [Trajectory(id=f"s{i}", problem_id=f"p{i}", prompt="What is 17 + 25 - 9?",
                       reasoning=base[: 75 + 45 * i].strip(), answer="33", gold="33",
                       correct=bool(i % 2)) for i in (0, 2)]


@pytest.mark.slow
def test_batched_patch_and_ablations_equal_one_at_a_time_smollm2(smollm2):
    """A real BPE model (30 layers, 49k vocabulary) against a perturbed copy of itself, with the
    model-agnostic metrics (the forced answer reads branches); an ablation with sentences. Two
    layers, both batched tails starting mid-stack (every layer, 0 included, is checked on the
    organism above)."""
    tuned = copy.deepcopy(smollm2.hf)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    source = dataclasses.replace(smollm2, hf=tuned, spec="smollm2-perturbed")
    trajs = smollm2_trajs()
    run = lambda **kw: quiet(patch, source, smollm2, trajs, layers="14,29", window="0:1",  # noqa: E731
                             metrics=["forced_answer", "next_token_kl", "recheck"], **kw)
    ref = run(max_batch_tokens=None)
    assert ref.info["n_cases"] == 2 and ref.info["cost"]["branch_rows"] > 0
    assert ref.table["effect"].abs().max() > 1e-3  # the copy differs: the comparison is not of zeros
    for padding in ("right", "left"):
        got = run(padding=padding)
        assert got.info["skip_lower_layers"]  # Llama: tails start at the patched block
        assert_same_rows(ref.table, got.table)
    for kind in ("replace-wait",):  # every kind is checked on the organism above; one on a real BPE model
        refa = quiet(ablate, smollm2, trajs, kind, max_batch_tokens=None)[0]
        for padding in ("right", "left"):
            assert_same_ablations(refa, quiet(ablate, smollm2, trajs, kind, padding=padding)[0])
