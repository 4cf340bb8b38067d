"""Capture: the numbers (vs full forwards and TransformerLens), batching, resume, bad input, CLI."""

from __future__ import annotations

import json
import os
import random
import warnings

import numpy as np
import pytest
import torch

import waitlens.hooks.capture as capmod
from tests.conftest import make_tiny_qwen, tiny_trajectory
from waitlens.hooks import (
    ContextLengthError,
    IncompleteStoreError,
    StoreError,
    capture_residuals,
    open_store,
)
from waitlens.hooks.points import residual_hooks
from waitlens.traces import (
    Trajectory,
    control_positions,
    find_positions,
    save_trajectories,
)

TOL = 1e-4
CLAUSES = ["3 + 4 = 7 ;", "wait 7 - 2 = 5 ;", "so 5 + 1 = 6", "hmm check 6 ;", "therefore 9 - 3 = 6 ;",
           "alternatively 2 + 2 = 4 ;"]


def trajectories(n=7, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(1, 12)  # varied lengths, so batches are padded
        out.append(tiny_trajectory(i, " ".join(rng.choice(CLAUSES) for _ in range(k)), correct=bool(i % 2)))
    return out


@pytest.fixture(scope="module")
def trajs():
    return trajectories()


@pytest.fixture(scope="module")
def positions(tiny_model, trajs):
    pos = find_positions(tiny_model, trajs, ["wait", "so", "hmm", "check", "therefore", "alternatively"])
    assert len(pos) > 20 and len(set(pos.table["trajectory_id"])) == len(trajs)
    return pos


_REFERENCE: dict = {}


def reference(model, traj):
    """Every block's input and output residual over the whole sequence (plain PyTorch hooks on
    one full forward), and HF's output_hidden_states; cached per model and trajectory."""
    key = (model.spec, traj.id, traj.reasoning)
    if key in _REFERENCE:
        return _REFERENCE[key]
    pre, post, handles = {}, {}, []
    for layer, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, layer=layer: pre.__setitem__(layer, (a[0] if a else kw["hidden_states"]).clone()),
            with_kwargs=True))
        handles.append(block.register_forward_hook(
            lambda m, a, o, layer=layer: post.__setitem__(layer, (o[0] if isinstance(o, tuple) else o).clone())))
    try:
        with torch.inference_mode():
            hs = model.hf(model.tokenize(traj)[None], output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    _REFERENCE[key] = {"resid_pre": pre, "resid_post": post}, hs
    return _REFERENCE[key]


def check_against_full_forward(model, trajs, store, kind):
    states, meta = store.states(), store.metadata
    worst = 0.0
    for t in trajs:
        rows = meta.index[meta["trajectory_id"] == t.id].to_numpy().copy()
        if not len(rows):
            continue
        idx = torch.as_tensor(meta["token_index"].to_numpy()[rows].copy())
        by_kind, hs = reference(model, t)
        got = by_kind[kind]
        for j, layer in enumerate(store.layers):
            # The plain block hooks agree with HF's output_hidden_states: hidden_states[l] is
            # the input of block l; the last entry is after the final norm, so the last
            # block's output has no hidden_states twin.
            ref = got[layer]
            twin = layer if kind == "resid_pre" else layer + 1
            if twin < model.n_layers:
                assert torch.equal(ref, hs[twin])
            worst = max(worst, (states[rows, j] - ref[0, idx]).abs().max().item())
    assert worst <= TOL, worst
    return worst


@pytest.mark.parametrize("kind", ["resid_post", "resid_pre"])
def test_tiny_matches_full_forward(tiny_model, trajs, positions, tmp_path, kind):
    store = capture_residuals(tiny_model, trajs, positions, tmp_path / "s", hook=kind, batch_size=4,
                              shard_size=3, progress=False)
    assert store.hook == kind and store.layers == [0, 1, 2] and len(store) == len(positions)
    check_against_full_forward(tiny_model, trajs, store, kind)
    meta = store.metadata
    for c in ("trajectory_id", "problem_id", "word", "token_index", "rel_index", "frac", "correct", "model", "shard", "row"):
        assert c in meta
    assert meta["row"].tolist() == list(range(len(meta)))


def test_tiny_matches_transformerlens(tiny_model, trajs, positions, tmp_path):
    """The hook names mean what TransformerLens means by them (bridge.run_with_cache)."""
    store = capture_residuals(tiny_model, trajs, positions, tmp_path / "s", layers="0,2", progress=False)
    meta, states = store.metadata, store.states()
    bridge = tiny_model.bridge
    names = [f"blocks.{layer}.hook_resid_post" for layer in store.layers]
    for t in trajs[:4]:
        rows = meta.index[meta["trajectory_id"] == t.id].to_numpy().copy()
        pos = meta["token_index"].to_numpy()[rows].tolist()
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(tiny_model.tokenize(t)[None], names_filter=names, pos_slice=pos)
        for j, name in enumerate(names):
            torch.testing.assert_close(states[rows, j], cache[name][0], atol=TOL, rtol=0)


def test_batching_and_padding_do_not_change_results(tiny_model, trajs, positions, tmp_path):
    one = capture_residuals(tiny_model, trajs, positions, tmp_path / "b1", batch_size=1, progress=False)
    many = capture_residuals(tiny_model, trajs, positions, tmp_path / "b8", batch_size=8, shard_size=100, progress=False)
    assert len(many.manifest["shards"]) == 1 and len(one.manifest["shards"]) == 1
    assert (one.metadata.drop(columns="shard") == many.metadata.drop(columns="shard")).all().all()
    assert (one.states() - many.states()).abs().max().item() <= TOL


def test_capture_leaves_logits_unchanged(tiny_model, trajs):
    ids = tiny_model.tokenize(trajs[0])[None]
    seen = []
    hooks_ = {f"blocks.{layer}.hook_{k}": (lambda h: seen.append(h[0, [1, 3]].clone()))
              for layer in range(tiny_model.n_layers) for k in ("resid_pre", "resid_post")}
    with torch.inference_mode():
        bare = tiny_model.hf(ids).logits
        with residual_hooks(tiny_model, hooks_):
            hooked = tiny_model.hf(ids).logits
    assert len(seen) == 2 * tiny_model.n_layers and torch.equal(bare, hooked)


# -- resume -----------------------------------------------------------------------------------
class Killed(Exception):
    pass


def kill_after(monkeypatch, n_calls):
    calls = {"n": 0}
    real = capmod.residuals_at

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] > n_calls:
            raise Killed("simulated kill")
        return real(*a, **kw)

    monkeypatch.setattr(capmod, "residuals_at", flaky)
    return calls


def test_resume_after_kill(tiny_model, trajs, positions, tmp_path, monkeypatch):
    kw = dict(batch_size=1, shard_size=2, progress=False)  # 4 shards, one forward per trajectory
    full = capture_residuals(tiny_model, trajs, positions, tmp_path / "full", **kw)
    out = tmp_path / "s"
    kill_after(monkeypatch, 3)  # dies inside shard 1, after shard 0 is written
    with pytest.raises(Killed):
        capture_residuals(tiny_model, trajs, positions, out, **kw)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json", "shard-00000.csv", "shard-00000.safetensors"]  # nothing half-written
    with pytest.raises(IncompleteStoreError, match="rerun"):
        open_store(out)
    st0 = os.stat(out / "shard-00000.safetensors")
    monkeypatch.undo()
    calls = kill_after(monkeypatch, 10**6)
    store = capture_residuals(tiny_model, trajs, positions, out, **kw)
    assert calls["n"] == len(trajs) - 2  # shard 0's two trajectories were not redone
    st1 = os.stat(out / "shard-00000.safetensors")
    assert (st0.st_ino, st0.st_mtime_ns) == (st1.st_ino, st1.st_mtime_ns)
    assert torch.equal(store.states(), full.states())
    assert store.metadata.equals(full.metadata)
    # a finished store: rerunning is a no-op
    assert capture_residuals(tiny_model, trajs, positions, out, **kw).manifest["complete"] and calls["n"] == len(trajs) - 2


def test_kill_during_shard_write_leaves_no_partial_file(tiny_model, trajs, positions, tmp_path, monkeypatch):
    import waitlens.hooks.store as storemod

    real = storemod.save_canonical

    def dying_save(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as fh:  # a half-flushed file, then the process dies
            fh.truncate(40)
        raise Killed("killed while writing")

    monkeypatch.setattr(storemod, "save_canonical", dying_save)
    out = tmp_path / "s"
    with pytest.raises(Killed):
        capture_residuals(tiny_model, trajs, positions, out, shard_size=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.csv"]
    monkeypatch.undo()
    # a corrupt shard file (e.g. from another tool) is redone, not trusted
    (out / "shard-00000.safetensors").write_bytes(b"garbage")
    store = capture_residuals(tiny_model, trajs, positions, out, shard_size=3, progress=False)
    check_against_full_forward(tiny_model, trajs, store, "resid_post")


def test_resume_with_other_config_is_refused(tiny_model, trajs, positions, tmp_path, monkeypatch):
    out = tmp_path / "s"
    kill_after(monkeypatch, 1)
    with pytest.raises(Killed):
        capture_residuals(tiny_model, trajs, positions, out, batch_size=1, shard_size=1, progress=False)
    monkeypatch.undo()
    with pytest.raises(StoreError, match=r"different configuration \(layers: \[0, 1, 2\] -> \[0\]"):
        capture_residuals(tiny_model, trajs, positions, out, layers=[0], batch_size=1, shard_size=1, progress=False)
    with pytest.raises(StoreError, match="different configuration.*hook"):
        capture_residuals(tiny_model, trajs, positions, out, hook="resid_pre", batch_size=1, shard_size=1, progress=False)
    with pytest.raises(StoreError, match="different configuration.*trajectories/positions"):
        capture_residuals(tiny_model, trajs[::-1], positions, out, batch_size=1, shard_size=1, progress=False)


# -- dtype, controls, empty, bad input --------------------------------------------------------
def test_storage_dtype_and_controls(tiny_model, trajs, positions, tmp_path):
    pos = positions.concat(control_positions(tiny_model, trajs, positions, seed=1))
    store = capture_residuals(tiny_model, trajs, pos, tmp_path / "s", storage_dtype="bfloat16", progress=False)
    assert store.manifest["dtype"] == "bfloat16"
    ref = capture_residuals(tiny_model, trajs, pos, tmp_path / "r", progress=False)
    torch.testing.assert_close(store.states(), ref.states(), rtol=1e-2, atol=1e-2)
    s, m = store.select(words=["<control>"])
    assert len(m) == (pos.table["word"] == "<control>").sum() and s.shape[0] == len(m)


def test_no_positions_gives_warning_and_empty_valid_store(tiny_model, trajs, tmp_path):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pos = find_positions(tiny_model, trajs, ["verify"])
        store = capture_residuals(tiny_model, trajs, pos, tmp_path / "s", progress=False)
    assert any("no positions" in str(x.message) for x in w)
    states, meta = open_store(store.path).states(), open_store(store.path).meta
    assert states.shape == (0, tiny_model.n_layers, tiny_model.d_model) and len(meta) == 0
    assert store.manifest["complete"] and store.manifest["n_positions"] == 0


def test_bad_input_is_refused_before_writing(tiny_model, trajs, positions, tmp_path):
    out = tmp_path / "s"
    long = Trajectory("long", "p", "Q", " ".join(["3 + 4 = 7 ;"] * 1100), "7", "7", True)
    with pytest.raises(ContextLengthError, match="more than the context"):
        capture_residuals(tiny_model, [*trajs, long], positions, out, progress=False)
    with pytest.raises(ValueError, match="trajectory id"):
        capture_residuals(tiny_model, trajs[:2], positions, out, progress=False)
    bad = positions.table.copy()
    bad.loc[0, "token_index"] = 10_000
    with pytest.raises(ValueError, match="outside their trajectory.*tokenizer"):
        capture_residuals(tiny_model, trajs, bad, out, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        capture_residuals(tiny_model, trajs, positions, out, layers=[7], progress=False)
    with pytest.raises(ValueError, match="unknown residual hook"):
        capture_residuals(tiny_model, trajs, positions, out, hook="attn_out", progress=False)
    with pytest.raises(ValueError, match="storage dtype"):
        capture_residuals(tiny_model, trajs, positions, out, storage_dtype="int8", progress=False)
    assert not out.exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an activation store"):
        capture_residuals(tiny_model, trajs, positions, tmp_path / "other", progress=False)


# -- SmolLM2 (a real BPE LM from its GGUF file) -----------------------------------------------
SMOL_REASONING = ("Let me compute 12 * 13. 12 * 13 = 156. Wait, let me check: 12 * 10 = 120 and 12 * 3 = 36, "
                  "so 120 + 36 = 156. Alternatively, 13 * 12 = 130 + 26 = 156. Hmm, that agrees. "
                  "Therefore the answer is 156. WAIT, is 156 even? Yes, so it is divisible by 2.")


@pytest.fixture(scope="module")
def smol_trajs():
    return [Trajectory("s0", "p0", "What is 12 * 13?", SMOL_REASONING, "156", "156", True),
            Trajectory("s1", "p1", "Is 156 even?", SMOL_REASONING[:120] + " wait, so yes.", "yes", "yes", False)]


@pytest.mark.slow
def test_smollm2_matches_full_forward(smollm2, smol_trajs, tmp_path):
    pos = find_positions(smollm2, smol_trajs, ["wait", "so", "alternatively", "hmm", "therefore"])
    assert len(pos) >= 10
    layers = [0, 7, 15, 29]
    for kind in ("resid_post", "resid_pre"):
        store = capture_residuals(smollm2, smol_trajs, pos, tmp_path / kind, layers=layers, hook=kind,
                                  batch_size=2, progress=False)
        worst = check_against_full_forward(smollm2, smol_trajs, store, kind)
        assert worst <= TOL


@pytest.mark.slow
def test_smollm2_names_match_transformerlens(smollm2, smol_trajs, tmp_path):
    """Bridge (eager attention) vs capture on the same weights run with eager attention: the
    hook names map to the same tensors. (sdpa vs eager differs by ~5e-4 absolute on SmolLM2's
    residuals of magnitude ~1e4, i.e. ~3e-6 relative, which is why this test switches.)"""
    t = smol_trajs[0]
    pos = find_positions(smollm2, [t], ["wait", "so"])
    layers = [0, 15, 29]
    names = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    ids = smollm2.tokenize(t)[None]
    idx = pos.table["token_index"].tolist()
    with torch.inference_mode():
        _, cache = smollm2.bridge.run_with_cache(ids, names_filter=names, pos_slice=idx)
    sdpa = capture_residuals(smollm2, [t], pos, tmp_path / "sdpa", layers=layers, progress=False).states()
    smollm2.hf.set_attn_implementation("eager")
    try:
        eager = capture_residuals(smollm2, [t], pos, tmp_path / "eager", layers=layers, progress=False).states()
    finally:
        smollm2.hf.set_attn_implementation("sdpa")
    for j, name in enumerate(names):
        torch.testing.assert_close(eager[:, j], cache[name][0], atol=TOL, rtol=0)
        torch.testing.assert_close(sdpa[:, j], cache[name][0], atol=5e-3, rtol=1e-5)


# -- CLI --------------------------------------------------------------------------------------
def cli(*args):
    from waitlens.experiments.cli import main

    return main(["capture", *map(str, args)])


def test_cli_end_to_end(tiny_qwen_dir, trajs, tmp_path, capsys):
    f = save_trajectories(trajs, tmp_path / "t.jsonl")
    rc = cli("--model", tiny_qwen_dir, "--trajectories", f, "--out", tmp_path / "s", "--layers", "0,2",
             "--words", "wait,so", "--hook", "resid_pre", "--controls", "--quiet", "--device", "cpu")
    out = capsys.readouterr().out
    assert rc == 0 and "captured" in out and "2 layers" in out
    states, meta = open_store(tmp_path / "s").states(), open_store(tmp_path / "s").meta
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["hook"] == "resid_pre" and man["layers"] == [0, 2] and man["lexicon"] == ["wait", "so"]
    assert set(meta["word"]) == {"wait", "so", "<control>"} and states.shape == (len(meta), 2, 32)
    assert np.isfinite(states.numpy()).all()


def test_cli_errors_are_one_clear_line(tiny_qwen_dir, trajs, tmp_path, capsys):
    good = save_trajectories(trajs, tmp_path / "t.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "problem_id": "p", "prompt": "Q", "reasoning": "wait", "answer": "1", "gold": "1"}\n{oops\n')
    short = make_tiny_qwen(tmp_path / "short", max_pos=20)
    cases = [
        (["--model", tiny_qwen_dir, "--trajectories", bad], "bad.jsonl:2: not valid JSON"),
        (["--model", tmp_path / "nope", "--trajectories", good], "model path not found"),
        (["--model", short, "--trajectories", good], "more than the context"),
        (["--model", tiny_qwen_dir, "--trajectories", good, "--layers", "1,9"], "out of range"),
    ]
    for args, msg in cases:
        rc = cli(*args, "--out", tmp_path / "o", "--quiet", "--device", "cpu")
        err = capsys.readouterr().err
        assert rc == 2 and "waitlens capture: error:" in err and msg in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()
    with pytest.warns(UserWarning, match="no positions"):
        rc = cli("--model", tiny_qwen_dir, "--trajectories", good, "--out", tmp_path / "e", "--words", "verify",
                 "--quiet", "--device", "cpu")
    assert rc == 0 and "captured 0 positions" in capsys.readouterr().out
    assert open_store(tmp_path / "e").states().shape == (0, 3, 32)


# -- in memory --------------------------------------------------------------------------------
def test_in_memory_capture_equals_store(tiny_model, trajs, positions, tmp_path):
    """`capture` (a notebook's run_with_cache) holds exactly what the store holds, same rows."""
    import waitlens as wl
    from waitlens.hooks.capture import capture

    store = capture_residuals(tiny_model, trajs, positions, tmp_path / "s", layers="0,2", batch_size=4,
                              shard_size=100, progress=False)  # one shard: the very same batches
    got = capture(tiny_model, trajs, positions, layers=[2, 0], batch_size=4)
    states, meta = got
    assert got.layers == [0, 2] and got.hook == "resid_post" and len(got) == len(positions)
    assert states.shape == (len(positions), 2, tiny_model.d_model) and states.dtype == torch.float32
    assert torch.equal(states, store.states())
    cols = [c for c in store.metadata.columns if c != "shard"]
    assert meta[cols].astype(str).equals(store.metadata[cols].astype(str))
    pre = wl.capture(tiny_model, trajs, positions.table, layers="1", hook="resid_pre")
    assert pre.states.shape[1] == 1 and pre.hook == "resid_pre"
    empty = capture(tiny_model, trajs, positions.table.iloc[:0], layers=[1])
    assert empty.states.shape == (0, 1, tiny_model.d_model) and len(empty.meta) == 0
    with pytest.raises(ValueError, match="out of range"):
        capture(tiny_model, trajs, positions, layers=[7])


