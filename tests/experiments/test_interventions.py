"""Forced-wait interventions: the re-run keeps its prefix and carries the word where recorded;
fix/break rates and their problem-bootstrap CIs; on the organism, the planted behaviour is
recovered (post-large re-checks and fixes, sft-1k changes values blindly) and the ground truth
agrees with the graded change; bad input is one clear error with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from waitlens.experiments.organism.interventions import step_boundaries
from waitlens.probes.interventions import change_rates, compare_models


def test_organism_step_boundaries_end_each_step_before_its_connective():
    r = "3 + 7 = 0 ; 0 - 8 = 2 wait 0 - 8 = 2 so 2 + 6 = 8"
    cuts = step_boundaries(r)
    assert [r[:c].split()[-1] for c in cuts] == ["0", "2", "2"]
    assert [r[c:].split()[0] for c in cuts] == [";", "wait", "so"]
    assert step_boundaries("3 + 7 = 0") == []


def test_generic_step_boundaries():
    from waitlens.hooks.interventions import step_boundaries as generic

    r = "First, 2 + 2 = 4. Then 4 + 1 = 5.\n\nSo it is 5."
    assert [r[c:].lstrip()[:4] for c in generic(r)] == ["Then", "So i"]


def test_change_rates_count_and_bootstrap_by_problem():
    rows = pd.DataFrame({
        "model": ["a"] * 8 + ["b"] * 8,
        "problem_id": [f"p{i // 2}" for i in range(8)] * 2,
        "before_correct": [0, 0, 0, 0, 1, 1, 1, 1] * 2,
        "after_correct": [1, 1, 1, 0, 1, 1, 1, 0] + [0, 0, 0, 1, 0, 0, 1, 1],
    })
    r = change_rates(rows, n_boot=200, seed=0).set_index(["model", "metric"])
    assert r.loc[("a", "fix_rate"), "value"] == 0.75 and r.loc[("a", "break_rate"), "value"] == 0.25
    assert r.loc[("b", "fix_rate"), "value"] == 0.25 and r.loc[("b", "break_rate"), "value"] == 0.5
    assert r.loc[("a", "delta_accuracy"), "value"] == 0.25
    assert r.loc[("a", "unchanged"), "value"] == 0.5
    assert r.loc[("a", "fix_rate"), "n_fixed"] == 3 and r.loc[("a", "fix_rate"), "n_problems"] == 4
    assert (r["lo"] <= r["value"] + 1e-12).all() and (r["value"] <= r["hi"] + 1e-12).all()
    c = compare_models(rows, "a", "b", n_boot=200, seed=0).set_index("metric")
    assert c.loc["fix_rate", "diff"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def organism_pair():
    from waitlens.experiments.organism.sample import load

    return {name: load(f"organism:{name}") for name in ("post-large", "sft-1k")}


def _sample(model, n, seed=0):
    from waitlens.experiments.commands.sample import read_problems
    from waitlens.experiments.organism.sample import add_truth
    from waitlens.experiments.organism.task import Problem
    from waitlens.hooks.generate import generate_trajectories

    trajs = generate_trajectories(model, read_problems("organism", n, seed), temperature=1.0, seed=seed,
                                  max_new_tokens=96, batch_size=64, model_name=model.spec)
    for i, t in enumerate(trajs):
        t.id = f"{t.id}-{i}"
        add_truth(t, Problem.parse_prompt(t.prompt))
    return trajs


@pytest.fixture(scope="module")
def post_large_40(organism_pair):
    """40 of post-large's trajectories, sampled once for both cut points (force_wait only reads them)."""
    return _sample(organism_pair["post-large"], 40)


@pytest.mark.parametrize("at", ["end", "steps"])
def test_rerun_keeps_its_prefix_and_the_word_sits_at_its_offset(organism_pair, post_large_40, at):
    from waitlens.experiments.organism.interventions import step_boundaries as org_steps
    from waitlens.hooks.interventions import force_wait

    model = organism_pair["post-large"]
    trajs = post_large_40
    res = force_wait(model, trajs, at=at, n=2, max_new_tokens=96, seed=0, boundaries=org_steps)
    assert len(res) >= 35 and all(r.word == "wait" for r in res)  # the organism has no "Wait"
    by_id = {t.id: t for t in trajs}
    for r in res:
        t, re_ = by_id[r.trajectory_id], r.rerun
        prefix = t.reasoning[: r.cut].rstrip()
        assert re_.reasoning.startswith(prefix)
        offs = re_.extra["forced_waits"]
        assert offs[0] == len(prefix) + 1 and re_.reasoning[offs[0]:offs[0] + 4] == "wait"
        assert all(re_.reasoning[o:o + 4] == "wait" for o in offs) and 1 <= len(offs) <= 2
        assert re_.extra["intervention"] == {"of": t.id, "at": at, "cut": r.cut, "word": "wait", "n": 2}
        assert re_.correct == (re_.answer == t.gold)


def test_bad_intervention_settings(organism_pair):
    from waitlens.hooks.interventions import InterventionError, force_wait

    with pytest.raises(InterventionError, match=r"^--at must be one of end, steps, got 'middle'$"):
        force_wait(organism_pair["sft-1k"], [], at="middle")
    with pytest.raises(InterventionError, match=r"^--n \(forced words per trajectory\) must be a whole number >= 1, got 0$"):
        force_wait(organism_pair["sft-1k"], [], n=0)


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    from waitlens.experiments.cli import main

    out = tmp_path / "iv"
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"id": 1}\n')
    assert main(["intervene", "--model", "organism:sft-1k", "--trajectories", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "t.jsonl:1: missing key(s)" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
    assert main(["sample", "--model", "organism:sft-1k", "--problems", "organism", "--out", str(tmp_path / "s.jsonl"),
                 "--max-thinking-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "waitlens sample: error: max_thinking_tokens must be a whole number >= 1 (or absent), got 0"
    assert not (tmp_path / "s.jsonl").exists()


def test_engine_vllm_without_vllm_names_the_extra(tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    from waitlens.experiments.cli import main
    from waitlens.experiments.config import parse_config
    from waitlens.hooks.vllm_engine import EngineError, load_engine

    with pytest.raises(EngineError) as e:
        load_engine("vllm", "smollm2")
    assert "\n" not in str(e.value) and "pip install 'waitlens[vllm]'" in str(e.value)
    assert main(["sample", "--model", "organism:sft-1k", "--problems", "organism", "--engine", "vllm",
                 "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "waitlens[vllm]" in capsys.readouterr().err and not (tmp_path / "s.jsonl").exists()
    models = {"post": "organism:post-large", "sft": "organism:sft-1k"}
    cfg = parse_config({"models": models, "trajectories": {"engine": "vllm"}})
    assert cfg.trajectories.engine == "vllm" and "interventions" not in cfg.stages  # opt-in stage
    with pytest.raises(ValueError, match="trajectories.engine"):
        parse_config({"models": models, "trajectories": {"engine": "vlm"}})
    with pytest.raises(ValueError, match="trajectories.max_thinking_tokens must be at least 1, got 0"):
        parse_config({"models": models, "trajectories": {"max_thinking_tokens": 0}})


@pytest.mark.slow
def test_forced_wait_recovers_the_organism_ground_truth(organism_pair, tmp_path):
    """Must-show 4: 400 trajectories per model, a forced wait at the end of each. post-large's
    break rate is below sft-1k's with CIs apart (paired too): sft-1k's re-checks change right values
    blindly, as its ground truth says; fix rates are reported (post-large's few wrong answers are
    mostly slipped borrows, the blind spot it cannot fix); the ground truth's change agrees with the
    graded change, and post-large's fixes are slips it re-checked right."""
    from waitlens.experiments.analyses.interventions import interventions_to_dir

    runs = [(name, m, _sample(m, 400)) for name, m in organism_pair.items()]
    s = interventions_to_dir(runs, tmp_path, at="end", max_new_tokens=96, seed=0, n_boot=500)
    pl, sft = s["models"]["post-large"], s["models"]["sft-1k"]
    assert pl["break_rate"][2] < sft["break_rate"][1], (pl["break_rate"], sft["break_rate"])  # CIs apart
    brk = next(c for c in s["comparison"] if c["metric"] == "break_rate")
    assert brk["separated"] and brk["diff"] < 0
    for m in (pl, sft):
        assert 0 <= m["fix_rate"][0] <= 1 and m["n_wrong_before"] > 0 and m["n_right_before"] > 0
        assert m["truth_agrees_with_grading"] >= 0.98
    assert sft["mechanisms"]["break"].get("correct step re-checked to a wrong value", 0) >= 0.7 * sft["n_broken"]
    fixes = pl["mechanisms"]["fix"]  # post-large fixes what it re-checks: slips
    assert fixes.get("slip re-checked to the right value", 0) >= 0.5 * pl["n_fixed"] > 0
    assert pl["forced_wait_rechecked"] >= 0.95
    rates = pd.read_csv(tmp_path / "rates.csv")
    assert set(rates["metric"]) >= {"fix_rate", "break_rate", "unchanged", "delta_accuracy"}
    assert (tmp_path / "interventions.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["at"] == "end"
    changes = pd.read_csv(tmp_path / "changes.csv")
    assert len(changes) == 800 and np.isin(changes["change"], ["fix", "break", "kept-right", "kept-wrong"]).all()
