"""The replica studies end to end: the GPU config's dry run and the replica pair's study on
real R1 traces (their own file: the two longest replica tests run beside test_replica.py's
others under --dist loadfile)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hooks.test_replica import R1_TRACES, S1, needs_realdata

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the dry run --------------------------------------------------------------------------------
@pytest.mark.slow
def test_dry_run_config_swaps_models_and_caps_work():
    needs_realdata()
    from waitlens.experiments.analyses.replica import dry_run_config
    from waitlens.experiments.config import load_config
    from waitlens.hooks.replica import replica_info

    cfg = load_config("s1-vs-r1-1.5b.toml")
    dry = dry_run_config(cfg)
    assert dry.name == "s1-vs-r1-1.5b-dry-run" and dry.device == "cpu"
    for name, m in dry.models.items():
        assert replica_info(m.spec)["replica_of"] == cfg.models[name].spec
        assert m.format == cfg.models[name].format and m.dtype == "float32"
    t = dry.trajectories
    assert (t.problems, Path(t.path).name) == ("jsonl", "math500_test.jsonl")  # MATH-500 from realdata, no hub
    assert t.n_problems <= 6 and t.max_new_tokens <= 48 and dry.patching.max_trajectories <= 4
    assert cfg.name == "s1-vs-r1-1.5b" and cfg.models["sft"].spec == S1  # the original is untouched


@pytest.mark.slow
def test_dry_run_of_the_gpu_config_runs_end_to_end(tmp_path):
    """#13 item 3: `waitlens run s1-vs-r1-1.5b.toml --dry-run` completes on a CPU."""
    needs_realdata()
    from waitlens.experiments.cli import main

    rc = main(["run", "s1-vs-r1-1.5b.toml", "--dry-run", "--runs", str(tmp_path), "--quiet"])
    assert rc == 0
    run = tmp_path / "s1-vs-r1-1.5b-dry-run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"trajectories", "positions", "capture", "tokens", "answers", "probes",
                                       "patching", "ablations", "report"}
    assert all(s["status"] in ("done", "skipped") for s in manifest["stages"].values())
    assert "These models are replicas" in (run / "report" / "report.md").read_text()


# Records of the R1 GSM8K file for the replica study test (the shipped config reads the first 30):
# patching takes the first trajectory with a wait, #29 (short, one wait) instead of #8 (6,613
# characters, 11 waits); waits in correct (#29, #13, #27) and incorrect (#21, #19) problems for
# the wait probe's folds; #0-#7 are short, 3 of them incorrect.
REPLICA_RECORDS = [29, 21, 0, 1, 2, 3, 4, 5, 6, 7, 13, 27, 19]


def _small_replica_config(tmp_path: Path) -> Path:
    """The shipped s1-vs-r1-replica.toml (same models, stages and settings) on REPLICA_RECORDS,
    with fewer bootstrap draws and forced-answer curves on the first 4 trajectories instead of 12
    (#29 and #21 have waits, in a correct and an incorrect problem)."""
    from waitlens.experiments.config import CONFIG_DIR

    lines = R1_TRACES.read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "r1_small.jsonl").write_text("".join(lines[i] for i in REPLICA_RECORDS), encoding="utf-8")
    text = (CONFIG_DIR / "s1-vs-r1-replica.toml").read_text(encoding="utf-8")
    for old, new in (('path = "../shared/realdata/traces/r1distill_qwen1.5b_gsm8k500.jsonl"',
                      f'path = "{tmp_path / "r1_small.jsonl"}"'),
                     ("limit = 30 ", "limit = 0 "),
                     ("max_trajectories = 12", "max_trajectories = 4"),
                     ("[capture]", "[tokens]\nn_boot = 100\n\n[probes]\nn_boot = 100\n\n[capture]")):
        assert text.count(old) == 1, old  # the shipped config still reads as this test expects
        text = text.replace(old, new)
    cfg = tmp_path / "s1-vs-r1-replica.toml"
    cfg.write_text(text, encoding="utf-8")
    return cfg


@pytest.mark.slow
def test_replica_study_runs_every_stage_on_real_traces(tmp_path):
    """#13 item 1: the replica pair on real R1 traces — every stage done (none skipped), patching
    rows in both directions for all three real-model metrics, a report that says 'replicas'."""
    needs_realdata()
    import pandas as pd

    from waitlens.experiments.cli import main

    rc = main(["run", str(_small_replica_config(tmp_path)), "--runs", str(tmp_path), "--quiet"])
    assert rc == 0
    run = tmp_path / "s1-vs-r1-replica"
    manifest = json.loads((run / "manifest.json").read_text())
    assert {k: v["status"] for k, v in manifest["stages"].items()} == {
        s: "done" for s in ("trajectories", "positions", "capture", "tokens", "answers", "probes", "patching",
                            "ablations", "report")}
    rows = pd.read_csv(run / "patching" / "patch_rows.csv.gz")
    assert rows["direction"].nunique() == 2
    for _, g in rows.groupby("direction"):
        assert set(g["metric"]) == {"forced_answer", "next_token_kl", "recheck"}
    report = (run / "report" / "report.md").read_text()
    assert "These models are replicas" in report and "The numbers test the pipeline, not the models" in report
