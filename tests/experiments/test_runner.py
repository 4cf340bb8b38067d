"""The study runner end to end on two tiny models: every stage runs, finished stages are
skipped, a run killed mid-capture resumes without redoing finished shards, and its final
tables equal those of an uninterrupted run."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import make_tiny_qwen, study_trajectories
from waitlens.experiments.config import parse_config
from waitlens.experiments.runner import read_manifest, run_study
from waitlens.experiments.study import study_stages
from waitlens.traces import Trajectory, save_trajectories


def _trajectories(n_problems: int = 10) -> list[Trajectory]:
    return study_trajectories(n_problems)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    a = make_tiny_qwen(root / "a", layers=2, d_model=32, seed=1)
    b = make_tiny_qwen(root / "b", layers=2, d_model=32, seed=2)
    save_trajectories(_trajectories(), root / "t.jsonl")
    raw = {
        "name": "tiny", "seed": 0, "device": "cpu", "lexicon": ["wait", "so", "therefore", "hmm"],
        "models": {"sft": str(a), "post": str(b)},
        "trajectories": {"source": "jsonl", "path": str(root / "t.jsonl")},
        "capture": {"batch_size": 4},
        "tokens": {"min_count": 2, "n_boot": 50},
        "answers": {"every": 4, "max_trajectories": 8},
        "probes": {"folds": 3, "n_boot": 50, "words": ["all"]},
        "patching": {"max_trajectories": 4, "window": [-1, 1], "metrics": ["kl", "gold_prob"]},
        "ablations": {"model": "post", "kinds": ["replace-wait", "shuffle-steps"], "max_trajectories": 6},
    }
    return root, parse_config(raw, source="tiny.toml")


@pytest.fixture(scope="module")
def clean_run(study):
    """One uninterrupted run of the whole study, shared: the first test checks it and its
    reruns, the kill test compares its resumed run with it."""
    root, cfg = study
    return run_study(cfg, study_stages(), runs_root=root / "runs", quiet=True)


def _tables(run_dir):
    return {p.relative_to(run_dir).as_posix(): pd.read_csv(p) for p in sorted(run_dir.glob("*/*.csv"))}


@pytest.mark.slow
def test_full_study_then_skip(study, clean_run):
    root, cfg = study
    run_dir = clean_run
    manifest = read_manifest(run_dir)
    assert [s for s, v in manifest["stages"].items() if v["status"] == "done"] == list(cfg.stages)
    assert all(v["seconds"] >= 0 for v in manifest["stages"].values())
    assert all(v["cpu_seconds"] >= 0 for v in manifest["stages"].values())
    assert manifest["stages"]["probes"]["cpu_seconds"] > 0  # this process's CPU time per stage
    for f in ("tokens/token_table.csv", "answers/alignment.json", "probes/probe_results.csv",
              "patching/patch_effects.csv", "ablations/ablation_effects.csv", "report/report.md"):
        assert (run_dir / f).is_file(), f
    report = (run_dir / "report/report.md").read_text()
    assert "## Patching wait-position states between models" in report
    assert "CPU time per stage (the waitlens process): trajectories " in report
    assert not list(run_dir.glob("*.partial")), "no half-written stage left behind"

    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name not in ("manifest.json", ".lock")}
    run_study(cfg, study_stages(), runs_root=root / "runs", quiet=True)  # everything done: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    run_study(cfg, study_stages(), runs_root=root / "runs", quiet=True, force=["report"])
    assert (run_dir / "report/report.md").stat().st_mtime_ns != mtimes[run_dir / "report/report.md"]
    assert (run_dir / "probes/probe_results.csv").stat().st_mtime_ns == mtimes[run_dir / "probes/probe_results.csv"]


@pytest.mark.slow
def test_killed_capture_resumes_and_matches(study, clean_run, monkeypatch):
    root, cfg = study
    clean = clean_run

    import importlib

    capture_mod = importlib.import_module("waitlens.hooks.capture")  # the module (hooks.capture is a function)

    real = capture_mod.write_shard
    calls = {"n": 0}

    def dying_write_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-capture")
        return real(*args, **kwargs)

    monkeypatch.setattr(capture_mod, "write_shard", dying_write_shard)
    cfg.capture.batch_size = 4
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, study_stages(), runs_root=root / "killed", quiet=True)
    run_dir = root / "killed" / cfg.name
    manifest = read_manifest(run_dir)
    assert manifest["stages"]["positions"]["status"] == "done"
    assert "capture" not in manifest["stages"]
    first = sorted((run_dir / "capture").rglob("shard-00000.safetensors"))
    assert first, "the first shard was committed before the kill"
    inode = {p: p.stat().st_ino for p in first}

    monkeypatch.setattr(capture_mod, "write_shard", real)
    run_study(cfg, study_stages(), runs_root=root / "killed", quiet=True)
    assert {p: p.stat().st_ino for p in first} == inode, "finished shards were not redone"
    a, b = _tables(clean / ""), _tables(run_dir)
    assert a.keys() == b.keys()
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)
    assert json.loads((clean / "answers/alignment.json").read_text()) == json.loads(
        (run_dir / "answers/alignment.json").read_text())


def test_config_of_another_run_is_refused(study):
    root, cfg = study
    run_study(cfg, study_stages(), runs_root=root / "other", quiet=True, only=["trajectories"])
    changed = parse_config({**cfg.to_dict(), "seed": 1}, source="x.toml")
    with pytest.raises(ValueError, match=r"holds a run of a different study \(seed: 0 -> 1\)"):
        run_study(changed, study_stages(), runs_root=root / "other", quiet=True)


def test_stage_the_data_cannot_support_is_skipped_with_its_reason(study):
    root, cfg = study
    only_correct = [t for t in _trajectories() if t.id.endswith("-0")]
    save_trajectories(only_correct, root / "correct.jsonl")
    raw = {**cfg.to_dict(), "name": "one-class", "trajectories": {"source": "jsonl", "path": str(root / "correct.jsonl")},
           "stages": ["trajectories", "positions", "capture", "tokens", "probes", "report"]}
    run_dir = run_study(parse_config(raw, source="x.toml"), study_stages(), runs_root=root / "skip", quiet=True)
    stages = read_manifest(run_dir)["stages"]
    assert stages["tokens"]["status"] == stages["probes"]["status"] == "skipped"
    assert "single class" in stages["probes"]["summary"]["reason"]
    assert "trajectories are correct" in stages["tokens"]["summary"]["reason"]
    assert stages["report"]["status"] == "done"
    assert "## Stages the data could not support" in (run_dir / "report/report.md").read_text()
