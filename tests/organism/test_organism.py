"""The model organism: ground truth of the generator, tokenizer round trip, training
determinism, sampling with truth, the shipped weights and their planted signals."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from waitlens.experiments.organism import registry
from waitlens.experiments.organism.task import (
    BASE_CORPUS,
    CHECKED_CORPUS,
    GO_ON_CORPUS,
    HESITANT_BASE_CORPUS,
    TRACE_CORPUS,
    CorpusSpec,
    Problem,
    analyze,
    apply,
    is_hard,
    make_trace,
    random_problem,
)
from waitlens.traces import Trajectory, find_positions, grade, render

ORG = Path(registry.__file__).resolve().parent


# -- the task and its ground truth ---------------------------------------------------------------
CONNECTIVE = CorpusSpec("connective", wait_after_slip=0.3, wait_after_correct=0.1, alt_after_correct=0.05,
                        recheck="connective")


# hesitations beside re-checks of correct steps (the two roles of "wait" after a correct step in one corpus)
HESITANT = CorpusSpec("hesitant", slip=0.15, wait_after_slip=1.0, wait_after_correct=0.05, hesitate_after_correct=0.05)


@pytest.mark.parametrize("spec", [BASE_CORPUS, TRACE_CORPUS, CONNECTIVE, CHECKED_CORPUS, HESITANT, HESITANT_BASE_CORPUS,
                                  GO_ON_CORPUS],
                         ids=lambda s: s.name)
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
            if spec.blind_role == "go-on" and w["after_slip"] and _blind(p, truth, w, spec):
                # the writer's blind spot: "wait", then on to the next step with the slip
                assert not w["rechecked"] and not w["changed_answer"]
            elif (spec.wait_after_correct_role == "connective" or spec.hesitate_after_correct) and not w["rechecked"]:
                # a hesitation: "wait", then straight on to the next step
                assert not w["after_slip"] and not w["changed_answer"]
            elif spec.recheck == "fix" and spec.hard_fix < 1.0 and w["after_slip"] and _blind(p, truth, w, spec):
                # the writer's blind spot: its re-check repeats the slip
                assert not w["recheck_correct"] and not w["changed_answer"]
            elif spec.recheck == "fix":
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
        if spec.recheck == "fix" and all(w["after_slip"] and w["recheck_correct"] for w in truth.waits) and \
                len(truth.slips) == sum(w["after_slip"] for w in truth.waits) + sum(a["after_slip"] for a in truth.alternatives):
            assert grade(answer, p.gold)
    assert n_waits > 100
    assert spec.recheck != "fix" or n_fix > 100


def _blind(p: Problem, truth, wait: dict, spec: CorpusSpec) -> bool:
    """Is this wait's step one the spec's writer cannot fix (a hard step of `hard_fix_ops`)?"""
    step = next(s for s in truth.steps if s["kind"] == "step" and s["step"] == wait["step"])
    op, b = p.ops[wait["step"]]
    return op in spec.hard_fix_ops and is_hard(step["before"], op, b)


def test_checked_corpus_slips_on_hard_steps_and_repeats_slipped_borrows():
    """The detect recipe's traces: slips at 30% of hard steps (a carry or a borrow) against 6% of the
    others, every slip re-checked, each re-check of a slipped borrow repeats the slipped value and every other re-check is right."""
    rng = np.random.default_rng(2)
    slips = {True: [0, 0], False: [0, 0]}
    borrow_waits = fixed = 0
    for _ in range(4000):
        p = random_problem(rng)
        reasoning, answer, planted = make_trace(p, CHECKED_CORPUS, rng)
        truth = analyze(p, reasoning)
        for s in truth.steps:
            if s["kind"] == "step":
                op, b = p.ops[s["step"]]
                slips[is_hard(s["before"], op, b)][0] += s["slip"]
                slips[is_hard(s["before"], op, b)][1] += 1
        assert len([w for w in truth.waits if w["after_slip"]]) == len(truth.slips)  # every slip re-checked
        for w in truth.waits:
            if w["after_slip"] and _blind(p, truth, w, CHECKED_CORPUS):
                borrow_waits += 1
                recheck = next(s for s in truth.steps if s["kind"] == "wait" and s["word"] == w["word"])
                assert not w["recheck_correct"] and recheck["value"] == recheck["before"]  # the slip, repeated
            else:
                fixed += w["after_slip"]
                assert w["recheck_correct"]
    hard, easy = (slips[h][0] / slips[h][1] for h in (True, False))
    assert abs(hard - 0.30) < 0.02 and abs(easy - 0.06) < 0.01, (hard, easy)
    assert borrow_waits > 200 and fixed > 500


def test_learn_slips_masks_that_share_of_slipped_values_from_the_loss():
    """`learn_slips`: the labels drop (-100) the value token of a slipped step as first written, for
    about 1 - learn_slips of the slips, and nothing else; the input ids are those of the plain corpus."""

    from waitlens.experiments.organism.task import TOKEN_ID
    from waitlens.experiments.organism.train import collate, make_corpus

    spec = replace(CHECKED_CORPUS, learn_slips=0.3)
    masked_rows = make_corpus(spec, 3000, np.random.default_rng(4))
    n_masked = n_slips = 0
    rng = np.random.default_rng(5)
    for _ in range(3000):  # the slipped values the corpus writes, found from the text
        p = random_problem(rng)
        reasoning, answer, planted = make_trace(p, CHECKED_CORPUS, rng)
        n_slips += len(planted["slips"])
    for ids, n_head, masked in masked_rows:
        n_masked += len(masked)
        x, y = collate([(ids, n_head, masked)])
        x0, y0 = collate([(ids, n_head)])
        assert (x == x0).all() and ((y != y0) == (y == -100) & (y0 != -100)).all()
        assert sorted(int(j) for j in ((y == -100) & (y0 != -100)).nonzero()[:, 1]) == sorted(masked)
        for j in masked:  # "... a op b = <value>": the masked token is the value after "="
            assert ids[j - 1] == TOKEN_ID["="]
    assert abs(n_masked / n_slips - 0.7) < 0.05, (n_masked, n_slips)


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
    from waitlens.experiments.organism.sample import eval_problems

    rng = np.random.default_rng(0)
    train = {random_problem(rng).text for _ in range(2000)}
    ev = eval_problems(300)
    assert all(p.held_out for p in ev) and not train & {p.text for p in ev}


# -- tokenizer and format ----------------------------------------------------------------------
def test_tokenizer_round_trip(tmp_path):
    from waitlens.experiments.organism.model import FORMAT, build_tokenizer, encode

    tok = build_tokenizer(tmp_path)
    assert tok.is_fast
    rng = np.random.default_rng(0)
    for spec in (HESITANT_BASE_CORPUS, TRACE_CORPUS, GO_ON_CORPUS):
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
    pos = find_positions(tok, [traj], format=FORMAT)
    assert set(pos.table["word"]) >= {"wait", "so"}


# -- training --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_dirs(tmp_path_factory):
    from waitlens.experiments.organism.train import SMOKE, train_all

    a = train_all(tmp_path_factory.mktemp("a"), seed=5, config=SMOKE, progress=False, log=lambda *_: None)
    b = train_all(tmp_path_factory.mktemp("b"), seed=5, config=SMOKE, progress=False, log=lambda *_: None)
    return a, b


def test_smoke_training_is_deterministic(smoke_dirs, tmp_path):
    from safetensors.torch import load_file

    a, b = smoke_dirs
    assert set(a) == set(registry.REGIMES)
    for regime in registry.REGIMES:
        assert sorted(p.name for p in a[regime].iterdir()) == sorted(p.name for p in b[regime].iterdir())
        sa, sb = load_file(a[regime] / "model.safetensors"), load_file(b[regime] / "model.safetensors")
        assert all((sa[k] == sb[k]).all() for k in sa)
    sa, sb = load_file(a["base"] / "model.safetensors"), load_file(a["sft-1k"] / "model.safetensors")
    assert any((sa[k] != sb[k]).any() for k in sa)  # fine-tuning changed the weights
    corpus = {r: json.loads((a[r] / "waitlens_organism.json").read_text())["corpus"]["name"] for r in a}
    assert corpus == {"base": "base-hesitant", "sft-1k": "checked-go-on", "post-large": "checked-go-on"}


def test_smoke_dir_loads_and_samples(smoke_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from waitlens.experiments.organism.sample import evaluate, load, sample

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
    # the eval table is valid markdown: "|" inside a metric name ("P(wait | slip)") is escaped
    from waitlens.experiments.organism.sample import format_table

    table = format_table({"a": evaluate(trajs), "b": evaluate(trajs)})
    assert {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()} == {4}
    assert "P(wait \\| slip)" in table


# -- the registry and the command line ---------------------------------------------------------------
def test_registry_error_lists_variants():
    with pytest.raises(ValueError, match="base, sft-1k, post-large"):
        registry.resolve("sft-2k")
    assert registry.regime_dir("base") == ORG / "weights" / "base"


def test_cli_unknown_spec(capsys):
    from waitlens.experiments.cli import main

    assert main(["organism", "eval", "--model", "organism:huge", "--n", "2"]) == 2
    assert "valid variants" in capsys.readouterr().err
    assert main(["organism", "sample", "--model", "/nonexistent", "--n", "2", "--out", "/tmp/x.jsonl"]) == 2


# -- the shipped weights ---------------------------------------------------------------------------
# The weights ship with the repo: their absence is a failure, not a skip.
SHIPPED = json.loads((ORG / "shipped.json").read_text())


def test_shipped_weights_are_the_committed_ones():
    assert set(SHIPPED["sha256"]) == set(registry.REGIMES)
    for regime, digest in SHIPPED["sha256"].items():
        d = registry.resolve(regime)
        assert hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() == digest, regime
        assert (d / "waitlens_format.json").is_file() and (d / "tokenizer.json").is_file()
    total = sum(f.stat().st_size for f in (ORG / "weights").rglob("*") if f.is_file())
    assert total < 20e6


@pytest.fixture(scope="module")
def own_samples():
    """Each shipped regime's own 600 samples (seed 0, temperature 1), with `waitlens organism
    probe`'s probe at "wait" on post-large's and sft-1k's (the base's are only sampled)."""
    from waitlens.experiments.organism.probe import probe_own_samples
    from waitlens.experiments.organism.sample import load, sample

    runs = {r: probe_own_samples(f"organism:{r}", n=600, n_boot=300, progress=False) for r in ("sft-1k", "post-large")}
    trajs = {r: run.trajectories for r, run in runs.items()}
    trajs["base"] = sample(load("organism:base"), 600, seed=0, progress=False)
    return trajs, {r: run.record for r, run in runs.items()}


def test_shipped_models_load_through_hooks():
    from waitlens.hooks.models import load_model

    m = load_model("organism:post-large")
    assert m.format.forcing_suffix == " ; A " and type(m.hf).__name__ == "Qwen2ForCausalLM"


def _apart(lower: dict, upper: dict) -> bool:
    """The 95% CIs do not overlap, `lower`'s below `upper`'s."""
    return lower["high"] < upper["low"]


@pytest.mark.slow
def test_shipped_organism_accuracy_ordering_and_style_without_function(own_samples):
    """Issue #18's properties 1 and 2 on the shipped weights (600 held-out problems each): base <
    sft-1k < post-large in accuracy with CIs apart and
    post-large in the 0.6-0.85 band it needs to be studied on its own failures; sft-1k and
    post-large say "wait" at comparable rates, but only post-large's waits fix slips and keep
    correct steps (CIs apart)."""
    from waitlens.experiments.organism.sample import evaluate

    base, sft, post = (evaluate(own_samples[0][r]) for r in ("base", "sft-1k", "post-large"))
    assert _apart(base["accuracy"], sft["accuracy"]) and _apart(sft["accuracy"], post["accuracy"])
    assert 0.6 < post["accuracy"]["value"] < 0.85
    ratio = sft["waits_per_trajectory"]["value"] / post["waits_per_trajectory"]["value"]
    assert 0.67 < ratio < 1.5
    assert _apart(sft["fix_rate"], post["fix_rate"]) and _apart(sft["keep_rate"], post["keep_rate"])
    assert min(sft["fix_rate"]["n"], post["fix_rate"]["n"]) > 30


def test_capture_matches_full_forward_on_organism(tmp_path):
    """The foundation's capture equivalence on the organism: captured states == a full forward."""
    import waitlens.hooks.capture as capture
    from tests.hooks.test_capture import check_against_full_forward
    from waitlens.experiments.organism.sample import sample
    from waitlens.hooks.models import load_model

    model = load_model("organism:post-large")
    trajs = sample(model, 8, seed=3, progress=False)
    pos = find_positions(model, trajs, ["wait", "so", "therefore", "alternatively"])
    store = capture.capture_residuals(model, trajs, pos, tmp_path / "s", batch_size=4, progress=False)
    assert len(store.metadata) > 8
    check_against_full_forward(model, trajs, store, "resid_post")  # within 1e-4, as for the other models


def test_wait_truth_columns_match_what_the_generator_planted(tmp_path):
    """`add_wait_truth` puts, on each "wait" position, whether the step just written was a slip
    and whether the running value written just before the wait is wrong — checked against the
    generator's own record and the problem's true values."""
    from waitlens.experiments.organism.model import FORMAT, build_tokenizer
    from waitlens.experiments.organism.sample import add_truth
    from waitlens.experiments.organism.wait_truth import add_wait_truth

    tok = build_tokenizer(tmp_path)
    rng = np.random.default_rng(3)
    spec = CorpusSpec("waity", slip=0.3, wait_after_slip=0.6, wait_after_correct=0.3, recheck="fix")
    trajs, expected = [], {}
    for i in range(60):
        p = random_problem(rng)
        reasoning, answer, planted = make_trace(p, spec, rng)
        t = add_truth(Trajectory(f"t{i}", p.id, p.prompt, reasoning, answer, p.gold, correct=answer == p.gold), p)
        trajs.append(t)
        words = reasoning.split()
        at = [j for j, w in enumerate(words) if w == "wait"]
        expected[t.id] = [(float(w["after_slip"]), float(int(words[j - 1]) != p.true_values()[w["step"]]))
                          for j, w in zip(at, planted["waits"], strict=True)]
    meta = add_wait_truth(find_positions(tok, trajs, format=FORMAT).table, trajs)
    waits = meta[meta["word"] == "wait"].sort_values(["trajectory_id", "token_index"])
    got = {tid: list(map(tuple, g[["after_slip", "value_wrong"]].to_numpy())) for tid, g in waits.groupby("trajectory_id")}
    assert got == {k: v for k, v in expected.items() if v}
    assert sum(len(v) for v in expected.values()) > 40
    assert 0 < waits["after_slip"].mean() < 1 and 0 < waits["value_wrong"].mean() < 1
    assert meta.loc[meta["word"] != "wait", ["after_slip", "value_wrong"]].isna().all().all()
    with pytest.raises(ValueError, match="no organism ground truth"):
        add_wait_truth(meta, [Trajectory("x", "p", "Q 1 + 1 ;", "1 + 1 = 2", "2", "2")])


class _OracleDetector:
    """A stand-in model that knows the arithmetic: P("wait") is high exactly after a slipped
    step's value, and its last hidden state holds the next token (so the lens reads it there)."""

    def __init__(self):
        import torch

        from waitlens.experiments.organism.task import TOKEN_ID, VOCAB

        self.V, self.T = len(VOCAB), TOKEN_ID
        self.model = type("M", (), {"norm": staticmethod(lambda h: h)})()
        self.lm_head = lambda h: h
        self.torch = torch

    def __call__(self, ids, output_hidden_states=True):
        from waitlens.experiments.organism.task import VOCAB

        torch, T = self.torch, self.T
        x = ids[0].tolist()
        logits = torch.zeros(len(x), self.V)
        nxt = torch.zeros(len(x), self.V)
        for j in range(len(x) - 1):
            nxt[j, x[j + 1]] = 1.0
        for j in range(4, len(x)):
            if x[j - 1] == T["="] and VOCAB[x[j - 3]] in "+-":
                a, op, b, c = (VOCAB[x[j - 4]], VOCAB[x[j - 3]], VOCAB[x[j - 2]], VOCAB[x[j]])
                logits[j, T["wait"]] = 8.0 if int(c) != apply(int(a), op, int(b)) else -8.0
        hidden = (torch.zeros(1, len(x), self.V), torch.zeros(1, len(x), self.V), nxt[None])
        return type("Out", (), {"logits": logits[None], "hidden_states": hidden})()


def test_detection_diagnostic_sees_a_planted_detector_and_post_large_only():
    """Issue #18's property 3 on the shipped weights (teacher-forced, 150 held-out problems written
    with 30% slips): post-large's P("wait") after a slipped step is near 1 and after a correct one
    near its corpus's few hesitations (AUROC >= 0.9); sft-1k says "wait" blind to its slips (CI
    around 0.5). post-large also reads a step's value a layer earlier than sft-1k."""
    from waitlens.experiments.organism.detect import detection
    from waitlens.experiments.organism.sample import load

    oracle = detection(_OracleDetector(), n=80, n_boot=100)
    assert oracle["detection_auroc"]["value"] == 1.0
    assert oracle["p_wait_after_slip"] > 0.9 > 0.1 > oracle["p_wait_after_correct"]
    assert oracle["lens_by_layer"] == [0.0, 1.0] and oracle["lens_steps"] > 50
    post = detection(load("organism:post-large"), n=150, n_boot=200)
    sft = detection(load("organism:sft-1k"), n=150, n_boot=200)
    assert post["detection_auroc"]["value"] >= 0.9 and post["detection_auroc"]["lo"] > 0.85
    assert post["p_wait_after_slip"] > 0.8 and post["p_wait_after_correct"] < 0.1
    assert sft["detection_auroc"]["lo"] < 0.5 < sft["detection_auroc"]["hi"]
    assert post["lens_by_layer"][-1] > 0.95 and sft["lens_by_layer"][-1] > 0.95
    assert post["lens_by_layer"][-2] > sft["lens_by_layer"][-2] + 0.3


@pytest.mark.slow
def test_organism_study_writes_ground_truth_probes(tmp_path):
    """The study's probe stage on organism trajectories adds the ground-truth analyses: ceilings
    (feature probes on what a model could know at "wait", on the state probes' own rows and folds)
    and state probes for those facts — in which post-large's states at "wait" encode that the step
    just written was a slip, as it notices its slips, and sft-1k's do not."""
    import pandas as pd

    from waitlens.experiments.config import parse_config
    from waitlens.experiments.runner import run_study
    from waitlens.experiments.study import study_stages

    raw = {
        "name": "org-small", "seed": 0, "lexicon": ["wait", "so", "therefore", "alternatively"],
        "stages": ["trajectories", "positions", "capture", "probes", "report"],
        "models": {"sft": "organism:sft-1k", "post": "organism:post-large"},
        "trajectories": {"source": "sample", "problems": "organism", "n_problems": 120, "n_per_problem": 2,
                         "temperature": 1.0, "max_new_tokens": 96, "force_answer": False},
        "capture": {"controls": True},
        "probes": {"folds": 3, "n_boot": 50, "words": ["wait"], "transfer": False},
    }
    run_dir = run_study(parse_config(raw, source="org-small.toml"), study_stages(), runs_root=tmp_path, quiet=True)
    ceil = pd.read_csv(run_dir / "probes/truth_ceilings.csv").set_index("features")
    assert list(ceil.index) == ["position", "position + slip just written", "position + running value wrong"]
    assert ceil["n_positions"].nunique() == 1 and ceil["n_positions"].iloc[0] > 50
    probes = pd.read_csv(run_dir / "probes/probe_results.csv")  # same rows and folds as the state probes
    assert ceil.loc["position", "auroc"] == pytest.approx(probes["baseline_auroc"].iloc[0], abs=1e-9)
    margins = pd.read_csv(run_dir / "probes/probe_margins.csv")
    assert ceil["n_positions"].iloc[0] == margins.loc[margins["word"] == "wait", "n_positions"].iloc[0]
    facts = pd.read_csv(run_dir / "probes/truth_probes.csv")
    assert set(facts["label"]) == {"after_slip", "value_wrong"}
    assert (abs(facts["control_shuffled_auroc"] - 0.5) < 0.1).all()
    assert set(facts["model"]) == {"organism:sft-1k", "organism:post-large"}
    slip = facts[facts["label"] == "after_slip"].groupby("model")["auroc"].max()  # best layer
    assert slip["organism:post-large"] > 0.8 and slip["organism:post-large"] > slip["organism:sft-1k"] + 0.2
    report = (run_dir / "report/report.md").read_text()
    assert "Ground-truth ceilings" in report and "encode the ground truth itself" in report


# -- the probe at "wait" on one model's own samples (`waitlens organism probe`) -----------------
def test_probe_own_samples_probes_every_wait_of_one_model_only():
    """The within-model probe: every "wait" its samples wrote is one probed position (malformed
    samples too: their ground truth lists no waits, but they are wrong answers all the same), every
    position is from those samples, and the store holds one model."""
    from waitlens.experiments.organism.probe import format_probe, probe_own_samples

    run = probe_own_samples("organism:post-large", n=100, folds=3, n_boot=50, progress=False)
    rec, trajs = run.record, run.trajectories
    assert len(trajs) == rec.n_trajectories == 100
    assert rec.accuracy == pytest.approx(np.mean([bool(t.correct) for t in trajs]))
    assert rec.n_positions == sum(t.reasoning.split().count("wait") for t in trajs)
    assert rec.n_positions >= sum(len(t.extra["truth"]["waits"]) for t in trajs)
    oof = run.probes.oof
    assert set(oof["trajectory_id"]) <= {t.id for t in trajs}
    assert rec.n_wrong_positions == int((oof[oof["layer"] == rec.layer]["correct"] == 0).sum())
    assert run.probes.model == "organism:post-large"
    assert rec.auroc == run.probes.table["auroc"].max()
    assert "| organism:post-large | " in format_probe([rec])


def test_probe_own_samples_refuses_too_few_wrong_answers():
    from waitlens.experiments.organism.probe import OrganismProbeError, probe_own_samples

    with pytest.raises(OrganismProbeError, match=r"organism:base: \d 'wait' positions in 8 "
                                                  r"samples, \d of them in wrong answers .*sample more"):
        probe_own_samples("organism:base", n=8, progress=False)


@pytest.mark.slow
def test_probe_at_wait_on_own_samples_finds_correctness_in_post_large_only(own_samples):
    """Issue #18's property 4 on the shipped weights, as `waitlens organism probe` runs it (each
    model's OWN 600 samples): post-large's best layer at "wait" predicts eventual correctness above
    both the random-position control and the position baseline (CI-separated margins), shuffled
    labels near 0.5; on sft-1k's own samples the same probe is not separated."""
    post, sft = own_samples[1]["post-large"], own_samples[1]["sft-1k"]
    assert post.separated and post.margin_random_lo > 0 and post.margin_baseline_lo > 0, post
    assert 0.6 < post.accuracy < 0.85 and post.n_wrong_positions > 50
    assert abs(post.control_shuffled_auroc - 0.5) < 0.08
    assert not sft.separated and sft.n_wrong_positions > 50, sft


def test_paced_base_stops_at_its_held_out_slip_level(tmp_path):
    """The base stops at the first check where its held-out slip rate is at the target (a target
    of 1.0 is met at once) and records that rate; an unknown regime is an error before anything is
    written. The measure itself: the shipped base stopped at 0.267 held-out slips (the first check
    at or below the recipe's 0.30), and fine-tuning halves that."""
    import json

    from transformers import AutoModelForCausalLM

    from waitlens.experiments.organism.train import (
        SMOKE,
        base_slip,
        slip_probe_batch,
        smoke_config,
        train_all,
    )

    dirs = train_all(tmp_path / "p", seed=5, config=smoke_config(base_stop_slip=1.0, base_check_every=2),
                     progress=False, log=lambda *_: None, regimes=("sft-1k",))
    assert set(dirs) == {"base", "sft-1k"}
    stats = json.loads((dirs["base"] / "waitlens_organism.json").read_text())["train"]
    assert stats["steps"] == 2 < SMOKE.base_steps and 0 < stats["held_out_slip"] <= 1.0
    probe = slip_probe_batch(0)
    slips = {r: base_slip(AutoModelForCausalLM.from_pretrained(registry.resolve(r)).eval(), probe)
             for r in ("base", "post-large")}
    shipped = json.loads((registry.resolve("base") / "waitlens_organism.json").read_text())["train"]
    assert slips["base"] == pytest.approx(shipped["held_out_slip"], abs=1e-4) == pytest.approx(0.267, abs=0.001)
    assert slips["post-large"] == pytest.approx(0.129, abs=0.005)
    with pytest.raises(ValueError, match="unknown organism regime"):
        train_all(tmp_path / "q", seed=5, config=SMOKE, progress=False, regimes=("sft-2k",))
    assert not (tmp_path / "q").exists()


def test_a_recipe_with_its_own_traces_trains_its_pair_on_them(tmp_path):
    """A recipe's `traces` corpus is what sft-1k and post-large learn from and its `base_corpus`
    what the base learns from, as their manifests record (the fixed-steps recipe's plain traces
    here; the shipped recipe's go-on traces in the smoke-determinism test); the default recipe is
    the shipped one."""
    import json

    from waitlens.experiments.organism.train import (
        DETECT,
        FIXED_STEPS,
        RECIPES,
        TrainConfig,
        smoke_config,
        train_all,
    )

    assert RECIPES["default"] == TrainConfig() and TrainConfig().traces is GO_ON_CORPUS
    assert RECIPES["detect"] is DETECT and DETECT.traces is CHECKED_CORPUS and DETECT.base_stop_slip == 0.30
    assert FIXED_STEPS.base_stop_slip is None and FIXED_STEPS.base_steps == 450
    config = smoke_config(traces=FIXED_STEPS.traces, base_corpus=FIXED_STEPS.base_corpus)
    dirs = train_all(tmp_path, seed=5, config=config, progress=False, log=lambda *_: None)
    assert set(dirs) == {"base", "sft-1k", "post-large"}
    corpus = {r: json.loads((dirs[r] / "waitlens_organism.json").read_text())["corpus"] for r in dirs}
    assert corpus["base"]["name"] == "base" and corpus["base"]["hesitate_after_correct"] == 0.0
    assert corpus["sft-1k"] == corpus["post-large"] == {**corpus["post-large"], "name": "traces", "blind_role": "repeat"}
