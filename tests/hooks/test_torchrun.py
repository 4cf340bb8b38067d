"""Data parallelism under torchrun (gloo, two ranks on the CPU): capture's store and patching's
files are byte for byte what one process writes, and a capture whose rank was killed resumes.

Two launches in all: one to kill a rank mid-capture, one that resumes the capture and then runs
`waitlens patch` in the same two ranks (the process group carries over). A launch costs ~20 s of
CPU before any work: the launcher and each rank import torch and transformers."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

import waitlens.hooks.capture as capmod
from waitlens.hooks import load_model
from waitlens.traces import control_positions, find_positions, load_trajectories, save_trajectories

pytestmark = [pytest.mark.slow,
              pytest.mark.usefixtures("one_thread")]  # the single process's floats are the one-thread ranks'

WORDS = ["wait", "so", "therefore", "alternatively"]

# argv: trajectories, store, the rank to kill after its first shard (-1: none), then optionally
# `waitlens patch` arguments, run after the capture in the same ranks
_SCRIPT = f'''
import os, sys
import waitlens.hooks.capture as capmod
from waitlens.hooks import load_model
from waitlens.traces import control_positions, find_positions, load_trajectories

trajs_file, out, kill_rank, patch_args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
if int(os.environ["RANK"]) == kill_rank:  # this rank dies after writing its first shard
    real = capmod.write_shard

    def write_then_die(*a, **kw):
        real(*a, **kw)
        os._exit(3)

    capmod.write_shard = write_then_die
model = load_model("organism:post-large", device="cpu", dtype="float32")
trajs = load_trajectories(trajs_file)
pos = find_positions(model, trajs, {WORDS!r})
pos = pos.concat(control_positions(model, trajs, pos, seed=0))
capmod.capture_residuals(model, trajs, pos, out, batch_size=2, shard_size=2, progress=False)
if patch_args:
    from waitlens.experiments.cli import main

    sys.exit(main(patch_args))
'''


def _store_bytes(d):
    """Every file of a store, the manifest without its timestamps and versions."""
    out = {}
    for p in sorted(d.iterdir()):
        if p.name == "manifest.json":
            m = json.loads(p.read_text())
            for k in ("created", "finished", "versions"):
                m.pop(k, None)
            out[p.name] = json.dumps(m, sort_keys=True).encode()
        else:
            out[p.name] = p.read_bytes()
    return out


def test_torchrun_capture_resumes_and_patching_equal_one_process(tmp_path, capsys):
    """torchrun --nproc-per-node 2 with rank 1 killed after its first capture shard fails and leaves
    an incomplete store; the same command rerun resumes it, and the store both launches' ranks wrote
    is byte for byte the store this process writes. In the second launch's ranks, `waitlens patch`
    then writes the rows and tables the same CLI writes in this process, byte for byte, and only
    rank 0 prints the summary."""
    from waitlens.experiments.cli import main
    from waitlens.experiments.organism.sample import sample
    from waitlens.hooks.batching import length_batches
    from waitlens.hooks.patch_cases import prepare_cases

    post = load_model("organism:post-large", device="cpu", dtype="float32")
    sft = load_model("organism:sft-1k", device="cpu")
    trajs = sample(post, 8, seed=5, progress=False)
    tf = tmp_path / "t.jsonl"
    save_trajectories(trajs, tf)
    pts = [t for t in sample(sft, 40, seed=2, progress=False) if " wait " in f" {t.reasoning} "][:8]
    pf = tmp_path / "p.jsonl"
    save_trajectories(pts, pf)
    script = tmp_path / "dp.py"
    script.write_text(_SCRIPT)
    cli = ["patch", "--source", "organism:post-large", "--target", "organism:sft-1k", "--trajectories", str(pf),
           "--attribution", "--n-boot", "50", "--quiet", "--batch-tokens", "200"]

    def launch(store, kill_rank=-1, patch_args=()):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               str(tf), str(store), str(kill_rank), *patch_args]
        proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher and its ranks
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    # what one process writes: the store (from the file the ranks read) and the patch CLI's files
    pos = find_positions(post, load_trajectories(tf), WORDS)
    pos = pos.concat(control_positions(post, load_trajectories(tf), pos, seed=0))
    single = capmod.capture_residuals(post, load_trajectories(tf), pos, tmp_path / "single", batch_size=2,
                                      shard_size=2, progress=False)
    assert len(single.manifest["shards"]) >= 4  # both ranks get more than one shard
    cases, _ = prepare_cases(post, sft, pts)
    assert len(list(length_batches([len(c.target_ids) for c in cases], 64, 200))) >= 2  # both ranks patch some
    assert main([*cli, "--out", str(tmp_path / "one")]) == 0
    one = capsys.readouterr().out

    killed = launch(tmp_path / "resumed", kill_rank=1)
    assert killed.returncode != 0
    m = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert not m["complete"] and (tmp_path / "resumed" / "shard-00001.safetensors").exists()
    assert not (tmp_path / "resumed" / "shard-00003.safetensors").exists()  # rank 1's second shard: resumed
    again = launch(tmp_path / "resumed", patch_args=[*cli, "--out", str(tmp_path / "two")])
    assert again.returncode == 0, again.stderr[-3000:]
    assert _store_bytes(tmp_path / "resumed") == _store_bytes(tmp_path / "single")

    assert again.stdout.count("wrote ") == one.count("wrote ") == 1  # rank 0 alone prints
    m = json.loads((tmp_path / "two" / "patch_manifest.json").read_text())
    assert m["info"]["world_size"] == 2
    with gzip.open(tmp_path / "one" / "patch_rows.csv.gz") as a, gzip.open(tmp_path / "two" / "patch_rows.csv.gz") as b:
        assert a.read() == b.read()
    for name in ("patch_effects.csv", "wait_vs_random.csv", "attribution.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
