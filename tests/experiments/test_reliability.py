"""Issue #15: nothing lost, nothing silently wrong, no traceback. Each test reproduces one
defect found by trying to break waitlens (item numbers are the issue's) and checks the fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import make_tiny_qwen, study_trajectories, tiny_trajectory
from waitlens.experiments.config import ConfigError, parse_config
from waitlens.experiments.runner import RunError, RunLockedError, read_manifest, run_lock, run_study
from waitlens.experiments.study import split_by_model, study_stages
from waitlens.hooks.store import ActivationStore, StoreError, open_store
from waitlens.traces import Trajectory, load_trajectories, save_trajectories
from waitlens.traces.errors import WaitlensError

WAITLENS = str(Path(sys.executable).parent / "waitlens")


def _trajectories(n_problems: int = 8) -> list[Trajectory]:
    return study_trajectories(n_problems)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliab")
    make_tiny_qwen(root / "a", layers=2, d_model=32, seed=1)
    make_tiny_qwen(root / "b", layers=2, d_model=32, seed=2)
    save_trajectories(_trajectories(), root / "t.jsonl")
    return root


@pytest.fixture(scope="module")
def clean_run(root, tmp_path_factory):
    """One uninterrupted run of `_raw(root)` (its run directory, stdout and stderr), shared by
    the tests that compare with it, rerun a copy of it, or read its log."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        run_dir = run_study(parse_config(_raw(root), source="cfg.toml"), study_stages(),
                            runs_root=tmp_path_factory.mktemp("clean"), quiet=True)
    return run_dir, out.getvalue(), err.getvalue()


def _raw(root: Path, **over) -> dict:
    raw = {
        "name": "tiny", "seed": 0, "device": "cpu", "lexicon": ["wait", "so", "therefore", "hmm"],
        "models": {"sft": str(root / "a"), "post": str(root / "b")},
        "stages": ["trajectories", "positions", "capture", "probes"],
        "trajectories": {"source": "jsonl", "path": str(root / "t.jsonl")},
        "capture": {"batch_size": 4},
        "probes": {"folds": 3, "n_boot": 20, "words": ["all"], "transfer": False},
        "patching": {"source": "post", "target": "sft"}, "ablations": {"model": "post"},
    }
    raw.update(over)
    return raw


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {p.relative_to(run_dir).as_posix(): pd.read_csv(p) for p in sorted(run_dir.glob("*/*.csv"))}


# -- 1. a run name is a plain name; a directory that is not a run is never touched -------------
def test_1_name_escaping_runs_is_refused_and_nothing_is_deleted(root, tmp_path):
    victim = tmp_path / "v"
    (victim / "tokens").mkdir(parents=True)
    (victim / "tokens" / "notes.txt").write_text("mine")
    for name in (str(victim), "../v", "..", "a/b"):
        with pytest.raises(ConfigError, match="name must be a plain name"):
            parse_config(_raw(root, name=name), source="cfg.toml")
    cfg = parse_config(_raw(root, stages=["trajectories", "tokens"]), source="cfg.toml")
    cfg.name = str(victim)  # set in code, past the config check: the runner refuses it too
    with pytest.raises(RunError, match="not a plain name"):
        run_study(cfg, study_stages(), runs_root=tmp_path / "runs", quiet=True)
    cfg.name = "v"  # a plain name whose directory exists and is not a run directory
    with pytest.raises(RunError, match="is not a waitlens run directory"):
        run_study(cfg, study_stages(), runs_root=tmp_path, quiet=True)
    assert (victim / "tokens" / "notes.txt").read_text() == "mine"


# -- 2. one run at a time per run directory ------------------------------------------------------
def test_2_lock_refuses_a_second_holder(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released when the holder is done
        pass


@pytest.mark.slow
def test_2_two_concurrent_runs_second_exits_2_first_equals_uninterrupted(root, clean_run, tmp_path, capfd):
    """Two `waitlens run` on one run dir: the second exits 2 with 'in use by pid N' and changes
    nothing; the first completes and its tables equal an uninterrupted run's. The first is the
    installed command in its own process; the second is the same entry point in this process
    (another pid all the same; a process start costs ~6 s of CPU in imports)."""
    from waitlens.experiments.cli import main

    cfg_file = tmp_path / "par.toml"
    raw = _raw(root)
    cfg_file.write_text(_toml(raw))
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([WAITLENS, "run", str(cfg_file), "--runs", str(runs), "--quiet"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = runs / "tiny" / ".lock"
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # hold the first run mid-study while the second starts
    try:
        before = {p: p.stat().st_mtime_ns for p in (runs / "tiny").rglob("*")}
        capfd.readouterr()
        rc = main(["run", str(cfg_file), "--runs", str(runs), "--quiet"])
        err = capfd.readouterr().err
        after = {p: p.stat().st_mtime_ns for p in (runs / "tiny").rglob("*")}
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert rc == 2, err
    assert f"in use by pid {first.pid}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert after == before, "the second run changed nothing"
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    a, b = _tables(clean_run[0]), _tables(runs / "tiny")  # the same config, uninterrupted
    assert a.keys() == b.keys() and "probes/probe_results.csv" in a
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)


def _toml(raw: dict) -> str:
    lines, tables = [], []
    for k, v in raw.items():
        (tables if isinstance(v, dict) else lines).append((k, v))
    out = [f"{k} = {json.dumps(v)}" for k, v in lines]
    for k, v in tables:
        out.append(f"[{k}]")
        out += [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
    return "\n".join(out) + "\n"


def test_2_a_lost_trajectory_file_reruns_the_stage_instead_of_using_a_third_of_the_data(root, tmp_path):
    cfg = parse_config(_raw(root, stages=["trajectories", "positions"]), source="cfg.toml")
    run_dir = run_study(cfg, study_stages(), runs_root=tmp_path, quiet=True)
    (run_dir / "trajectories" / "post.jsonl").unlink()  # what two racing runs left behind
    run_study(cfg, study_stages(), runs_root=tmp_path, quiet=True)
    assert (run_dir / "trajectories" / "post.jsonl").is_file()
    n = len(pd.read_csv(run_dir / "positions" / "sft.csv"))
    assert n == len(pd.read_csv(run_dir / "positions" / "post.csv")) > 0


# -- 3. a resumed capture refuses other weights or another compute dtype ---------------------
def _kill_after(monkeypatch, n_shards: int):
    import importlib

    capture_mod = importlib.import_module("waitlens.hooks.capture")  # the module (hooks.capture is a function)

    real = capture_mod.write_shard
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_shards:
            raise KeyboardInterrupt("killed mid-capture")
        return real(*args, **kwargs)

    monkeypatch.setattr(capture_mod, "write_shard", dying)
    return lambda: monkeypatch.setattr(capture_mod, "write_shard", real)


def test_3_resume_refuses_another_dtype_and_other_weights(tmp_path, monkeypatch):
    from waitlens.hooks import capture_residuals, load_model
    from waitlens.traces import find_positions

    trajs = [tiny_trajectory(i) for i in range(6)]
    path = make_tiny_qwen(tmp_path / "m", layers=2, seed=3)
    m32 = load_model(str(path), device="cpu", dtype="float32")
    pos = find_positions(m32, trajs, ["wait", "so"])
    undo = _kill_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        capture_residuals(m32, trajs, pos, tmp_path / "S", shard_size=1, progress=False)
    undo()
    man = json.loads((tmp_path / "S" / "manifest.json").read_text())
    assert man["compute_dtype"] == "float32" and len(man["weights_sha256"]) == 64
    bf16 = load_model(str(path), device="cpu", dtype="bfloat16")
    with pytest.raises(StoreError, match=r"compute_dtype: 'float32' -> 'bfloat16'"):
        capture_residuals(bf16, trajs, pos, tmp_path / "S", shard_size=1, progress=False)
    make_tiny_qwen(path, layers=2, seed=4)  # other weights under the same spec
    other = load_model(str(path), device="cpu", dtype="float32")
    with pytest.raises(StoreError, match=rf"weights_sha256: '{man['weights_sha256']}' -> '[0-9a-f]{{64}}'"):
        capture_residuals(other, trajs, pos, tmp_path / "S", shard_size=1, progress=False)


# -- 4. jsonl `model` values must name the config's models ------------------------------------
def test_4_jsonl_model_values_must_match_names_or_specs():
    trajs = [Trajectory(id=f"{m}-{i}", problem_id=str(i), prompt="p", reasoning="r", answer="1", gold="1",
                        model=m) for m in ("organism:sft-1k", "organism:post-large") for i in range(2)]
    by = split_by_model(trajs, {"sft": "organism:sft-1k", "post": "organism:post-large"}, "t.jsonl")
    assert [t.id for t in by["sft"]] == ["organism:sft-1k-0", "organism:sft-1k-1"]
    assert [t.id for t in by["post"]] == ["organism:post-large-0", "organism:post-large-1"]
    with pytest.raises(ConfigError, match=r"t.jsonl: trajectory 'organism:sft-1k-0' has model 'organism:sft-1k', "
                                          r"which is neither a name in \[models\] \(sft, post\)"):
        split_by_model(trajs, {"sft": "organism:base", "post": "organism:post-large"}, "t.jsonl")
    unlabelled = [Trajectory(id="x", problem_id="1", prompt="p", reasoning="r", answer="1", gold="1")]
    assert split_by_model(unlabelled, {"a": "x", "b": "y"})["b"] == unlabelled


# -- 5. every value type- and range-checked, naming the key --------------------------------------
@pytest.mark.parametrize("section,key,value,message", [
    ("capture", "controls", "false", "capture.controls must be true or false, got 'false'"),
    ("answers", "max_trajectories", -3, "answers.max_trajectories must be at least 1, got -3"),
    ("tokens", "n_boot", 0, "tokens.n_boot must be at least 1, got 0"),
    ("probes", "words", "wait", "probes.words must be a list of strings, got 'wait'"),
    ("trajectories", "n_problems", "ten", "trajectories.n_problems must be an integer, got 'ten'"),
    ("probes", "folds", 1, "probes.folds must be at least 2, got 1"),
    ("answers", "jump", 1.5, "answers.jump must be between 0 and 1, got 1.5"),
    ("capture", "layers", "some", "capture.layers must be 'all' or a list of layer numbers, got 'some'"),
    ("ablations", "kinds", ["replace-wait", "x"], "ablations.kinds has 'x'; valid values: replace-wait, "
                                                  "remove-wait, shuffle-steps, delete-steps"),
])
def test_5_values_are_type_and_range_checked(root, section, key, value, message):
    raw = _raw(root)
    raw[section] = {**raw.get(section, {}), key: value}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, source="cfg.toml")
    assert str(e.value) == f"cfg.toml: {message}"


def test_5_choices_match_the_modules_that_use_them():
    from waitlens.experiments.config import CHOICES, STAGES
    from waitlens.hooks.ablations import KINDS
    from waitlens.hooks.points import RESID_KINDS

    assert set(CHOICES["ablations.kinds"]) == set(KINDS)
    assert set(CHOICES["capture.hook"]) == set(RESID_KINDS)
    assert CHOICES["stages"] == STAGES


def test_5_cli_numbers_are_range_checked(capsys):
    from waitlens.experiments.cli import main

    for args, message in [(["probe", "--store", "x", "--out", "y", "--folds", "1"], "--folds: must be at least 2, got 1"),
                          (["capture", "--model", "m", "--trajectories", "t", "--out", "o", "--shard-size", "0"],
                           "--shard-size: must be at least 1, got 0"),
                          (["capture", "--model", "m", "--trajectories", "t", "--out", "o", "--batch-size", "x"],
                           "--batch-size: expected an integer, got 'x'")]:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2 and message in capsys.readouterr().err


# -- 7. a config error is found before any stage; fixing a section key is not refused ----------
def test_7_layer_out_of_range_is_found_before_any_stage(root, tmp_path):
    cfg = parse_config(_raw(root, capture={"layers": [0, 5]}), source="cfg.toml")
    with pytest.raises(ConfigError, match=r"capture.layers: layer 5 does not exist in models.sft .* layers 0..1"):
        run_study(cfg, study_stages(), runs_root=tmp_path, quiet=True)
    assert not (tmp_path / "tiny").exists()


def test_7_a_changed_section_key_reruns_its_stage_and_keeps_the_others(root, clean_run, tmp_path):
    import shutil

    run_dir = tmp_path / "tiny"
    shutil.copytree(clean_run[0], run_dir)  # a finished run of _raw(root), as run_study left it
    kept = {p: p.stat().st_mtime_ns for p in (run_dir / "capture").rglob("*.safetensors")}
    probes = (run_dir / "probes" / "probe_results.csv").stat().st_mtime_ns
    fixed = parse_config(_raw(root, probes={"folds": 2, "n_boot": 20, "words": ["all"], "transfer": False}),
                         source="cfg.toml")
    run_study(fixed, study_stages(), runs_root=tmp_path, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (run_dir / "probes" / "probe_results.csv").stat().st_mtime_ns != probes
    assert read_manifest(run_dir)["stages"]["probes"]["config"]["probes"]["folds"] == 2
    with pytest.raises(RunError, match=r"different study \(seed: 0 -> 7\)"):
        run_study(parse_config(_raw(root, seed=7), source="cfg.toml"), study_stages(), runs_root=tmp_path, quiet=True)


# -- 8. the store checks itself ---------------------------------------------------------------
@pytest.fixture()
def store(tmp_path, tiny_model):
    from waitlens.hooks import capture_residuals
    from waitlens.traces import find_positions

    trajs = [tiny_trajectory(i) for i in range(6)]
    pos = find_positions(tiny_model, trajs, ["wait", "so"])
    s = capture_residuals(tiny_model, trajs, pos, tmp_path / "S", shard_size=2, progress=False)
    return s, (tiny_model, trajs, pos)


def test_8_deleted_or_truncated_shard_is_caught_and_a_rerun_repairs_it(store):
    from waitlens.hooks import capture_residuals

    s, (model, trajs, pos) = store
    want = s.states()
    shard = s.path / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(StoreError, match=r"shard-00001.safetensors has \d+ bytes, the manifest says \d+"):
        ActivationStore(s.path)
    (s.path / "shard-00002.safetensors").unlink()
    with pytest.raises(StoreError, match=r"shard-00001.safetensors has .* \(and 1 more problem"):
        ActivationStore(s.path)
    inode0 = (s.path / "shard-00000.safetensors").stat().st_ino
    repaired = capture_residuals(model, trajs, pos, s.path, shard_size=2, progress=False)
    assert torch.equal(repaired.states(), want)
    assert (s.path / "shard-00000.safetensors").stat().st_ino == inode0, "the intact shard was kept"
    assert repaired.verify() > 0


def test_8_bit_flip_caught_by_checksum_and_store_verify(store, capsys):
    s, _ = store
    shard = s.path / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data: same size, same header
    shard.write_bytes(bytes(data))
    opened = ActivationStore(s.path)  # sizes and shapes are fine
    with pytest.raises(StoreError, match="shard-00000.safetensors does not match its sha256"):
        opened.states()
    from waitlens.experiments.cli import main

    assert main(["store", "verify", str(s.path)]) == 2
    assert "does not match its sha256" in capsys.readouterr().err


def test_8_reordered_metadata_and_changed_n_are_errors_not_mislabels(store):
    s, _ = store
    meta = (s.path / "metadata.csv").read_text().splitlines()
    (s.path / "metadata.csv").write_text("\n".join([meta[0], meta[2], meta[1], *meta[3:]]) + "\n")
    with pytest.raises(StoreError, match="metadata.csv does not match its sha256"):
        ActivationStore(s.path).metadata  # noqa: B018
    man = json.loads((s.path / "manifest.json").read_text())
    del man["metadata_sha256"]  # a store written without the checksum: the row order still counts
    (s.path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="line 2 holds row 1, not 0"):
        ActivationStore(s.path).metadata  # noqa: B018
    man["shards"][0]["n"] += 1
    man["n_positions"] += 1
    (s.path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="holds states of shape"):
        ActivationStore(s.path)


def test_8_open_store_is_the_store(store, capsys):
    s, _ = store
    opened = open_store(s.path)
    assert isinstance(opened, ActivationStore)
    assert torch.equal(opened.states(), s.states()) and opened.meta.equals(s.metadata)
    from waitlens.experiments.cli import main

    assert main(["store", "verify", str(s.path)]) == 0
    assert ": ok (3 shards, 12 positions" in capsys.readouterr().out


# -- 9. the CLI: one line for bad input, a traceback for a bug ---------------------------------
def _cli(*args, cwd=None):
    return subprocess.run([WAITLENS, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_9_bad_inputs_are_one_line_exit_2(tmp_path, tiny_qwen_dir, capfd):
    import shutil

    save_trajectories([tiny_trajectory(i) for i in range(2)], tmp_path / "t.jsonl")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen_dir, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(tiny_qwen_dir / "config.json", only_config)
    (tmp_path / "afile").write_text("x")
    cases = {
        "truncated weights": (["capture", "--model", str(broken), "--trajectories", str(tmp_path / "t.jsonl"),
                               "--out", str(tmp_path / "o1"), "--device", "cpu"], f"{broken}"),
        "config.json only": (["capture", "--model", str(only_config), "--trajectories", str(tmp_path / "t.jsonl"),
                              "--out", str(tmp_path / "o2"), "--device", "cpu"], f"{only_config}"),
        "--out under a file": (["capture", "--model", str(tiny_qwen_dir), "--trajectories", str(tmp_path / "t.jsonl"),
                                "--out", str(tmp_path / "afile" / "o"), "--device", "cpu", "--quiet"], "Not a directory"),
    }
    from waitlens.experiments.cli import main

    for i, (what, (args, expect)) in enumerate(cases.items()):
        if i == 0:  # the installed command, in its own process
            r = _cli(*args)
            rc, err = r.returncode, r.stderr
        else:  # the same entry point in this process (a process start costs ~5 s of imports)
            rc = main(args)
            err = capfd.readouterr().err
        assert rc == 2, (what, err)
        last = err.strip().splitlines()[-1]  # (transformers' own progress bars may come first)
        assert "Traceback" not in err and last.startswith("waitlens capture: error: "), (what, err)
        assert expect in last, (what, err)


def test_9_a_bug_is_a_traceback_and_debug_shows_one(monkeypatch, capsys):
    from waitlens.experiments import cli

    def buggy(args):
        return [][1]  # IndexError: a bug, not bad input

    def bad_input(args):
        raise ConfigError("cfg.toml: probes.folds must be at least 2, got 1")

    def library_value_error(args):
        import fractions

        return fractions.Fraction("x")  # a ValueError raised inside a library, not by waitlens: a bug

    for handler in (buggy, library_value_error):
        monkeypatch.setattr(cli, "build_parser", lambda h=handler: _parser(h))
        with pytest.raises((IndexError, ValueError)):
            cli.main(["x"])
    monkeypatch.setattr(cli, "build_parser", lambda: _parser(bad_input))
    assert cli.main(["x"]) == 2
    assert capsys.readouterr().err == "waitlens x: error: cfg.toml: probes.folds must be at least 2, got 1\n"
    with pytest.raises(ConfigError):
        cli.main(["--debug", "x"])
    assert issubclass(ConfigError, WaitlensError) and issubclass(StoreError, WaitlensError)


def _parser(handler):
    import argparse

    p = argparse.ArgumentParser(prog="waitlens")
    p.add_argument("--debug", dest="debug_all", action="store_true")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("x").set_defaults(handler=handler)
    return p


def test_9_probe_refuses_an_unusable_out_before_computing(store, tmp_path, capsys, monkeypatch):
    from waitlens.experiments.analyses import probe
    from waitlens.experiments.cli import main

    s, _ = store
    (tmp_path / "afile").write_text("x")

    def no_fit(*args, **kwargs):
        raise AssertionError("probes were fitted before --out was checked")

    monkeypatch.setattr(probe, "fit_stores", no_fit)  # nothing may be computed first
    rc = main(["probe", "--store", str(s.path), "--out", str(tmp_path / "afile" / "out"), "--n-boot", "5"])
    out, err = capsys.readouterr()
    assert rc == 2 and "Not a directory" in err and "Traceback" not in err
    assert err.startswith("waitlens probe: error: ") and len(err.strip().splitlines()) == 1, err
    assert "AUROC" not in out


# -- 10. messages name the file ---------------------------------------------------------------
def test_10_non_utf8_line_and_corrupt_run_manifest_are_named(tmp_path):
    good = json.dumps(tiny_trajectory(0).to_dict())
    (tmp_path / "t.jsonl").write_bytes(good.encode() + b"\n" + b'{"id": "caf\xe9"}\n')
    with pytest.raises(WaitlensError, match=r"t.jsonl:2: not UTF-8 text \(byte b'\\xe9' at column 12\)"):
        load_trajectories(tmp_path / "t.jsonl")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text('{"config": ')
    with pytest.raises(RunError, match=r"run/manifest.json: unreadable run manifest"):
        read_manifest(tmp_path / "run")


# -- 11. minor ---------------------------------------------------------------------------------
def test_11_bit_flipped_shipped_weights_are_refused(tmp_path, monkeypatch):
    from waitlens.experiments.organism import registry

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    import hashlib

    (tmp_path / "shipped.json").write_text(json.dumps({"sha256": {"sft-1k": hashlib.sha256(b"\x00" * 64).hexdigest()}}))
    monkeypatch.setattr(registry, "SHIPPED", tmp_path / "shipped.json")
    registry.verify_shipped("sft-1k", weights)  # intact
    weights.write_bytes(b"\x00" * 63 + b"\x01")
    with pytest.raises(registry.ShippedWeightsError, match="does not match"):
        registry.verify_shipped("sft-1k", weights)
    monkeypatch.undo()
    registry.resolve("sft-1k")  # the real shipped weights match shipped.json


def test_11_files_follow_the_umask_and_logs_name_final_paths(clean_run, tmp_path):
    old = os.umask(0o022)
    try:
        save_trajectories(_trajectories(1), tmp_path / "t.jsonl")
    finally:
        os.umask(old)
    assert (tmp_path / "t.jsonl").stat().st_mode & 0o777 == 0o644
    run_dir, out, err = clean_run
    assert str(run_dir / "probes" / "probe_results.csv") in out
    assert ".partial" not in out + err


def test_every_atomic_writer_gives_the_umask_permissions(tmp_path):
    """Figures, JSON and trajectories all go through traces.atomic (mkstemp alone makes 0600)."""
    import matplotlib.pyplot as plt

    from waitlens.experiments.plots import save_figure
    from waitlens.traces.atomic import atomic_write, write_json

    old = os.umask(0o027)
    try:
        paths = [save_figure(plt.figure(), tmp_path / "f.png"), write_json(tmp_path / "m.json", {"a": 1})]
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in paths] == [0o640, 0o640]
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "m.json", lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(RuntimeError())))
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "m.json"]
