"""The model organism: ground truth of the generator, tokenizer round trip, training
determinism, sampling with truth, the shipped weights and their planted signals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from experiments.organism import registry
from experiments.organism.task import (
    BASE_CORPUS,
    TRACE_CORPUS,
    CorpusSpec,
    Problem,
    analyze,
    apply,
    make_trace,
    random_problem,
)
from traces import Trajectory, find_positions, grade, render

ORG = Path(registry.__file__).resolve().parent


# -- the task and its ground truth ---------------------------------------------------------------
CONNECTIVE = CorpusSpec("connective", wait_after_slip=0.3, wait_after_correct=0.1, alt_after_correct=0.05,
                        recheck="connective")


@pytest.mark.parametrize("spec", [BASE_CORPUS, TRACE_CORPUS, CONNECTIVE], ids=lambda s: s.name)
def test_generator_truth_matches_text(spec):
    rng = np.random.default_rng(1)
    n_waits = n_fix = 0
    for _ in range(3000):
        p = random_problem(rng)
        reasoning, answer, planted = make_trace(p, spec, rng)
        truth = analyze(p, reasoning)
        assert not truth.malformed, (reasoning, truth.error)
        assert truth.slips == planted["slips"]
        assert [{k: w[k] for k in planted["waits"][0]} for w in truth.waits] == planted["waits"] if planted["waits"] else not truth.waits
        assert str(truth.final_value) == answer
        assert p.gold == str(p.true_values()[-1])
        # the running value written and the true one, step by step
        new_steps = [s for s in truth.steps if s["kind"] == "step"]
        assert [s["step"] for s in new_steps] == list(range(len(p.ops)))
        assert [s["true"] for s in new_steps] == p.true_values()
        for w in truth.waits:
            n_waits += 1
            if spec.recheck == "fix":
                assert w["recheck_correct"]
                # a wait after a slip with a correct recheck is an answer transition
                assert w["changed_answer"] == w["after_slip"]
                n_fix += w["after_slip"]
            elif spec.recheck == "restate":  # the base's generic wait: never a transition
                assert w["rechecked"] and not w["changed_answer"]
                assert w["recheck_correct"] == (not w["after_slip"])
            else:  # "wait" as a plain connective before the next step: no recheck at all
                assert not w["rechecked"] and not w["changed_answer"] and not w["recheck_correct"]
        # no uncaught slip in a fixing corpus -> the answer is right
        if spec.recheck == "fix" and all(w["after_slip"] for w in truth.waits) and \
                len(truth.slips) == sum(w["after_slip"] for w in truth.waits) + sum(a["after_slip"] for a in truth.alternatives):
            assert grade(answer, p.gold)
    assert n_waits > 100
    assert spec.recheck != "fix" or n_fix > 100


def test_analyze_examples_and_malformed():
    p = Problem(3, (("+", 7), ("-", 8)))
    assert p.prompt == "Q 3 + 7 - 8 ;" and p.gold == "2" and Problem.parse_prompt(p.prompt) == p
    t = analyze(p, "3 + 7 = 1 wait 3 + 7 = 0 so 0 - 8 = 2")
    assert t.slips == [0] and not t.malformed and t.final_value == 2
    assert t.waits == [{"step": 0, "word": 5, "after_slip": True, "changed_answer": True,
                        "recheck_correct": True, "rechecked": True}]
    t = analyze(p, "3 + 7 = 1 wait 1 - 8 = 3")  # "wait" as a plain connective
    assert t.slips == [0] and t.waits[0]["rechecked"] is False and t.n_steps == 2 and not t.malformed
    t = analyze(p, "3 + 7 = 0 ; 0 - 8 = 2 alternatively 0 + 2 = 2")
    assert t.alternatives[0]["recheck_correct"] and not t.alternatives[0]["changed_answer"]
    # a carried-forward slip: the next step is locally right but its true value differs
    t = analyze(p, "3 + 7 = 9 ; 9 - 8 = 1")
    assert t.slips == [0] and t.steps[1]["slip"] is False and t.steps[1]["true"] == 2
    for bad in ("", "3 + 7 = 0", "3 + 7 = 0 ; 0 - 8 = 2 ; 2 + 1 = 3", "3 + 7 = 0 hmm 0 - 8 = 2", "3 + 7 ="):
        assert analyze(p, bad).malformed
    assert apply(3, "-", 8) == 5


def test_eval_problems_are_held_out():
    from experiments.organism.sample import eval_problems

    rng = np.random.default_rng(0)
    train = {random_problem(rng).text for _ in range(2000)}
    ev = eval_problems(300)
    assert all(p.held_out for p in ev) and not train & {p.text for p in ev}


# -- tokenizer and format ----------------------------------------------------------------------
def test_tokenizer_round_trip(tmp_path):
    from experiments.organism.model import FORMAT, build_tokenizer, encode

    tok = build_tokenizer(tmp_path)
    assert tok.is_fast
    rng = np.random.default_rng(0)
    for spec in (BASE_CORPUS, TRACE_CORPUS):
        for _ in range(50):
            p = random_problem(rng)
            reasoning, answer, _ = make_trace(p, spec, rng)
            traj = Trajectory("t", p.id, p.prompt, reasoning, answer, p.gold)
            rd = render(tok, traj, FORMAT)
            ids, n_head = encode(p, reasoning, answer)
            assert rd.input_ids == ids
            assert rd.text.startswith("<bos> Q ") and rd.text.endswith(f" ; A {answer} <eos>")
            assert tok.decode(rd.input_ids[rd.answer_tokens[0]:rd.answer_tokens[1]]) == answer
            assert rd.reasoning_tokens[0] == n_head
    # discourse positions are found in the organism's tokenization
    traj = Trajectory("t", "p", "Q 3 + 7 - 8 ;", "3 + 7 = 1 wait 3 + 7 = 0 so 0 - 8 = 2", "2", "2")
    pos = find_positions(tok, [traj], fmt=FORMAT)
    assert set(pos.table["word"]) >= {"wait", "so"}


# -- training --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_dirs(tmp_path_factory):
    from experiments.organism.train import SMOKE, train_all

    a = train_all(tmp_path_factory.mktemp("a"), seed=5, config=SMOKE, progress=False, log=lambda *_: None)
    b = train_all(tmp_path_factory.mktemp("b"), seed=5, config=SMOKE, progress=False, log=lambda *_: None)
    return a, b


def test_smoke_training_is_deterministic(smoke_dirs, tmp_path):
    from safetensors.torch import load_file

    a, b = smoke_dirs
    for regime in ("base", "sft-1k", "post-large"):
        assert sorted(p.name for p in a[regime].iterdir()) == sorted(p.name for p in b[regime].iterdir())
        sa, sb = load_file(a[regime] / "model.safetensors"), load_file(b[regime] / "model.safetensors")
        assert all((sa[k] == sb[k]).all() for k in sa)
    sa, sb = load_file(a["base"] / "model.safetensors"), load_file(a["sft-1k"] / "model.safetensors")
    assert any((sa[k] != sb[k]).any() for k in sa)  # fine-tuning changed the weights


def test_smoke_dir_loads_and_samples(smoke_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments.organism.sample import evaluate, load, sample

    d = smoke_dirs[0]["sft-1k"]
    assert type(AutoModelForCausalLM.from_pretrained(d)).__name__ == "Qwen2ForCausalLM"
    assert AutoTokenizer.from_pretrained(d).is_fast
    model = load(str(d))
    trajs = sample(model, 6, seed=0, progress=False)
    assert len(trajs) == 6 and len({t.id for t in trajs}) == 6
    for t in trajs:  # an untrained model: mostly malformed, never a crash
        truth = t.extra["truth"]
        assert {"slips", "waits", "steps", "malformed"} <= set(truth)
        assert t.correct in (True, False) and (not truth["malformed"] or t.correct is False)
    assert evaluate(trajs)["n"] == 6


# -- the registry and the command line ---------------------------------------------------------------
def test_registry_error_lists_variants():
    with pytest.raises(ValueError, match="base, sft-1k, post-large"):
        registry.resolve("sft-2k")
    assert registry.regime_dir("base") == ORG / "weights" / "base"


def test_cli_unknown_spec(capsys):
    from experiments.cli import main

    assert main(["organism", "eval", "--model", "organism:huge", "--n", "2"]) == 2
    assert "valid variants" in capsys.readouterr().err
    assert main(["organism", "sample", "--model", "/nonexistent", "--n", "2", "--out", "/tmp/x.jsonl"]) == 2


# -- the shipped weights ---------------------------------------------------------------------------
# The weights ship with the repo: their absence is a failure, not a skip.
SHIPPED = json.loads((ORG / "shipped.json").read_text())


def test_shipped_weights_are_the_committed_ones():
    for regime, digest in SHIPPED["sha256"].items():
        d = registry.resolve(regime)
        assert hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() == digest, regime
        assert (d / "waitlens_format.json").is_file() and (d / "tokenizer.json").is_file()
    total = sum(f.stat().st_size for f in (ORG / "weights").rglob("*") if f.is_file())
    assert total < 20e6


@pytest.fixture(scope="module")
def shipped_eval():
    from experiments.organism.sample import evaluate, load, sample

    return {r: evaluate(sample(load(f"organism:{r}"), 400, seed=11, progress=False))
            for r in ("sft-1k", "post-large")}


def test_shipped_models_load_through_hooks():
    from hooks.models import load_model

    m = load_model("organism:post-large")
    assert m.format.forcing_suffix == " ; A " and type(m.hf).__name__ == "Qwen2ForCausalLM"


def test_planted_signal_post_large_waits_fix(shipped_eval):
    sft, post = shipped_eval["sft-1k"], shipped_eval["post-large"]
    assert post["accuracy"]["value"] > sft["accuracy"]["value"]
    assert post["fix_rate"]["value"] > sft["fix_rate"]["value"] + 0.2
    assert post["keep_rate"]["value"] > sft["keep_rate"]["value"]
    assert sft["waits_per_trajectory"]["value"] > 0.2 and post["waits_per_trajectory"]["value"] > 0.2


def test_capture_matches_full_forward_on_organism(tmp_path):
    """The foundation's capture equivalence on the organism: captured states == a full forward."""
    import hooks.capture as capture
    from experiments.organism.sample import sample
    from hooks.models import load_model
    from tests.test_capture import check_against_full_forward

    model = load_model("organism:post-large")
    trajs = sample(model, 8, seed=3, progress=False)
    pos = find_positions(model, trajs, ["wait", "so", "therefore", "alternatively"])
    store = capture.capture_residuals(model, trajs, pos, tmp_path / "s", batch_size=4, progress=False)
    assert len(store.metadata) > 8
    check_against_full_forward(model, trajs, store, "resid_post")  # within 1e-4, as for the other models
